"""``cycles shadow report`` and ``cycles dashboard``: what operators look at, plugged into the CLI.

    cycles shadow report [--tenant acme] [--since 7d] [--json] [--ledger URL]
    cycles dashboard [--ledger URL] [--port 7879] [--no-browser]

``add_ops_commands(subparsers, parents)`` adds both; each sets ``handler`` to ``(Namespace) -> int``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cycles.cli import _port, open_cycles, render_table

if TYPE_CHECKING:
    from cycles.models import Unit
    from cycles.shadow import ShadowReport

__all__ = ["add_ops_commands", "format_report"]


def add_ops_commands(subparsers: Any, parents: Sequence[argparse.ArgumentParser]) -> None:
    """Add ``shadow`` and ``dashboard``; ``parents`` carries the options every command takes
    (``cycles.cli``'s common parser: ``--ledger``, ``--json``, ``--api-key``, ``--admin-key``)."""
    parents = list(parents)
    shadow = subparsers.add_parser(
        "shadow",
        parents=parents,
        help="what shadow mode saw: the would-deny report",
        description="Shadow-mode decisions of every process on the ledger.",
    )
    actions = shadow.add_subparsers(dest="shadow_command", metavar="ACTION", required=True)
    report = actions.add_parser(
        "report",
        parents=parents,
        help="calls that would have been denied, spend prevented, peak overage, suggested budgets",
        description="Calls shadow mode would have denied, by scope, action and reason; spend prevented, "
        "peak overage and a suggested budget per scope. On an http(s):// ledger it needs --admin-key.",
    )
    report.add_argument("--tenant", default=None, help="one tenant (default: all)")
    report.add_argument("--since", default="7d", help="window: 7d, 12h, 30m, an ISO date or ms (default 7d)")
    report.set_defaults(handler=cmd_shadow_report)

    dashboard = subparsers.add_parser(
        "dashboard",
        parents=parents,
        help="open the web dashboard on this machine's ledger (needs the server extra)",
        description="Serve the dashboard on localhost over a ledger (the embedded SQLite one by default) "
        "and open it in a browser. A Cycles server (`cycles serve --admin-key ...`) serves its own at "
        "/dashboard: with --ledger http(s)://... this opens that one.",
    )
    dashboard.add_argument("--port", type=_port, default=7879, help="port on 127.0.0.1 (default 7879; 0: any free)")
    dashboard.add_argument("--no-browser", action="store_true", help="do not open a browser")
    dashboard.set_defaults(handler=cmd_dashboard)


def cmd_shadow_report(args: argparse.Namespace) -> int:
    with open_cycles(args) as cy:
        report = cy.shadow_report(tenant=args.tenant, since=args.since)
    if getattr(args, "json", False):
        print(json.dumps(report.to_wire(), indent=2))
    else:
        print(format_report(report))
    return 0


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _amt(unit: Unit, value: int | None) -> str:
    from cycles.models import Amount, trusted

    return "" if value is None else str(trusted(Amount, unit=unit, amount=value))


def format_report(report: ShadowReport) -> str:
    who = f"tenant {report.tenant}" if report.tenant else "all tenants"
    lines = [f"Shadow report, {who}, {_when(report.since_ms)} to {_when(report.until_ms)}", report.summary()]
    if report.groups:
        lines += ["", "Would have been denied (by scope, action and reason):"]
        rows = [
            [g.scope, g.action, g.reason_code, g.calls, _amt(g.unit, g.spent), _amt(g.unit, g.overspend)]
            for g in report.groups
        ]
        lines.append(render_table(["scope", "action", "reason", "calls", "spent", "past budget"], rows))
    if report.budgets:
        lines += ["", "Budgets (suggested: observed spend + 20% headroom):"]
        rows = [
            [
                b.scope,
                b.unit.value,
                _amt(b.unit, b.allocated),
                _amt(b.unit, b.spent),
                b.would_deny,
                _amt(b.unit, b.prevented),
                _amt(b.unit, b.peak_overage),
                _amt(b.unit, b.suggested),
            ]
            for b in report.budgets
        ]
        headers = ["scope", "unit", "allocated", "spent", "would-deny", "prevented", "peak overage", "suggested"]
        lines.append(render_table(headers, rows))
    return "\n".join(lines)


def cmd_dashboard(args: argparse.Namespace) -> int:
    try:
        from cycles.dashboard.standalone import run_dashboard
    except ImportError as exc:
        raise ImportError(
            f"cycles dashboard needs the server extra: pip install 'cycles-core[server]' ({exc})"
        ) from exc
    code: int = run_dashboard(getattr(args, "ledger", None), port=args.port, open_browser=not args.no_browser)
    return code
