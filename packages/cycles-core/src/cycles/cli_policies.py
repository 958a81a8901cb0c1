"""``cycles policies create | list | show | update | disable | enable``: named policies (the
governance spec's /v1/admin/policies) on the command line, through ``cycles.operator`` like the
other governance commands (``cli_admin.py``): audited, on any ledger, ``--json`` for the spec's JSON.

    cycles policies create --tenant acme --name agents --pattern 'agent:*' --priority 10 \\
        --max-tokens 4096 --deny-kind code.exec --quota http.post:100:per_hour_tumbling
    cycles policies list --tenant acme --status ACTIVE
    cycles policies update pol_... --max-reservations-per-minute 60
    cycles policies disable pol_...

Flags cover the common fields; ``--fields JSON`` sets any field of the spec's request body
(it is applied first, the flags after it).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from cycles.cli import _non_negative_int
from cycles.cli_admin import _operator, _out, _table

__all__ = ["add_policy_commands"]

_WINDOWS = "per_run, per_minute_tumbling, per_hour_tumbling, per_day_tumbling, per_tenant_per_day"


def _quota(text: str) -> dict[str, Any]:
    kind, _, rest = text.partition(":")
    limit, _, window = rest.partition(":")
    if not kind or not limit.isdigit() or not window:
        raise argparse.ArgumentTypeError(f"expected KIND:MAX_CALLS:WINDOW (window: {_WINDOWS}), got {text!r}")
    return {"action_kind": kind, "max_calls": int(limit), "window": window}


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fields is not JSON: {text[:60]!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--fields must be a JSON object")
    return value


def _field_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--priority", type=_non_negative_int, default=None, help="higher wins (default 0)")
    p.add_argument("--description", default=None, help="free text shown with the policy")
    p.add_argument("--max-tokens", type=_non_negative_int, default=None, help="caps.max_tokens")
    p.add_argument(
        "--overage",
        default=None,
        type=str.upper,
        choices=["REJECT", "ALLOW_IF_AVAILABLE", "ALLOW_WITH_OVERDRAFT"],
        help="commit overage policy of the reservations it matches",
    )
    p.add_argument("--max-ttl-ms", type=_non_negative_int, default=None, help="reservation TTL ceiling")
    p.add_argument("--max-reservations-per-minute", type=_non_negative_int, default=None, help="rate limit (429)")
    p.add_argument("--deny-kind", action="append", default=None, metavar="KIND", help="denied action kind (repeatable)")
    p.add_argument(
        "--allow-kind", action="append", default=None, metavar="KIND", help="allowed action kind (repeatable)"
    )
    p.add_argument(
        "--quota", action="append", type=_quota, default=None, metavar="KIND:MAX:WINDOW", help="action quota"
    )
    p.add_argument("--from", dest="effective_from", default=None, metavar="DATETIME", help="in force from (ISO 8601)")
    p.add_argument("--until", dest="effective_until", default=None, metavar="DATETIME", help="in force until")
    p.add_argument("--fields", type=_json_object, default=None, metavar="JSON", help="any other request fields")


def add_policy_commands(sub: Any, parents: Sequence[argparse.ArgumentParser]) -> None:
    """Register ``cycles policies`` on the ``cycles`` parser's subparsers."""
    parents = list(parents)
    g = sub.add_parser(
        "policies",
        parents=parents,
        help="named policies: create, list, show, update, disable, enable",
        description="Named policies (caps, overage policy, TTL ceiling, rate limit, action-kind lists, quotas) "
        "for the scopes a pattern matches: tenant:acme/workspace:eng, tenant:acme/*, agent:*, */agent:NAME, *.",
    )
    actions = g.add_subparsers(dest="admin_action", required=True, metavar="ACTION")

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = actions.add_parser(name, parents=parents, help=help_text, description=help_text)
        return p

    p = action("create", "create a policy")
    p.add_argument("--tenant", required=True, help="owning tenant")
    p.add_argument("--name", required=True, help="unique within the tenant")
    p.add_argument("--pattern", required=True, help="scope pattern, e.g. 'tenant:acme/*' or 'agent:*'")
    _field_args(p)
    p = action("list", "a tenant's policies")
    p.add_argument("--tenant", required=True, help="whose policies")
    p.add_argument("--status", default=None, type=str.upper, choices=["ACTIVE", "DISABLED"], help="only this status")
    p.add_argument("--pattern", default=None, help="only this exact scope_pattern")
    p.add_argument("--kind", default=None, help="only policies mentioning this action kind")
    p = action("update", "change a policy (only the fields given)")
    p.add_argument("policy_id", help="as printed by policies create / list")
    p.add_argument("--name", default=None, help="a new name (unique within the tenant)")
    _field_args(p)
    for name, help_text in (("show", "one policy"), ("disable", "stop applying it"), ("enable", "apply it again")):
        action(name, help_text).add_argument("policy_id", help="as printed by policies create / list")
    g.set_defaults(handler=_policies)


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = dict(args.fields or {})
    simple = ("priority", "description", "effective_from", "effective_until", "name")
    out.update({k: getattr(args, k) for k in simple if getattr(args, k, None) is not None})
    if args.max_tokens is not None:
        out["caps"] = {**out.get("caps", {}), "max_tokens": args.max_tokens}
    if args.overage is not None:
        out["commit_overage_policy"] = args.overage
    if args.max_ttl_ms is not None:
        out["reservation_ttl_override"] = {**out.get("reservation_ttl_override", {}), "max_ttl_ms": args.max_ttl_ms}
    if args.max_reservations_per_minute is not None:
        rate = {"max_reservations_per_minute": args.max_reservations_per_minute}
        out["rate_limits"] = {**out.get("rate_limits", {}), **rate}
    lists = (("deny_kind", "denied_action_kinds"), ("allow_kind", "allowed_action_kinds"), ("quota", "action_quotas"))
    for flag, field in lists:
        if getattr(args, flag) is not None:
            out[field] = getattr(args, flag)
    return out


def _line(p: dict[str, Any]) -> str:
    return f"{p['policy_id']} {p['status']} priority {p.get('priority', 0)} {p['scope_pattern']} ({p['name']})"


def _policies(args: argparse.Namespace) -> int:
    with _operator(args) as op:
        a = args.admin_action
        if a == "create":
            fields = _fields(args)
            res = op.policies.create(args.tenant, fields.pop("name"), args.pattern, **fields)
            _out(args, res, _line(res))
        elif a == "list":
            rows = op.policies.list(
                tenant_id=args.tenant, status=args.status, scope_pattern=args.pattern, references_action_kind=args.kind
            )
            if getattr(args, "json", False):
                print(json.dumps(rows, indent=2))
            else:
                cells = [[r["policy_id"], r["status"], r.get("priority", 0), r["scope_pattern"], r["name"]]
                         for r in rows]  # fmt: skip
                print(_table(cells, ["policy", "status", "priority", "pattern", "name"]) if rows else "no policies")
        elif a == "update":
            res = op.policies.update(args.policy_id, **_fields(args))
            _out(args, res, _line(res))
        else:
            res = {"show": op.policies.get, "disable": op.policies.disable, "enable": op.policies.enable}[a](
                args.policy_id
            )
            _out(args, res, _line(res))
    return 0
