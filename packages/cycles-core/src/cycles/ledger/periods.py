"""Recurring budgets: period windows and rollover, written once.

A budget may have a period: ``hour``, ``day``, ``week`` (from Monday) or ``month``, aligned to the
calendar of an IANA time zone (DST-correct: a Berlin day is 23 or 25 hours long twice a year), or
a fixed duration (``"90s"``, ``"15m"``, ``"12h"``, ``"7d"``) counted from when the period was set.

No cron: the first operation that touches a budget after its period ended rolls it over inside its
own transaction (memory, SQLite: ``roll_rows`` from ``rules``; Redis: the script refuses with
``PERIOD_ROLL``, redis.py computes the window here and runs ``roll.lua``, which re-checks the window
against its clock, then re-runs the operation). A sweep rolls idle ones too.

At a rollover, per the admin spec's ``rollover_policy``:
  * ``NONE``: the new period starts with its allocation; unused budget is gone.
  * ``CARRY_FORWARD``: the unused part of the ended period (allocated - spent - debt, at least 0,
    plus a whole allocation for every period that passed untouched) is added to the new one.
  * ``CAP_AT_ALLOCATED``: like ``CARRY_FORWARD``, but what carries over is at most one allocation.
Spent starts again at 0. Reservations made in one period and settled in the next keep their hold
across the boundary (``reserved`` carries over) and are charged to the period they settle in.
Debt is not forgiven: like a funding operation, the new period's allocation repays it first (it
becomes spent of the new period), so an overdraft borrows from the next period.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cycles.errors import InvalidRequest

__all__ = [
    "CALENDAR_PERIODS",
    "ROLLOVER_POLICIES",
    "PeriodSpec",
    "PeriodState",
    "iso",
    "meta_key",
    "parse_period",
    "rollover",
    "spec",
    "window",
]

CALENDAR_PERIODS = ("hour", "day", "week", "month")
ROLLOVER_POLICIES = ("NONE", "CARRY_FORWARD", "CAP_AT_ALLOCATED")
_UNITS_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 7 * 86_400_000}
_DURATION = re.compile(r"^([1-9][0-9]{0,9})(s|m|h|d|w)$")
_MIN_DURATION_MS = 1000
_MAX_SKIPPED = 100_000  # calendar periods counted one by one when a budget sat idle


def parse_period(period: str, timezone: str | None) -> tuple[str, int]:
    """Validate a period and its time zone. Returns the canonical period and, for a fixed duration,
    its length in ms (0 for calendar periods)."""
    if not isinstance(period, str) or not period:
        raise InvalidRequest("period must be hour, day, week, month or a duration such as 90s, 15m, 12h, 7d")
    p = period.strip().lower()
    if p in CALENDAR_PERIODS:
        zone(timezone or "UTC")
        return p, 0
    m = _DURATION.match(p)
    if m is None:
        raise InvalidRequest(f"period {period!r} is not hour, day, week, month or a duration such as 90s, 15m, 12h, 7d")
    if timezone not in (None, "", "UTC"):
        raise InvalidRequest("timezone applies to calendar periods (hour, day, week, month), not to durations")
    return p, int(m.group(1)) * _UNITS_MS[m.group(2)]


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidRequest(f"unknown IANA time zone {name!r}") from exc


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def _local_start(period: str, local: datetime) -> datetime:
    if period == "hour":
        return local.replace(minute=0, second=0, microsecond=0)
    day = local.replace(hour=0, minute=0, second=0, microsecond=0, fold=0)
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


def _next_local(period: str, start: datetime) -> datetime:
    if period == "hour":  # an absolute hour: DST moves whole hours, so the local hour boundary is +1h
        return (start.astimezone(UTC) + timedelta(hours=1)).astimezone(start.tzinfo)
    if period == "day":
        return (start.replace(tzinfo=None) + timedelta(days=1)).replace(tzinfo=start.tzinfo, fold=0)
    if period == "week":
        return (start.replace(tzinfo=None) + timedelta(days=7)).replace(tzinfo=start.tzinfo, fold=0)
    year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
    return start.replace(year=year, month=month, day=1, fold=0)


def _instant(local: datetime) -> int:
    """The instant a local wall time names. In a DST gap (no such wall time) the first instant
    after it; in an overlap the first of the two."""
    return _ms(local.astimezone(UTC))


def window(period: str, timezone: str | None, duration_ms: int, anchor_ms: int, now_ms: int) -> tuple[int, int]:
    """The period [start, end) in ms that contains ``now_ms``."""
    if duration_ms:
        k = (now_ms - anchor_ms) // duration_ms
        start = anchor_ms + k * duration_ms
        return start, start + duration_ms
    tz = zone(timezone or "UTC")
    local = datetime.fromtimestamp(now_ms / 1000, tz)
    start_local = _local_start(period, local)
    start = _instant(start_local)
    end = _instant(_next_local(period, start_local))
    if start > now_ms:  # a local midnight inside a DST gap rounded later than now: step back a period
        start = _instant(_local_start(period, local - timedelta(hours=3)))
    return start, end


@dataclass(slots=True)
class PeriodState:
    """A budget's period, stored beside it (memory/SQLite: the ledger's meta store; Redis: the
    budgets hash field ``<scope>|<unit>|period``)."""

    period: str
    timezone: str | None
    duration_ms: int
    rollover: str
    base: int  # the allocation each period starts with
    anchor_ms: int  # fixed durations count from here
    start_ms: int
    end_ms: int

    def dumps(self) -> str:
        return json.dumps(
            [
                self.period,
                self.timezone or "",
                self.duration_ms,
                self.rollover,
                self.base,
                self.anchor_ms,
                self.start_ms,
                self.end_ms,
            ],
            separators=(",", ":"),
        )

    @classmethod
    def loads(cls, text: str) -> PeriodState:
        p, tz, dur, roll, base, anchor, start, end = json.loads(text)
        return cls(p, tz or None, dur, roll, base, anchor, start, end)

    @classmethod
    def new(cls, period: str, timezone: str | None, rollover: str, base: int, now_ms: int) -> PeriodState:
        p, dur = parse_period(period, timezone)
        if rollover not in ROLLOVER_POLICIES:
            raise InvalidRequest(f"rollover_policy must be one of {', '.join(ROLLOVER_POLICIES)}")
        tz = None if dur else (timezone or "UTC")
        start, end = window(p, tz, dur, now_ms, now_ms)
        return cls(p, tz, dur, rollover, base, now_ms, start, end)

    def same_spec(self, other: PeriodState) -> bool:
        return (self.period, self.timezone, self.duration_ms) == (other.period, other.timezone, other.duration_ms)

    def next_window(self, now_ms: int) -> tuple[int, int]:
        return window(self.period, self.timezone, self.duration_ms, self.anchor_ms, now_ms)

    def periods_passed(self, new_start: int) -> int:
        """How many boundaries lie between the stored period and the one starting at ``new_start``."""
        if self.duration_ms:
            return max(1, (new_start - self.start_ms) // self.duration_ms)
        n, end = 1, self.end_ms
        while end < new_start and n < _MAX_SKIPPED:
            _, end = window(self.period, self.timezone, 0, 0, end)
            n += 1
        return n

    def describe(self) -> dict[str, Any]:
        return {
            "period": self.period,
            "timezone": self.timezone,
            "rollover_policy": self.rollover,
            "period_start": iso(self.start_ms),
            "period_end": iso(self.end_ms),
        }


def meta_key(scope: str, unit: str) -> str:
    return f"period|{scope}|{unit}"


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


def rollover(
    state: PeriodState, new_start: int, new_end: int, allocated: int, spent: int, debt: int
) -> tuple[int, int, int]:
    """The new (allocated, spent, debt) at the start of the period [new_start, new_end); updates
    ``state`` to it. Reserved is untouched: holds carry across the boundary.

    However many boundaries lie in between, the result is what crossing them one at a time gives
    (``roll.lua`` mirrors this): each period's allocation repays debt first, so a budget nobody
    touched for a while ends the same whether or not anyone looked at it in between."""
    steps = state.periods_passed(new_start)
    base, policy = state.base, state.rollover
    if steps and debt:  # the first boundary: what the ended period left unused may carry
        allocated = base + _carry(policy, base, allocated - spent - debt)
        spent = min(debt, allocated)
        debt -= spent
        steps -= 1
    if steps and debt and base:  # later ones: nothing is unused while in debt; each allocation repays
        full = min(steps, debt // base)
        if full:
            allocated, spent, debt, steps = base, base, debt - full * base, steps - full
        if steps and debt:  # less than an allocation left: the next one repays it
            allocated, spent, debt, steps = base, debt, 0, steps - 1
    elif steps and debt:  # no allocation: later periods have nothing, and the debt stays
        allocated, spent, steps = 0, 0, 0
    if steps and not debt:  # the remaining boundaries, debt-free, in closed form
        first = base + _carry(policy, base, allocated - spent)
        if policy == "CARRY_FORWARD":
            allocated = first + (steps - 1) * base
        elif policy == "CAP_AT_ALLOCATED":
            allocated = first if steps == 1 else base + min(first, base)
        else:
            allocated = base
        spent = 0
    state.start_ms, state.end_ms = new_start, new_end
    return allocated, spent, debt


def _carry(policy: str, base: int, unused: int) -> int:
    """What one boundary carries into the next period's allocation."""
    if policy == "NONE":
        return 0
    unused = max(0, unused)
    return min(unused, base) if policy == "CAP_AT_ALLOCATED" else unused


@dataclass(slots=True, frozen=True)
class PeriodSpec:
    """What ``Ledger.set_budget`` is asked for: a period, its time zone, the rollover policy
    (build it with ``spec``). ``PeriodSpec(None)`` removes the budget's period."""

    period: str | None
    timezone: str | None = None
    rollover_policy: str | None = None

    def state(self, base: int, now_ms: int) -> PeriodState | None:
        if self.period is None:
            return None
        return PeriodState.new(self.period, self.timezone, self.rollover_policy or "NONE", base, now_ms)


def spec(period: str | None, timezone: str | None, rollover_policy: str | None) -> PeriodSpec | None:
    """The ``set_budget`` arguments as a spec: ``period=None`` keeps the stored period (``timezone`` and
    ``rollover_policy`` then need one), ``"none"`` removes it. Validated here, before any write."""
    if period is None:
        if timezone is not None or rollover_policy is not None:
            raise InvalidRequest("timezone and rollover_policy need a period (hour, day, week, month or e.g. 12h)")
        return None
    if period.strip().lower() == "none":
        return PeriodSpec(None)
    parse_period(period, timezone)
    if rollover_policy is not None and rollover_policy not in ROLLOVER_POLICIES:
        raise InvalidRequest(f"rollover_policy must be one of {', '.join(ROLLOVER_POLICIES)}")
    return PeriodSpec(period, timezone, rollover_policy)
