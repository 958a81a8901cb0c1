"""Tenant-key authorisation: permissions per operation and scope filters (governance spec).

A tenant key carries ``permissions`` (the spec's ``Permission`` enum) and an optional
``scope_filter``. Each runtime operation needs one permission (``RUNTIME_PERMISSIONS``); the
admin key (``X-Admin-API-Key``) may do everything.

Scope filters. Entries are ``level:value`` segments or paths of them (``workspace:eng``,
``tenant:acme/workspace:eng``, ``agent:*``). A scope is inside the filter when, for every level the
filter names, the scope has that level with one of the named values (``*``: any value). Entries
naming the same level are alternatives: ``["workspace:eng", "workspace:ops", "agent:*"]`` admits
any agent scope under either workspace. A key with a filter sees only budgets, balances and
reservations inside it, and may reserve only for subjects inside it.
"""

from __future__ import annotations

from collections.abc import Iterable

from cycles.errors import InvalidRequest
from cycles.models import Subject
from cycles.scopes import LEVELS, derive_scopes
from cycles.server.keys import DEFAULT_PERMISSIONS

__all__ = [
    "ALL_PERMISSIONS",
    "EVENT_TYPES",
    "RUNTIME_PERMISSIONS",
    "capabilities",
    "check_scope_filter",
    "scope_allowed",
    "subject_allowed",
]

ALL_PERMISSIONS: tuple[str, ...] = (
    *DEFAULT_PERMISSIONS,  # the runtime, budgets and policies: the default for a new tenant key
    "webhooks:read",
    "webhooks:write",
    "events:read",
    "admin:read",
    "admin:write",
    "admin:tenants:read",
    "admin:tenants:write",
    "admin:budgets:read",
    "admin:budgets:write",
    "admin:policies:read",
    "admin:policies:write",
    "admin:apikeys:read",
    "admin:apikeys:write",
    "admin:webhooks:read",
    "admin:webhooks:write",
    "admin:events:read",
    "admin:audit:read",
    "action_quotas:read",  # governance extensions v0.1.26: GET /v1/admin/action-quota-counters
)

#: The spec's EventType enum.
EVENT_TYPES: frozenset[str] = frozenset(
    {
        "budget.created",
        "budget.updated",
        "budget.funded",
        "budget.debited",
        "budget.reset",
        "budget.reset_spent",
        "budget.debt_repaid",
        "budget.frozen",
        "budget.unfrozen",
        "budget.closed",
        "budget.closed_via_tenant_cascade",
        "budget.threshold_crossed",
        "budget.exhausted",
        "budget.over_limit_entered",
        "budget.over_limit_exited",
        "budget.debt_incurred",
        "budget.burn_rate_anomaly",
        "reservation.denied",
        "reservation.denial_rate_spike",
        "reservation.expired",
        "reservation.expiry_rate_spike",
        "reservation.commit_overage",
        "reservation.released_via_tenant_cascade",
        "tenant.created",
        "tenant.updated",
        "tenant.suspended",
        "tenant.reactivated",
        "tenant.closed",
        "tenant.settings_changed",
        "webhook.created",
        "webhook.updated",
        "webhook.paused",
        "webhook.resumed",
        "webhook.disabled",
        "webhook.deleted",
        "webhook.disabled_via_tenant_cascade",
        "api_key.created",
        "api_key.revoked",
        "api_key.revoked_via_tenant_cascade",
        "api_key.expired",
        "api_key.permissions_changed",
        "api_key.auth_failed",
        "api_key.auth_failure_rate_spike",
        "policy.created",
        "policy.updated",
        "policy.deleted",
        "system.store_connection_lost",
        "system.store_connection_restored",
        "system.high_latency",
        "system.webhook_delivery_failed",
        "system.webhook_test",
        "quota.counter_reset",  # protocol extensions v0.1.26
        "quota.threshold_approaching",
    }
)

#: runtime route ("METHOD path") -> the permission a tenant key needs for it.
RUNTIME_PERMISSIONS: dict[str, str] = {
    "POST /v1/reservations": "reservations:create",
    "POST /v1/decide": "reservations:create",
    "POST /v1/events": "reservations:create",
    "POST /v1/reservations/{reservation_id}/commit": "reservations:commit",
    "POST /v1/reservations/{reservation_id}/release": "reservations:release",
    "POST /v1/reservations/{reservation_id}/extend": "reservations:extend",
    "GET /v1/reservations": "reservations:list",
    "GET /v1/reservations/{reservation_id}": "reservations:list",
    "GET /v1/balances": "balances:read",
}


def _segments(entries: Iterable[str]) -> dict[str, frozenset[str]]:
    allowed: dict[str, set[str]] = {}
    for entry in entries:
        for part in entry.split("/"):
            level, _, value = part.partition(":")
            allowed.setdefault(level, set()).add(value)
    return {k: frozenset(v) for k, v in allowed.items()}


def check_scope_filter(entries: Iterable[str]) -> tuple[str, ...]:
    """Validate a scope filter (400 on a malformed entry); return it as a tuple."""
    out = tuple(entries)
    if len(out) > 64:
        raise InvalidRequest("scope_filter has more than 64 entries")
    for entry in out:
        if not isinstance(entry, str) or not entry or len(entry) > 1024:
            raise InvalidRequest("scope_filter entries are non-empty strings like 'workspace:eng'")
        for part in entry.split("/"):
            level, sep, value = part.partition(":")
            if not sep or level not in LEVELS or not value or len(value) > 128:
                raise InvalidRequest(
                    f"scope_filter entry {entry[:64]!r}: each part is level:value (or level:*), "
                    f"level one of {', '.join(LEVELS)}"
                )
    return out


def scope_allowed(scope_filter: tuple[str, ...], scope: str) -> bool:
    """Whether the budget scope ``scope`` (``tenant:acme/workspace:eng``) is inside the filter."""
    if not scope_filter:
        return True
    have = dict(part.partition(":")[::2] for part in scope.split("/"))
    for level, values in _segments(scope_filter).items():
        value = have.get(level)
        if value is None or ("*" not in values and value not in values):
            return False
    return True


def subject_allowed(scope_filter: tuple[str, ...], subject: Subject) -> bool:
    if not scope_filter:
        return True
    scopes = derive_scopes(subject)
    return bool(scopes) and scope_allowed(scope_filter, scopes[-1])


_RUNTIME = ("reservations:create", "reservations:commit", "reservations:release", "reservations:extend")
#: The spec's NORMATIVE derivation table (AuthIntrospectResponse.capabilities) for tenant keys.
_CAPABILITIES: dict[str, tuple[str, ...]] = {
    "view_budgets": ("budgets:read", "admin:read", "admin:budgets:read"),
    "view_policies": ("policies:read", "admin:read", "admin:policies:read"),
    "view_webhooks": ("webhooks:read", "admin:read", "admin:webhooks:read"),
    "view_events": ("events:read", "admin:read", "admin:events:read"),
    "view_reservations": ("reservations:list", *_RUNTIME, "admin:read"),
    "manage_budgets": ("budgets:write", "admin:write", "admin:budgets:write"),
    "manage_policies": ("policies:write", "admin:write", "admin:policies:write"),
    "manage_webhooks": ("webhooks:write", "admin:write", "admin:webhooks:write"),
    "manage_reservations": (*_RUNTIME, "admin:write"),
}
#: Admin-plane capabilities: always false for a tenant key, whatever admin:* it carries.
_ADMIN_ONLY = ("view_overview", "view_audit", "view_tenants", "view_api_keys", "manage_tenants", "manage_api_keys")


def capabilities(permissions: Iterable[str] | None) -> dict[str, bool]:
    """``AuthIntrospectResponse.capabilities``; ``None`` means the admin key (all true)."""
    if permissions is None:
        return dict.fromkeys((*_CAPABILITIES, *_ADMIN_ONLY), True)
    have = set(permissions)
    out = {cap: any(p in have for p in needs) for cap, needs in _CAPABILITIES.items()}
    out.update(dict.fromkeys(_ADMIN_ONLY, False))
    return out
