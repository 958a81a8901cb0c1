"""The ``cycles`` command: the demo, budget administration, balances, reservations, sweep, serve.

Every command works on ``--ledger URL`` (default ``$CYCLES_URL``, else the per-user SQLite file).
Errors print one line ``error: CODE: message`` on stderr and exit 2 for bad input, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from cycles.client import Cycles
from cycles.errors import CyclesError, InvalidRequest
from cycles.ledger.base import default_ledger_url
from cycles.models import Amount, Balance, Caps, ReservationSummary, Unit, credits, risk_points, tokens, usd

__all__ = ["main", "parse_amount", "render_table"]

_UNITS: dict[str, Callable[[Any], Amount]] = {
    "usd": usd,
    "tokens": tokens,
    "credits": credits,
    "risk": risk_points,
    "risk_points": risk_points,
}


def parse_amount(text: str, unit: str) -> Amount:
    """``"1.50"`` / ``"$1.50"`` in usd, whole numbers in tokens, credits or risk points."""
    unit = unit.lower()
    if unit not in _UNITS:
        raise InvalidRequest(f"unknown unit {unit!r}: use one of {', '.join(sorted(_UNITS))}")
    raw = text.strip().replace(",", "").removeprefix("$")
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise InvalidRequest(f"{text!r} is not a number") from None
    if not value.is_finite() or value < 0:
        raise InvalidRequest(f"amount must be a non-negative number, got {text!r}")
    if unit == "usd":
        return usd(value)
    if value != value.to_integral_value():
        raise InvalidRequest(f"{unit} are whole numbers, got {text!r}")
    return _UNITS[unit](int(value))


def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned table; numbers right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    right = [bool(cells) and all(_numeric(r[i]) for r in cells) for i in range(len(headers))]

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right, strict=True)).rstrip()

    lines = [fmt(headers), fmt(["-" * w for w in widths])]
    lines += [fmt(r) for r in cells]
    return "\n".join(lines)


def _numeric(text: str) -> bool:
    return bool(text) and (text[0].isdigit() or text[0] in "$-") and not text.startswith("-" * 2)


def _balance_rows(balances: Sequence[Balance]) -> list[list[object]]:
    rows: list[list[object]] = []
    for b in balances:
        rows.append(
            [
                b.scope,
                b.remaining.unit.value,
                b.allocated or "",
                b.spent or "",
                b.reserved or "",
                b.debt or "",
                b.remaining,
                "OVER LIMIT" if b.is_over_limit else "",
            ]
        )
    return rows


_BALANCE_HEADERS = ["scope", "unit", "allocated", "spent", "reserved", "debt", "remaining", ""]


def _print_balances(balances: Sequence[Balance], as_json: bool) -> None:
    if as_json:
        print(json.dumps([b.to_wire() for b in balances], indent=2))
    elif not balances:
        print("no budgets")
    else:
        print(render_table(_BALANCE_HEADERS, _balance_rows(balances)))


def _caps(args: argparse.Namespace) -> Caps | None:
    if args.max_tokens is None and not args.allow_tool and not args.deny_tool:
        return None
    return Caps(
        max_tokens=args.max_tokens, tool_allowlist=args.allow_tool or None, tool_denylist=args.deny_tool or None
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    from cycles.demo import run_demo

    run_demo(
        args.ledger,
        budget_usd=float(parse_amount(args.budget, "usd").amount) / 10**8,
        unguarded_seconds=args.seconds,
        latency_s=0.0 if args.fast else 0.02,
    )
    return 0


def _cmd_budget(args: argparse.Namespace) -> int:
    unit = _unit(args.unit) if getattr(args, "unit", None) else None
    with Cycles(args.ledger) as cy:
        if args.action == "set":
            overdraft = parse_amount(args.overdraft_limit, args.unit) if args.overdraft_limit else None
            balances = [
                cy.budgets.set(
                    args.scope, parse_amount(args.amount, args.unit), overdraft_limit=overdraft, caps=_caps(args)
                )
            ]
        elif args.action == "fund":
            balances = [cy.budgets.fund(args.scope, parse_amount(args.amount, args.unit))]
        elif args.action == "show":
            balances = [cy.budgets.get(args.scope, unit)] if unit else _all_units(cy, args.scope)
        elif args.action == "list":
            balances = cy.budgets.list(tenant=args.tenant)
        else:  # freeze / unfreeze / close
            balances = getattr(cy.budgets, args.action)(args.scope, unit)
        _print_balances(balances, args.json)
    return 0


def _unit(unit: str) -> Unit:
    name = {"usd": "USD_MICROCENTS", "tokens": "TOKENS", "credits": "CREDITS", "risk": "RISK_POINTS"}.get(
        unit.lower(), unit.upper()
    )
    if name not in Unit.__members__:
        raise InvalidRequest(f"unknown unit {unit!r}: use one of {', '.join(sorted(_UNITS))}")
    return Unit[name]


def _all_units(cy: Cycles, scope: str) -> list[Balance]:
    found = [b for b in cy.budgets.list() if b.scope == scope]
    if not found:
        cy.budgets.get(scope)  # raises NotFound with the standard message
    return found


def _cmd_balances(args: argparse.Namespace) -> int:
    with Cycles(args.ledger) as cy:
        balances = cy.balances(
            tenant=args.tenant,
            workspace=args.workspace,
            app=args.app,
            workflow=args.workflow,
            agent=args.agent,
            toolset=args.toolset,
        )
        _print_balances(balances, args.json)
    return 0


def _cmd_reservations(args: argparse.Namespace) -> int:
    with Cycles(args.ledger) as cy:
        filters = {k: v for k in ("tenant", "workflow", "agent") if (v := getattr(args, k))}
        page = cy.list_reservations(status=args.status, limit=args.limit, **filters)
        rows: list[ReservationSummary] = page.reservations
        if args.json:
            print(json.dumps([r.to_wire() for r in rows], indent=2))
        elif not rows:
            print("no reservations")
        else:
            print(
                render_table(
                    ["reservation", "status", "scope", "action", "reserved", "committed"],
                    [
                        [
                            r.reservation_id,
                            r.status.value,
                            r.scope_path,
                            f"{r.action.kind} {r.action.name}",
                            r.reserved,
                            r.committed or "",
                        ]
                        for r in rows
                    ],
                )
            )
            if page.has_more:
                print("(more: raise --limit, max 200)")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    with Cycles(args.ledger) as cy:
        total = 0
        while True:
            n = cy.sweep(limit=1000)
            total += n
            if n < 1000:
                break
        print(f"expired {total} reservation(s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cycles", description="Runtime budget and action authority for AI agents.")
    parser.add_argument(
        "--ledger",
        metavar="URL",
        default=None,
        help="memory://, sqlite:///path, redis://host:port/db or http(s)://host "
        f"(default: $CYCLES_URL, else {default_ledger_url()})",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="the runaway-agent demo (offline, ~10 s)")
    demo.add_argument("--budget", default="1.00", help="workflow budget in USD (default 1.00)")
    demo.add_argument("--seconds", type=float, default=3.0, help="how long the unguarded loop runs (default 3)")
    demo.add_argument("--fast", action="store_true", help="no simulated model latency")
    demo.set_defaults(handler=_cmd_demo)

    budget = sub.add_parser("budget", help="set, fund, show, list, freeze, unfreeze, close budgets")
    bsub = budget.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help_text in (
        ("set", "create a budget or change its allocation"),
        ("fund", "add funds (repays debt first)"),
    ):
        p = bsub.add_parser(name, help=help_text)
        p.add_argument("scope", help="budget id, e.g. tenant:acme/workflow:run-42")
        p.add_argument("amount", help="e.g. 50 or 1.25 (usd), 10000 (tokens)")
        p.add_argument("--unit", default="usd", help="usd (default), tokens, credits, risk")
        if name == "set":
            p.add_argument("--overdraft-limit", default=None, help="debt allowed under ALLOW_WITH_OVERDRAFT")
            p.add_argument("--max-tokens", type=int, default=None, help="cap: clamp model calls to this many tokens")
            p.add_argument("--allow-tool", action="append", default=[], help="cap: only these tools (repeatable)")
            p.add_argument("--deny-tool", action="append", default=[], help="cap: never these tools (repeatable)")
    show = bsub.add_parser("show", help="one budget")
    show.add_argument("scope")
    show.add_argument("--unit", default=None)
    lst = bsub.add_parser("list", help="all budgets (of a tenant)")
    lst.add_argument("--tenant", default=None)
    for name in ("freeze", "unfreeze", "close"):
        p = bsub.add_parser(name, help=f"{name} a budget")
        p.add_argument("scope")
        p.add_argument("--unit", default=None)
    budget.set_defaults(handler=_cmd_budget)

    balances = sub.add_parser("balances", help="balances matching a subject filter")
    for level in ("tenant", "workspace", "app", "workflow", "agent", "toolset"):
        balances.add_argument(f"--{level}", default=None)
    balances.set_defaults(handler=_cmd_balances)

    reservations = sub.add_parser("reservations", help="list reservations")
    reservations.add_argument("--tenant", default=None)
    reservations.add_argument("--workflow", default=None)
    reservations.add_argument("--agent", default=None)
    reservations.add_argument("--status", default=None, choices=["ACTIVE", "COMMITTED", "RELEASED", "EXPIRED"])
    reservations.add_argument("--limit", type=int, default=50)
    reservations.set_defaults(handler=_cmd_reservations)

    sweep = sub.add_parser("sweep", help="expire abandoned reservations now (normally done lazily)")
    sweep.set_defaults(handler=_cmd_sweep)

    from cycles.ops_cli import add_ops_commands

    add_ops_commands(sub)
    try:
        from cycles.server.cli import add_server_commands
    except ImportError:  # the server extra is not installed
        pass
    else:
        add_server_commands(sub)
        from cycles.cli_admin import add_admin_commands  # the governance plane (tenants, keys, events, ...)

        add_admin_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
        return code
    except CyclesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if exc.http_status in (400, 404, 409) else 1
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
