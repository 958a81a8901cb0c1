"""Amounts as people type and read them: ``--unit`` names, strict parsing, display at full precision.

The command line and the demo use these; the library's own API takes ``usd()``, ``tokens()``, ...

- Unit names are the ones ``--unit`` accepts: ``usd``, ``tokens``, ``credits``, ``risk`` (the wire
  names ``USD_MICROCENTS``, ``TOKENS``, ... are accepted too, case-insensitively).
- Parsing is exact or refused: digits with at most one decimal point, nothing else -- no thousands
  separators (``0,50`` is ambiguous: half a dollar or fifty?), no exponent, no sign, no rounding
  (USD goes down to one micro-cent, ``0.00000001``; the other units are whole numbers), and nothing
  above the largest amount a ledger can hold.
- Display keeps every digit an amount has: ``$0.00005``, ``$1.50``, ``1,200``.
"""

from __future__ import annotations

import re
from decimal import Decimal

from cycles.errors import InvalidRequest
from cycles.models import INT64_MAX, MICROCENTS_PER_USD, Amount, Unit

__all__ = ["UNIT_NAMES", "format_amount_exact", "parse_amount", "parse_unit", "unit_name"]

#: What ``--unit`` accepts, and what tables show.
UNIT_NAMES: dict[str, Unit] = {
    "usd": Unit.USD_MICROCENTS,
    "tokens": Unit.TOKENS,
    "credits": Unit.CREDITS,
    "risk": Unit.RISK_POINTS,
}
_ALIASES = {"risk_points": Unit.RISK_POINTS, **{u.value.lower(): u for u in Unit}}
_NUMBER = re.compile(r"^(\d+)(?:\.(\d*))?$|^\.(\d+)$")
_USD_DECIMALS = 8  # 1 USD = 10^8 micro-cents


def unit_name(unit: Unit) -> str:
    """``Unit.USD_MICROCENTS`` -> ``"usd"``: the name ``--unit`` accepts."""
    return next(name for name, u in UNIT_NAMES.items() if u is unit)


def parse_unit(name: str) -> Unit:
    key = name.strip().lower()
    unit = UNIT_NAMES.get(key) or _ALIASES.get(key)
    if unit is None:
        raise InvalidRequest(f"unknown unit {name!r}: use one of {', '.join(UNIT_NAMES)}")
    return unit


def parse_amount(text: str, unit: str | Unit = "usd") -> Amount:
    """``"1.50"`` / ``"$1.50"`` in usd (down to ``0.00000001``); whole numbers in the other units."""
    u = unit if isinstance(unit, Unit) else parse_unit(unit)
    name = unit_name(u)
    raw = text.strip()
    if u is Unit.USD_MICROCENTS:
        raw = raw.removeprefix("$")
    match = _NUMBER.match(raw)
    if match is None:
        raise InvalidRequest(f"{text!r} is not an amount: {_why_not(raw, name)}")
    whole, fraction = match.group(1) or "0", match.group(2) or match.group(3) or ""
    if u is Unit.USD_MICROCENTS:
        if len(fraction.rstrip("0")) > _USD_DECIMALS:
            raise InvalidRequest(
                f"{text!r} has more decimals than a ledger keeps: USD amounts go down to 0.00000001 (one micro-cent)"
            )
        value = int(whole) * MICROCENTS_PER_USD + int((fraction + "0" * _USD_DECIMALS)[:_USD_DECIMALS])
    else:
        if fraction.strip("0"):
            raise InvalidRequest(f"{name} are whole numbers, got {text!r}")
        value = int(whole)
    if value > INT64_MAX:
        largest = format_amount_exact(u, INT64_MAX)
        raise InvalidRequest(f"{text!r} is more than the largest amount a ledger can hold ({largest} in {name})")
    return Amount(unit=u, amount=value)


def _why_not(raw: str, name: str) -> str:
    example = "12 or 0.50" if name == "usd" else "1200"
    if raw.startswith("-"):
        return "amounts are never negative"
    if "," in raw or "_" in raw or " " in raw:
        return f"write it without thousands separators and with a dot for decimals, e.g. {example}"
    if re.search(r"\d[eE][+-]?\d", raw):
        return f"write the number out, without an exponent, e.g. {example}"
    if raw.count(".") > 1:
        return "it has more than one decimal point"
    return f"use digits with at most one decimal point, e.g. {example}"


def format_amount_exact(unit: Unit, amount: int) -> str:
    """Every digit the amount has: ``$0.00005``, ``$1.50``, ``-$2.00``, ``1,200`` (other units bare)."""
    if unit is not Unit.USD_MICROCENTS:
        return f"{amount:,}"
    dollars = Decimal(abs(amount)) / MICROCENTS_PER_USD
    text = f"{dollars:,.{_USD_DECIMALS}f}".rstrip("0")
    whole, _, cents = text.partition(".")
    return f"{'-' if amount < 0 else ''}${whole}.{cents.ljust(2, '0')}"
