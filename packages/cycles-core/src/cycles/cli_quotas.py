"""``cycles quotas counters | reset`` and ``cycles action-kinds``: the action-kinds spec's plane on
the command line.

    cycles quotas counters --tenant acme [--scope tenant:acme/workspace:ops] [--kind message.email.send]
                           [--window per_run] [--run-id run-42] [--include-zero] [--limit 50]
    cycles quotas reset --tenant acme --scope tenant:acme --kind message.email.send \\
                        --window per_run --window-key run-42 --reason "double-counted"
    cycles action-kinds [KIND] [--risk-class high_risk] [--deprecated]

Counters go through ``cycles.operator`` (on a server: ``--ledger http://... --admin-key``), so a reset
is audited and announced as a ``quota.counter_reset`` event whatever the ledger. The registry is the
spec's built-in one (``cycles.action_kinds``): no ledger needed. ``--json`` prints the spec's JSON.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from cycles.cli import _int_between, _json_wanted, ledger_url, refuse_memory, render_table
from cycles.ledger.quotas import RISK_CLASSES, WINDOWS

__all__ = ["add_quota_commands"]


def add_quota_commands(sub: Any, parents: Sequence[argparse.ArgumentParser]) -> None:
    parents = list(parents)
    q = sub.add_parser(
        "quotas",
        parents=parents,
        help="action quota counters: list the live ones, reset one (incident response)",
        description="Live action quota counters (set quotas from Python: cy.quotas.set).",
    )
    actions = q.add_subparsers(dest="admin_action", required=True, metavar="ACTION")
    c = actions.add_parser("counters", parents=parents, help="a tenant's live counters, in scope order")
    c.add_argument("--tenant", required=True, help="the tenant whose counters to list")
    c.add_argument("--scope", default=None, help="scope prefix, e.g. tenant:acme/workspace:ops")
    c.add_argument("--kind", default=None, help='action kind, or "__risk__" for risk-class counters')
    c.add_argument("--window", default=None, choices=WINDOWS, help="one window type")
    c.add_argument("--run-id", default=None, help="per_run counters of this run")
    c.add_argument("--include-zero", action="store_true", help="also counters at 0 (after a release or a reset)")
    c.add_argument("--limit", type=_int_between(1, 10_000), default=200, help="at most this many (default 200)")
    r = actions.add_parser(
        "reset",
        parents=parents,
        help="set one counter to 0 (audited; for incidents, not tuning: change the quota instead)",
    )
    r.add_argument("--tenant", required=True, help="the tenant that owns the counter")
    r.add_argument("--scope", required=True, help="the counter's scope, as the listing shows it")
    r.add_argument("--kind", required=True, help='the action kind, or "__risk__" with --risk-class')
    r.add_argument("--risk-class", default=None, choices=RISK_CLASSES, help="for a risk-class counter")
    r.add_argument("--window", required=True, choices=WINDOWS, help="the counter's window type")
    r.add_argument("--window-key", required=True, help="run id, or the UTC bucket (2026-04-09T14) as listed")
    r.add_argument("--reason", default=None, help="why (kept in the audit log and the event)")
    q.set_defaults(handler=_quotas)

    k = sub.add_parser(
        "action-kinds",
        parents=parents,
        help="the action kind registry: built-in kinds and their risk classes",
        description="The spec's built-in action kinds (what GET /v1/action-kinds serves).",
    )
    k.add_argument("kind", nargs="?", default=None, help="show one kind (exact match)")
    k.add_argument("--risk-class", default=None, choices=RISK_CLASSES, help="only kinds of this risk class")
    k.add_argument("--deprecated", action="store_true", help="include deprecated kinds")
    k.set_defaults(handler=_kinds)


def _quotas(args: argparse.Namespace) -> int:
    from cycles.cli_admin import _operator

    if args.admin_action == "reset":  # a reset on memory:// would die with the command
        refuse_memory(ledger_url(args), "cycles quotas reset")
    with _operator(args) as op:
        if args.admin_action == "counters":
            rows = op.quota_counters.list(
                args.tenant,
                scope=args.scope,
                action_kind=args.kind,
                window=args.window,
                run_id=args.run_id,
                include_zero=args.include_zero,
                limit=args.limit,
            )
            if _json_wanted(args):
                print(json.dumps(rows, indent=2))
            elif not rows:
                print("no live counters")
            else:
                print(
                    render_table(["scope", "counts", "window", "window key", "used", "limit"], [_row(r) for r in rows])
                )
            return 0
        result = op.quota_counters.reset(
            args.tenant,
            args.scope,
            args.kind,
            args.window,
            args.window_key,
            risk_class=args.risk_class,
            reason=args.reason,
        )
    if _json_wanted(args):
        print(json.dumps(result, indent=2))
    else:
        c = result["counter"]
        print(
            f"reset {_what(c)} {c['window']} {c.get('window_key', '')} on {c['scope']}: {result['previous_used']} -> 0"
        )
    return 0


def _what(c: dict[str, Any]) -> str:
    return f"__risk__:{c['risk_class']}" if c.get("risk_class") else str(c["action_kind"])


def _row(c: dict[str, Any]) -> list[Any]:
    return [c["scope"], _what(c), c["window"], c.get("window_key", ""), c["used"], c["limit"]]


def _kinds(args: argparse.Namespace) -> int:
    from cycles import action_kinds
    from cycles.errors import NotFound

    if args.kind is not None:
        kind = action_kinds.get(args.kind)
        if kind is None:
            raise NotFound(f"action kind {args.kind[:64]!r} is not in the registry (exact match only)")
        print(json.dumps(action_kinds.wire(kind), indent=2 if _json_wanted(args) else None))
        return 0
    kinds = action_kinds.kinds(risk_class=args.risk_class, deprecated=args.deprecated)
    if _json_wanted(args):
        print(json.dumps({"version": action_kinds.version(), "kinds": [action_kinds.wire(k) for k in kinds]}, indent=2))
    else:
        print(
            render_table(
                ["kind", "risk class", "description"], [[k.kind, k.risk_class, _short(k.description)] for k in kinds]
            )
        )
    return 0


def _short(text: str | None, width: int = 70) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 3] + "..."
