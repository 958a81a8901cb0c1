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
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

__all__ = ["add_admin_commands"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ledger", metavar="URL", default=argparse.SUPPRESS, help="ledger or server URL")
    p.add_argument("--admin-key", metavar="KEY", default=None, help="a server's admin key (default $CYCLES_ADMIN_KEY)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the spec's JSON")


def add_admin_commands(sub: Any) -> None:
    """Register the governance commands on the ``cycles`` parser's subparsers."""
    t = sub.add_parser("tenants", help="tenants: create, list, show, update, suspend, reactivate, close")
    ts = t.add_subparsers(dest="admin_action", required=True, metavar="ACTION")
    p = ts.add_parser("create", help="register a tenant")
    p.add_argument("tenant_id")
    p.add_argument("--name", required=True)
    p.add_argument("--parent", default=None)
    p = ts.add_parser("list", help="all tenants")
    p.add_argument("--status", default=None, choices=["ACTIVE", "SUSPENDED", "CLOSED"])
    for name in ("show", "suspend", "reactivate", "close"):
        p = ts.add_parser(name, help=f"{name} a tenant" + (" (irreversible: cascades)" if name == "close" else ""))
        p.add_argument("tenant_id")
    p = ts.add_parser("update", help="rename a tenant")
    p.add_argument("tenant_id")
    p.add_argument("--name", required=True)
    for q in ts.choices.values():
        _common(q)
    t.set_defaults(handler=_tenants)

    k = sub.add_parser("api-keys", help="API keys with permissions, scope filters, expiry: create, list, revoke")
    ks = k.add_subparsers(dest="admin_action", required=True, metavar="ACTION")
    p = ks.add_parser("create", help="a new key (printed once)")
    p.add_argument("--tenant", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--permission", action="append", default=None, help="repeatable; default: the spec's tenant set")
    p.add_argument("--scope-filter", action="append", default=None, help="e.g. workspace:prod (repeatable)")
    p.add_argument("--expires", default=None, help="ISO 8601 date-time")
    p = ks.add_parser("list", help="keys (never the secrets)")
    p.add_argument("--tenant", default=None)
    p.add_argument("--status", default=None, choices=["ACTIVE", "REVOKED", "EXPIRED"])
    p = ks.add_parser("revoke", help="revoke a key")
    p.add_argument("key_id")
    p.add_argument("--reason", default=None)
    p = ks.add_parser("validate", help="check a key secret")
    p.add_argument("key_secret")
    for q in ks.choices.values():
        _common(q)
    k.set_defaults(handler=_keys)

    b = sub.add_parser("budgets", help="budgets on the governance plane (audited): create, list, show, fund, freeze")
    bs = b.add_subparsers(dest="admin_action", required=True, metavar="ACTION")
    p = bs.add_parser("create", help="a new budget")
    p.add_argument("scope")
    p.add_argument("amount")
    p.add_argument("--unit", default="usd")
    p.add_argument("--overdraft-limit", default=None)
    p.add_argument("--period-start", default=None)
    p.add_argument("--period-end", default=None)
    p = bs.add_parser("list", help="budgets (of a tenant)")
    p.add_argument("--tenant", default=None)
    p = bs.add_parser("show", help="one budget")
    p.add_argument("scope")
    p.add_argument("--unit", default="usd")
    p = bs.add_parser("fund", help="CREDIT, DEBIT or RESET")
    p.add_argument("scope")
    p.add_argument("amount")
    p.add_argument("--unit", default="usd")
    p.add_argument("--operation", default="CREDIT", choices=["CREDIT", "DEBIT", "RESET"])
    p.add_argument("--reason", default=None)
    for name in ("freeze", "unfreeze"):
        p = bs.add_parser(name, help=f"{name} a budget")
        p.add_argument("scope")
        p.add_argument("--unit", default="usd")
        p.add_argument("--reason", default=None)
    for q in bs.choices.values():
        _common(q)
    b.set_defaults(handler=_budgets)

    w = sub.add_parser("webhooks", help="webhook subscriptions: create, list, show, delete, test, deliveries, replay")
    ws = w.add_subparsers(dest="admin_action", required=True, metavar="ACTION")
    p = ws.add_parser("create", help="subscribe a URL (prints the signing secret once)")
    p.add_argument("--url", required=True)
    p.add_argument("--event", action="append", required=True, help="event type (repeatable)")
    p.add_argument("--category", action="append", default=None)
    p.add_argument("--tenant", default=None, help="owning tenant (default: system-wide)")
    p.add_argument("--threshold", action="append", type=float, default=None, help="utilisation, e.g. 0.8")
    p.add_argument("--scope-filter", default=None, help="e.g. tenant:acme/*")
    p = ws.add_parser("list", help="subscriptions")
    p.add_argument("--tenant", default=None)
    for name in ("show", "delete", "test", "deliveries", "enable", "pause"):
        p = ws.add_parser(name, help=f"{name} a subscription")
        p.add_argument("subscription_id")
    p = ws.add_parser("security", help="show or change the URL rules (https only, blocked ranges, allowed patterns)")
    p.add_argument("--allow-http", action=argparse.BooleanOptionalAction, default=None, help="development only")
    p.add_argument("--blocked", action="append", default=None, help="CIDR webhook hosts may not resolve into")
    p.add_argument("--allowed-pattern", action="append", default=None, help="glob URLs must match (repeatable)")
    p = ws.add_parser("replay", help="re-deliver past events")
    p.add_argument("subscription_id")
    p.add_argument("--since", default=None)
    p.add_argument("--until", default=None)
    p.add_argument("--event", action="append", default=None)
    for q in ws.choices.values():
        _common(q)
    w.set_defaults(handler=_webhooks)

    e = sub.add_parser("events", help="governance events, newest first (filters, --format jsonl|csv)")
    e.add_argument("--tenant", default=None)
    e.add_argument("--type", default=None, help="event type")
    e.add_argument("--category", default=None)
    e.add_argument("--scope", default=None, help="scope prefix")
    e.add_argument("--correlation-id", default=None)
    _stream_args(e)
    e.set_defaults(handler=_events)

    a = sub.add_parser("audit", help="the audit log, newest first (filters, --format jsonl|csv)")
    a.add_argument("--tenant", default=None, help="tenant id, or __admin__ for operator calls")
    a.add_argument("--key-id", default=None)
    a.add_argument("--operation", default=None, help="e.g. createBudget,fundBudget")
    a.add_argument("--resource-type", default=None)
    a.add_argument("--resource-id", default=None)
    a.add_argument("--status-min", type=int, default=None)
    a.add_argument("--status-max", type=int, default=None)
    a.add_argument("--error-code", default=None)
    _stream_args(a)
    a.set_defaults(handler=_audit)


def _stream_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", default=None, help="ISO 8601 date-time")
    p.add_argument("--until", default=None, help="ISO 8601 date-time")
    p.add_argument("--limit", type=int, default=100, help="at most this many (0: all)")
    p.add_argument("--format", default=None, choices=["table", "json", "jsonl", "csv"])
    _common(p)


# ---- handlers -------------------------------------------------------------------------------


def _operator(args: argparse.Namespace) -> Any:
    from cycles.ledger.base import default_ledger_url
    from cycles.operator import Operator

    url = getattr(args, "ledger", None) or default_ledger_url()
    return Operator(url, admin_key=args.admin_key or os.environ.get("CYCLES_ADMIN_KEY"))


def _out(args: argparse.Namespace, value: Any, line: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(value, indent=2))
    else:
        print(line)


def _table(rows: list[list[Any]], headers: list[str]) -> str:
    from cycles.cli import render_table

    return render_table(headers, rows)


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
    from cycles.cli import parse_amount

    with _operator(args) as op:
        a = args.admin_action
        unit = parse_amount("0", args.unit).unit.value if hasattr(args, "unit") else None
        if a == "create":
            fields: dict[str, Any] = {}
            if args.overdraft_limit:
                fields["overdraft_limit"] = parse_amount(args.overdraft_limit, args.unit)
            for name in ("period_start", "period_end"):
                if getattr(args, name):
                    fields[name] = getattr(args, name)
            row = op.budgets.create(args.scope, parse_amount(args.amount, args.unit), **fields)
        elif a == "list":
            rows = op.budgets.list(tenant_id=args.tenant)
            if getattr(args, "json", False):
                print(json.dumps(rows, indent=2))
            else:
                cells = [[r["scope"], r["unit"], r["status"], r["allocated"]["amount"], r["remaining"]["amount"]]
                         for r in rows]  # fmt: skip
                print(_table(cells, ["scope", "unit", "status", "allocated", "remaining"]) if rows else "no budgets")
            return 0
        elif a == "show":
            row = op.budgets.lookup(args.scope, unit)
        elif a == "fund":
            res = op.budgets.fund(args.scope, args.operation, parse_amount(args.amount, args.unit), reason=args.reason)
            _out(args, res, f"{res['operation']}: allocated {res['new_allocated']['amount']}, "
                            f"remaining {res['new_remaining']['amount']}")  # fmt: skip
            return 0
        else:
            row = getattr(op.budgets, a)(args.scope, unit, reason=args.reason)
        _out(args, row, f"{row['scope']} {row['unit']} {row['status']}: allocated {row['allocated']['amount']}, "
                        f"remaining {row['remaining']['amount']}")  # fmt: skip
    return 0


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
            changes = {
                k: v
                for k, v in (
                    ("allow_http", args.allow_http),
                    ("blocked_cidr_ranges", args.blocked),
                    ("allowed_url_patterns", args.allowed_pattern),
                )
                if v is not None
            }
            res = op.webhooks.security(**changes)
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
