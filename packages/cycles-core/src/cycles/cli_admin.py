"""``cycles tenants | api-keys | budgets | webhooks | events | audit``: the governance plane on
the command line, on any ledger (``--ledger URL``; for a server ``--ledger http://host:7878
--admin-key KEY`` or ``$CYCLES_ADMIN_KEY``). Each command is the spec's operation through
``cycles.operator.Operator``, so it is audited like a call to the server.

    cycles tenants create acme --name "Acme Corp"
    cycles api-keys create --tenant acme --name support-bot --scope-filter workspace:support \\
        --permission reservations:create --permission reservations:commit --permission balances:read
    cycles budgets create tenant:acme/workspace:support 100 --period-start 2026-12-01T00:00:00Z
    cycles webhooks create --tenant acme --url https://oncall.example/cycles \\
        --event budget.threshold_crossed --threshold 0.8
    cycles events --tenant acme --type budget.threshold_crossed
    cycles audit --operation createApiKey,revokeApiKey --format csv > audit.csv

``--json`` prints the spec's JSON; ``events`` and ``audit`` also export ``--format jsonl|csv``.
The options every command takes (``--ledger``, ``--json``, ``--admin-key``, ...), the one-line
errors and the exit statuses are ``cycles.cli``'s; state-changing actions refuse ``memory://``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from cycles.cli import (
    _int_between,
    _non_negative_int,
    admin_key,
    ledger_url,
    open_cycles,
    refuse_memory,
    render_table,
)

__all__ = ["add_admin_commands"]

# Actions that change state: refused on memory://, where the change would die with the command.
_CHANGES = {
    "tenants": {"create", "update", "suspend", "reactivate", "close"},
    "api-keys": {"create", "revoke"},
    "budgets": {"create", "fund", "freeze", "unfreeze"},
    "webhooks": {"create", "delete", "test", "enable", "pause", "replay"},
    "policies": {"create", "update", "disable", "enable"},  # cli_policies.py
}

WHEN_BUDGETS = (
    "The governance spec's budget operations, each written to the audit log and announced as an event: "
    "create (fails if the budget exists), fund with CREDIT, DEBIT, RESET, RESET_SPENT or REPAY_DEBT, "
    "freeze/unfreeze with a --reason, a budget's period_start/period_end. For everyday budgets "
    "(create-or-set, caps, overdraft, recurring periods, close, every unit of a scope) use 'cycles budget'; "
    "both act on the same budgets."
)
WHEN_API_KEYS = (
    "API keys of the governance spec: permissions (e.g. balances:read only), scope filters "
    "(workspace:prod), an expiry, a revocation reason, validation, all audited. 'cycles keys create "
    "--tenant T' is the quick form (the default permissions, no filter, no expiry); both commands see "
    "the same keys."
)


def _utilisation(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"a utilisation is more than 0 and at most 1 (0.8 is 80%), got {text}")
    return value


_UNIT = "usd (default), tokens, credits, risk"
_SCOPE = "budget id, e.g. tenant:acme or tenant:acme/workspace:support"


def add_admin_commands(sub: Any, parents: Sequence[argparse.ArgumentParser]) -> None:
    """Register the governance commands on the ``cycles`` parser's subparsers; ``parents`` carries
    the options every command takes (``cycles.cli``'s common parser)."""
    parents = list(parents)

    def group(name: str, help_text: str, description: str | None = None) -> Any:
        p = sub.add_parser(name, parents=parents, help=help_text, description=description or help_text)
        return p, p.add_subparsers(dest="admin_action", required=True, metavar="ACTION")

    def action(actions: Any, name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = actions.add_parser(name, parents=parents, help=help_text, description=help_text)
        return p

    t, ts = group("tenants", "tenants as objects (governance): create, list, show, update, suspend, reactivate, close")
    p = action(ts, "create", "register a tenant")
    p.add_argument("tenant_id", help="the tenant's id, as in scopes (tenant:ID)")
    p.add_argument("--name", required=True, help="display name")
    p.add_argument("--parent", default=None, help="parent tenant id")
    p = action(ts, "list", "all tenants")
    p.add_argument(
        "--status",
        default=None,
        type=str.upper,
        choices=["ACTIVE", "SUSPENDED", "CLOSED"],
        help="only tenants in this status",
    )
    for name, help_text in (
        ("show", "one tenant"),
        ("suspend", "refuse the tenant's new reservations (existing ones settle)"),
        ("reactivate", "make a suspended tenant active again"),
        ("close", "close a tenant for good: releases reservations, closes budgets, revokes keys (irreversible)"),
    ):
        p = action(ts, name, help_text)
        p.add_argument("tenant_id", help="the tenant's id")
    p = action(ts, "update", "rename a tenant")
    p.add_argument("tenant_id", help="the tenant's id")
    p.add_argument("--name", required=True, help="the new display name")
    t.set_defaults(handler=_tenants)

    k, ks = group(
        "api-keys", "API keys with permissions, scope filters, expiry (quick tenant keys: see 'keys')", WHEN_API_KEYS
    )
    p = action(ks, "create", "a new key (the secret is printed once, on stdout)")
    p.add_argument("--tenant", required=True, help="the tenant the key acts for")
    p.add_argument("--name", required=True, help="a label to tell keys apart")
    p.add_argument(
        "--permission",
        action="append",
        default=None,
        metavar="PERMISSION",
        help="e.g. balances:read, reservations:create (repeatable; default: the spec's tenant set)",
    )
    p.add_argument(
        "--scope-filter",
        action="append",
        default=None,
        metavar="LEVEL:VALUE",
        help="limit the key to scopes inside this, e.g. workspace:prod (repeatable)",
    )
    p.add_argument("--expires", default=None, metavar="DATETIME", help="expiry, ISO 8601 (default: never)")
    p = action(ks, "list", "keys (never the secrets)")
    p.add_argument("--tenant", default=None, help="only this tenant's keys")
    p.add_argument(
        "--status",
        default=None,
        type=str.upper,
        choices=["ACTIVE", "REVOKED", "EXPIRED"],
        help="only keys in this status",
    )
    p = action(ks, "revoke", "revoke a key")
    p.add_argument("key_id", help="the key_id printed by api-keys create / list")
    p.add_argument("--reason", default=None, help="recorded in the audit log")
    p = action(ks, "validate", "check a key secret (exit 1 if it is not valid)")
    p.add_argument("key_secret", help="the secret printed by api-keys create")
    k.set_defaults(handler=_keys)

    b, bs = group("budgets", "audited governance budget operations (everyday budgets: see 'budget')", WHEN_BUDGETS)
    p = action(bs, "create", "a new budget (fails if it exists)")
    p.add_argument("scope", help=_SCOPE)
    p.add_argument("amount", help="the allocation, e.g. 100 or 0.25 in usd, 10000 in tokens")
    p.add_argument("--unit", default="usd", help=_UNIT)
    p.add_argument("--overdraft-limit", default=None, metavar="AMOUNT", help="debt a commit may run up (same unit)")
    p.add_argument("--period-start", default=None, metavar="DATETIME", help="start of the budget's period, ISO 8601")
    p.add_argument("--period-end", default=None, metavar="DATETIME", help="end of the budget's period, ISO 8601")
    p = action(bs, "list", "budgets (of a tenant)")
    p.add_argument("--tenant", default=None, help="only this tenant's budgets")
    p = action(bs, "show", "one budget in one unit")
    p.add_argument("scope", help=_SCOPE)
    p.add_argument("--unit", default="usd", help=_UNIT)
    p = action(
        bs,
        "fund",
        "CREDIT (add), DEBIT (take away), RESET (set the allocation), RESET_SPENT (a new billing period: "
        "set the allocation, spent back to 0 or --spent) or REPAY_DEBT (pay off debt)",
    )
    p.add_argument("scope", help=_SCOPE)
    p.add_argument("amount", help="the amount of the operation, in --unit")
    p.add_argument("--unit", default="usd", help=_UNIT)
    p.add_argument(
        "--operation",
        default="CREDIT",
        type=str.upper,
        choices=["CREDIT", "DEBIT", "RESET", "RESET_SPENT", "REPAY_DEBT"],
        help="what to do with the amount (default CREDIT)",
    )
    p.add_argument(
        "--spent", default=None, metavar="AMOUNT", help="RESET_SPENT only: the spend the new period starts with"
    )
    p.add_argument(
        "--idempotency-key", default=None, metavar="KEY", help="run again with the same key: applied once only"
    )
    p.add_argument("--reason", default=None, help="recorded in the audit log")
    for name, help_text in (
        ("freeze", "refuse new reservations, commits and funding until unfrozen"),
        ("unfreeze", "make a frozen budget active again"),
    ):
        p = action(bs, name, help_text)
        p.add_argument("scope", help=_SCOPE)
        p.add_argument("--unit", default="usd", help=_UNIT)
        p.add_argument("--reason", default=None, help="recorded in the audit log")
    b.set_defaults(handler=_budgets)

    w, ws = group("webhooks", "webhook subscriptions: create, list, show, delete, test, deliveries, replay")
    p = action(ws, "create", "subscribe a URL (prints the signing secret once, on stdout)")
    p.add_argument(
        "--url", required=True, help="where events are POSTed (https:// unless webhooks security allows http)"
    )
    p.add_argument(
        "--event",
        action="append",
        required=True,
        metavar="TYPE",
        help="event type, e.g. budget.threshold_crossed (repeatable)",
    )
    p.add_argument("--category", action="append", default=None, help="event category, e.g. budget (repeatable)")
    p.add_argument("--tenant", default=None, help="owning tenant (default: system-wide)")
    p.add_argument(
        "--threshold",
        action="append",
        type=_utilisation,
        default=None,
        metavar="FRACTION",
        help="extra utilisation alert, e.g. 0.8 for 80%% (repeatable)",
    )
    p.add_argument("--scope-filter", default=None, help="only events of scopes matching this, e.g. tenant:acme/*")
    p = action(ws, "list", "subscriptions")
    p.add_argument("--tenant", default=None, help="only this tenant's subscriptions")
    for name, help_text in (
        ("show", "one subscription"),
        ("delete", "delete a subscription"),
        ("test", "send it a test event"),
        ("deliveries", "its delivery log"),
        ("enable", "make a paused or disabled subscription active"),
        ("pause", "stop deliveries until enabled"),
    ):
        p = action(ws, name, help_text)
        p.add_argument("subscription_id", help="as printed by webhooks create / list")
    p = action(ws, "security", "show or change the URL rules (https only, blocked ranges, allowed patterns)")
    p.add_argument(
        "--allow-http",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="allow http:// URLs (development only)",
    )
    p.add_argument(
        "--blocked",
        action="append",
        default=None,
        metavar="CIDR",
        help="a range webhook hosts may not resolve into (repeatable; replaces the list)",
    )
    p.add_argument(
        "--allowed-pattern",
        action="append",
        default=None,
        metavar="GLOB",
        help="a glob URLs must match (repeatable; replaces the list)",
    )
    p = action(ws, "replay", "re-deliver past events")
    p.add_argument("subscription_id", help="as printed by webhooks create / list")
    p.add_argument("--since", default=None, metavar="DATETIME", help="from this time, ISO 8601 or epoch ms")
    p.add_argument("--until", default=None, metavar="DATETIME", help="up to this time, ISO 8601 or epoch ms")
    p.add_argument("--event", action="append", default=None, metavar="TYPE", help="only this event type (repeatable)")
    w.set_defaults(handler=_webhooks)

    e = sub.add_parser("events", parents=parents, help="governance events, newest first (filters, --format jsonl|csv)")
    e.add_argument("--tenant", default=None, help="only this tenant's events")
    e.add_argument("--type", default=None, help="event type, e.g. budget.threshold_crossed")
    e.add_argument("--category", default=None, help="event category, e.g. budget")
    e.add_argument("--scope", default=None, help="scope prefix, e.g. tenant:acme/workspace:support")
    e.add_argument("--correlation-id", default=None, help="events of one operation, e.g. tenant_close:acme")
    _stream_args(e)
    e.set_defaults(handler=_events)

    a = sub.add_parser("audit", parents=parents, help="the audit log, newest first (filters, --format jsonl|csv)")
    a.add_argument("--tenant", default=None, help="tenant id, or __admin__ for operator calls")
    a.add_argument("--key-id", default=None, help="calls made with this API key")
    a.add_argument(
        "--operation", default=None, help="spec operation ids, comma-separated, e.g. createBudget,fundBudget"
    )
    a.add_argument("--resource-type", default=None, help="e.g. tenant, budget, api_key, webhook")
    a.add_argument("--resource-id", default=None, help="one resource's id")
    a.add_argument(
        "--status-min", type=_int_between(100, 599), default=None, metavar="CODE", help="HTTP status at least this"
    )
    a.add_argument(
        "--status-max", type=_int_between(100, 599), default=None, metavar="CODE", help="HTTP status at most this"
    )
    a.add_argument("--error-code", default=None, help="only failures with this error code")
    _stream_args(a)
    a.set_defaults(handler=_audit)


def _stream_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", default=None, metavar="DATETIME", help="from this time, ISO 8601 or epoch ms")
    p.add_argument("--until", default=None, metavar="DATETIME", help="up to this time, ISO 8601 or epoch ms")
    p.add_argument("--limit", type=_non_negative_int, default=100, help="at most this many (default 100; 0: all)")
    p.add_argument(
        "--format",
        default=None,
        choices=["table", "json", "jsonl", "csv"],
        help="output format (default table; json with --json)",
    )


# ---- handlers -------------------------------------------------------------------------------


def _operator(args: argparse.Namespace) -> Any:
    url = ledger_url(args)
    action = getattr(args, "admin_action", None)
    if action in _CHANGES.get(args.command, ()) or (action == "security" and _security_changes(args)):
        refuse_memory(url, f"cycles {args.command} {action}")
    scheme = url.split("://", 1)[0].lower()
    if scheme not in ("http", "https", "memory"):
        # In process, the server's handlers turn a store that is down into INTERNAL_ERROR (and log a
        # traceback): ask the store once first, so that is reported as LEDGER_UNAVAILABLE.
        with open_cycles(args) as cy:
            cy.records.events(limit=1)
        if os.environ.get("CYCLES_DEBUG") != "1":
            logging.getLogger("cycles.server").addHandler(logging.NullHandler())  # one line, not a log
    try:
        from cycles.operator import Operator

        return Operator(url, admin_key=admin_key(args))
    except ImportError as exc:  # the operator plane runs the server's handlers in process
        raise ImportError(
            f"cycles {args.command} needs the server extra: pip install 'cycles-core[server]' ({exc})"
        ) from exc


def _security_changes(args: argparse.Namespace) -> dict[str, Any]:
    pairs = (
        ("allow_http", args.allow_http),
        ("blocked_cidr_ranges", args.blocked),
        ("allowed_url_patterns", args.allowed_pattern),
    )
    return {k: v for k, v in pairs if v is not None}


def _table(rows: list[list[Any]], headers: list[str]) -> str:
    return render_table(headers, rows)


def _out(args: argparse.Namespace, value: Any, line: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(value, indent=2))
    else:
        print(line)


def _tenants(args: argparse.Namespace) -> int:
    with _operator(args) as op:
        a = args.admin_action
        if a == "create":
            fields = {"parent_tenant_id": args.parent} if args.parent else {}
            t = op.tenants.create(args.tenant_id, args.name, **fields)
            _out(args, t, f"tenant {t['tenant_id']} {t['status']}")
        elif a == "list":
            rows = op.tenants.list(status=args.status)
            if getattr(args, "json", False):
                print(json.dumps(rows, indent=2))
            else:
                print(_table([[r["tenant_id"], r["name"], r["status"], r["created_at"]] for r in rows],
                             ["tenant", "name", "status", "created"]) if rows else "no tenants")  # fmt: skip
        else:
            if a == "show":
                t = op.tenants.get(args.tenant_id)
            elif a == "update":
                t = op.tenants.update(args.tenant_id, name=args.name)
            else:
                t = getattr(op.tenants, a)(args.tenant_id)
            _out(args, t, f"tenant {t['tenant_id']} {t['status']} ({t['name']})")
    return 0


def _keys(args: argparse.Namespace) -> int:
    with _operator(args) as op:
        a = args.admin_action
        if a == "create":
            k = op.keys.create(
                args.tenant,
                args.name,
                permissions=args.permission,
                scope_filter=args.scope_filter,
                expires_at=args.expires,
            )
            if getattr(args, "json", False):
                print(json.dumps(k, indent=2))
            else:
                print(k["key_secret"])
                print(
                    f"key {k['key_id']} for tenant {k['tenant_id']}: {', '.join(k['permissions'])}; "
                    "shown once, store it now",
                    file=sys.stderr,
                )
        elif a == "list":
            rows = op.keys.list(tenant_id=args.tenant, status=args.status)
            if getattr(args, "json", False):
                print(json.dumps(rows, indent=2))
            else:
                cells = [
                    [r["key_id"], r["tenant_id"], r.get("name", ""), r["status"], ",".join(r.get("scope_filter", []))]
                    for r in rows
                ]
                print(_table(cells, ["key", "tenant", "name", "status", "scope filter"]) if rows else "no keys")
        elif a == "revoke":
            k = op.keys.revoke(args.key_id, reason=args.reason)
            _out(args, k, f"key {k['key_id']} {k['status']}")
        else:
            v = op.keys.validate(args.key_secret)
            _out(args, v, f"valid, tenant {v['tenant_id']}" if v["valid"] else f"invalid: {v.get('reason', '')}")
            return 0 if v["valid"] else 1
    return 0


def _budgets(args: argparse.Namespace) -> int:
    from cycles.amounts import parse_amount

    a = args.admin_action
    unit = args.unit if hasattr(args, "unit") else "usd"
    amount = parse_amount(args.amount, unit) if hasattr(args, "amount") else None  # usage errors first
    spent = parse_amount(args.spent, unit) if getattr(args, "spent", None) is not None else None
    fields: dict[str, Any] = {}
    if a == "create":
        if args.overdraft_limit:
            fields["overdraft_limit"] = parse_amount(args.overdraft_limit, unit)
        fields.update({k: v for k in ("period_start", "period_end") if (v := getattr(args, k))})
    wire_unit = parse_amount("0", unit).unit.value
    with _operator(args) as op:
        if a == "create":
            assert amount is not None
            row = op.budgets.create(args.scope, amount, **fields)
        elif a == "list":
            rows = op.budgets.list(tenant_id=args.tenant)
            if getattr(args, "json", False):
                print(json.dumps(rows, indent=2))
            else:
                cells = [
                    [r["scope"], _unit(r), r["status"], _money(r["allocated"]), _money(r["remaining"])] for r in rows
                ]
                print(_table(cells, ["scope", "unit", "status", "allocated", "remaining"]) if rows else "no budgets")
            return 0
        elif a == "show":
            row = op.budgets.lookup(args.scope, wire_unit)
        elif a == "fund":
            assert amount is not None
            res = op.budgets.fund(
                args.scope,
                args.operation,
                amount,
                spent=spent,
                reason=args.reason,
                idempotency_key=args.idempotency_key,
            )
            allocated, remaining = _money(res["new_allocated"]), _money(res["new_remaining"])
            _out(args, res, f"{res['operation']}: allocated {allocated}, remaining {remaining}")
            return 0
        else:
            row = getattr(op.budgets, a)(args.scope, wire_unit, reason=args.reason)
        allocated, remaining = _money(row["allocated"]), _money(row["remaining"])
        _out(args, row, f"{row['scope']} {_unit(row)} {row['status']}: allocated {allocated}, remaining {remaining}")
    return 0


def _unit(row: dict[str, Any]) -> str:
    from cycles.amounts import unit_name
    from cycles.models import Unit

    return unit_name(Unit(row["unit"]))


def _money(amount: dict[str, Any]) -> str:
    """A wire amount as the budget tables show it (``$1.50``, ``1,200``)."""
    from cycles.amounts import format_amount_exact
    from cycles.models import Unit

    return format_amount_exact(Unit(amount["unit"]), int(amount["amount"]))


def _webhooks(args: argparse.Namespace) -> int:
    with _operator(args) as op:
        a = args.admin_action
        if a == "create":
            fields: dict[str, Any] = {}
            if args.category:
                fields["event_categories"] = args.category
            if args.threshold:
                fields["thresholds"] = {"budget_utilization": args.threshold}
            if args.scope_filter:
                fields["scope_filter"] = args.scope_filter
            res = op.webhooks.create(args.url, args.event, tenant_id=args.tenant, **fields)
            if getattr(args, "json", False):
                print(json.dumps(res, indent=2))
            else:
                print(res["signing_secret"])
                sid = res["subscription"]["subscription_id"]
                print(f"subscription {sid}: the signing secret above is shown once", file=sys.stderr)
        elif a == "list":
            rows = op.webhooks.list(tenant_id=args.tenant)
            if getattr(args, "json", False):
                print(json.dumps(rows, indent=2))
            else:
                cells = [[r["subscription_id"], r["tenant_id"], r["status"], r["url"], ",".join(r["event_types"])]
                         for r in rows]  # fmt: skip
                print(_table(cells, ["subscription", "tenant", "status", "url", "events"]) if rows else "no webhooks")
        elif a == "deliveries":
            rows = op.webhooks.deliveries(args.subscription_id)
            if getattr(args, "json", False):
                print(json.dumps(rows, indent=2))
            else:
                cells = [
                    [r["delivery_id"], r["event_type"], r["status"], r.get("attempts", 0), r.get("response_status", "")]
                    for r in rows
                ]
                print(_table(cells, ["delivery", "event", "status", "attempts", "http"]) if rows else "no deliveries")
        elif a == "replay":
            res = op.webhooks.replay(args.subscription_id, since=args.since, until=args.until, event_types=args.event)
            _out(args, res, f"replay {res['replay_id']}: {res['events_queued']} event(s) queued")
        elif a == "security":
            res = op.webhooks.security(**_security_changes(args))
            _out(args, res, json.dumps(res))
        elif a == "delete":
            op.webhooks.delete(args.subscription_id)
            _out(args, {"deleted": args.subscription_id}, f"deleted {args.subscription_id}")
        else:
            if a in ("show", "test"):
                res = op.webhooks.get(args.subscription_id) if a == "show" else op.webhooks.test(args.subscription_id)
            else:
                res = op.webhooks.update(args.subscription_id, status="ACTIVE" if a == "enable" else "PAUSED")
            _out(args, res, json.dumps(res))
    return 0


def _stream(args: argparse.Namespace, kind: str, rows: list[dict[str, Any]], columns: list[str]) -> int:
    from cycles.ledger.records import to_csv, to_jsonl

    fmt = args.format or ("json" if getattr(args, "json", False) else "table")
    if fmt == "json":
        print(json.dumps(rows, indent=2))
    elif fmt == "jsonl":
        sys.stdout.write(to_jsonl(rows))
    elif fmt == "csv":
        sys.stdout.write(to_csv(rows, "event" if kind == "events" else "audit"))
    elif not rows:
        print(f"no {kind}")
    else:
        print(_table([[_cell(r.get(c)) for c in columns] for r in rows], columns))
    return 0


def _cell(v: Any) -> str:
    if v is None:
        return ""
    return json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else str(v)


def _events(args: argparse.Namespace) -> int:
    with _operator(args) as op:
        rows = op.events(
            limit=args.limit or None,
            tenant_id=args.tenant,
            event_type=args.type,
            category=args.category,
            scope=args.scope,
            correlation_id=args.correlation_id,
            since=args.since,
            until=args.until,
        )
    return _stream(args, "events", rows, ["timestamp", "event_type", "tenant_id", "scope", "data"])


def _audit(args: argparse.Namespace) -> int:
    with _operator(args) as op:
        rows = op.audit(
            limit=args.limit or None,
            tenant_id=args.tenant,
            key_id=args.key_id,
            operation=args.operation,
            resource_type=args.resource_type,
            resource_id=args.resource_id,
            status_min=args.status_min,
            status_max=args.status_max,
            error_code=args.error_code,
            since=args.since,
            until=args.until,
        )
    return _stream(args, "audit", rows, ["timestamp", "operation", "status", "tenant_id", "key_id", "resource_id"])
