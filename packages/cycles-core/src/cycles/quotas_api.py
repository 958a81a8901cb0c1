"""``cy.quotas``: action quotas and action-kind access on scopes (see ``cycles.ledger.quotas``).

    cy.quotas.set("tenant:acme", action_kind="tool.email", max_calls=5, window="per_run")
    cy.quotas.set("tenant:acme", risk_class="external_side_effect", max_calls=50, window="per_hour_tumbling")
    cy.quotas.deny_kinds("tenant:acme/agent:intern", ["code.deploy"])
    cy.quotas.list(tenant="acme"); cy.quotas.get(...); cy.quotas.delete(...)
    cy.quotas.counters("acme", window="per_run", run_id="run-42")   # live counters (ActionQuotaState)
    cy.quotas.counters_page("acme", limit=50, cursor=None)          # one page, with its next_cursor

Resetting a counter is an audited operator action: ``cy.operator.quota_counters.reset(...)`` (or
``cycles quotas reset``), which also emits the spec's ``quota.counter_reset`` event.

The edits are built here once; ``Quotas`` and ``AsyncQuotas`` only send them.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from cycles.errors import InvalidRequest, NotFound, describe_validation_error
from cycles.ledger.base import AsyncLedger, Ledger
from cycles.ledger.counters import CounterPage, CounterQuery, CounterState
from cycles.ledger.quotas import PolicyEdit, Quota, ScopePolicy
from cycles.scopes import parse_scope, scope_tenant

__all__ = ["AsyncQuotas", "Quotas"]

_List = list  # shadowed by the ``list`` methods below


def _quota(action_kind: str | None, risk_class: str | None, window: str, **fields: Any) -> Quota:
    try:
        return Quota.model_validate({"action_kind": action_kind, "risk_class": risk_class, "window": window, **fields})
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc)) from None


def _selector(action_kind: str | None, risk_class: str | None, window: str) -> Quota:
    return _quota(action_kind, risk_class, window, max_calls=1)


def _find(policies: _List[ScopePolicy], scope: str, selector: Quota) -> Quota:
    for p in policies:
        if p.scope == scope:
            for q in p.quotas:
                if (q.target, q.window) == (selector.target, selector.window):
                    return q
    raise NotFound(f"no {selector.target} {selector.window} quota on {scope}", details={"scope": scope})


def _tenant_of(scope: str) -> str | None:
    parse_scope(scope)
    return scope_tenant(scope)


def _quotas(policies: _List[ScopePolicy], scope: str | None) -> _List[Quota]:
    return [q for p in policies if scope is None or p.scope == scope for q in p.quotas]


def _policy(policies: _List[ScopePolicy], scope: str) -> ScopePolicy:
    return next((p for p in policies if p.scope == scope), ScopePolicy(scope=scope))


def _counter_query(tenant: str, **filters: Any) -> CounterQuery:
    try:
        return CounterQuery.model_validate({"tenant": tenant, **filters})
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc)) from None


def _loop_edit(max_repeats: int | None, window: str) -> PolicyEdit:
    loop: dict[str, Any] | str = "off" if max_repeats is None else {"max_repeats": max_repeats, "window": window}
    try:
        return PolicyEdit.model_validate({"loop_guard": loop})
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc)) from None


def _observe_edit(mode: str) -> PolicyEdit:
    try:
        return PolicyEdit.model_validate({"observe_mode": mode})
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc)) from None


class Quotas:
    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    def set(
        self,
        scope: str,
        *,
        max_calls: int,
        window: str,
        action_kind: str | None = None,
        risk_class: str | None = None,
        **options: Any,
    ) -> Quota:
        """Set (or replace) the quota on ``action_kind`` or ``risk_class`` for ``window`` on ``scope``.
        ``options``: per_run_counter_ttl_ms, host_allowlist, recipient_domain_allowlist,
        resource_type_allowlist, threshold_pct (a server announces quota.threshold_approaching there)."""
        quota = _quota(action_kind, risk_class, window, max_calls=max_calls, **options)
        policy = self._ledger.update_policy(scope, PolicyEdit(set_quota=quota))
        return _find([policy], scope, quota)

    def get(self, scope: str, *, window: str, action_kind: str | None = None, risk_class: str | None = None) -> Quota:
        policies = self._ledger.list_policies(tenant=_tenant_of(scope))
        return _find(policies, scope, _selector(action_kind, risk_class, window))

    def list(self, scope: str | None = None, *, tenant: str | None = None) -> _List[Quota]:
        if scope is not None:
            tenant = _tenant_of(scope)
        return _quotas(self._ledger.list_policies(tenant=tenant), scope)

    def delete(self, scope: str, *, window: str, action_kind: str | None = None, risk_class: str | None = None) -> None:
        self._ledger.update_policy(scope, PolicyEdit(delete_quota=_selector(action_kind, risk_class, window)))

    def policy(self, scope: str) -> ScopePolicy:
        """Everything set on ``scope``: quotas and allowed/denied action kinds."""
        return _policy(self._ledger.list_policies(tenant=_tenant_of(scope)), scope)

    def allow_kinds(self, scope: str, kinds: _List[str]) -> ScopePolicy:
        """Only these action kinds may run under ``scope`` (``[]`` lifts the allowlist)."""
        return self._ledger.update_policy(scope, PolicyEdit(allowed_action_kinds=kinds))

    def deny_kinds(self, scope: str, kinds: _List[str]) -> ScopePolicy:
        """These action kinds never run under ``scope`` (``[]`` lifts the denylist)."""
        return self._ledger.update_policy(scope, PolicyEdit(denied_action_kinds=kinds))

    def set_loop_guard(self, scope: str, max_repeats: int | None, *, window: str = "per_run") -> ScopePolicy:
        """Deny a step once the same action with the same arguments fingerprint (see
        ``with_args_fingerprint``) ran ``max_repeats`` times in a run (or ``window``); ``None``: off."""
        return self._ledger.update_policy(scope, _loop_edit(max_repeats, window))

    def set_observe_mode(self, tenant_scope: str, mode: str) -> ScopePolicy:
        """The tenant's default observe mode: ``OBSERVE`` (evaluate, record, never block or charge),
        ``ENFORCE`` (default) or ``DISABLED``. A reservation's own ``observe_mode`` overrides it."""
        return self._ledger.update_policy(tenant_scope, _observe_edit(mode))

    def counters_page(self, tenant: str, **filters: Any) -> CounterPage:
        """One page of ``tenant``'s live quota counters in name order. Filters: scope (a prefix),
        action_kind (``"__risk__"``: the risk-class ones), window, run_id, include_zero, cursor, limit."""
        return self._ledger.list_quota_counters(_counter_query(tenant, **filters))

    def counters(self, tenant: str, **filters: Any) -> _List[CounterState]:
        """Every live counter of ``tenant`` matching the filters (all pages)."""
        out: _List[CounterState] = []
        cursor = None
        while True:
            page = self.counters_page(tenant, **filters, cursor=cursor, limit=200)
            out += page.counters
            if not page.has_more:
                return out
            cursor = page.next_cursor


class AsyncQuotas:
    def __init__(self, ledger: AsyncLedger) -> None:
        self._ledger = ledger

    async def set(
        self,
        scope: str,
        *,
        max_calls: int,
        window: str,
        action_kind: str | None = None,
        risk_class: str | None = None,
        **options: Any,
    ) -> Quota:
        quota = _quota(action_kind, risk_class, window, max_calls=max_calls, **options)
        policy = await self._ledger.update_policy(scope, PolicyEdit(set_quota=quota))
        return _find([policy], scope, quota)

    async def get(
        self, scope: str, *, window: str, action_kind: str | None = None, risk_class: str | None = None
    ) -> Quota:
        policies = await self._ledger.list_policies(tenant=_tenant_of(scope))
        return _find(policies, scope, _selector(action_kind, risk_class, window))

    async def list(self, scope: str | None = None, *, tenant: str | None = None) -> _List[Quota]:
        if scope is not None:
            tenant = _tenant_of(scope)
        return _quotas(await self._ledger.list_policies(tenant=tenant), scope)

    async def delete(
        self, scope: str, *, window: str, action_kind: str | None = None, risk_class: str | None = None
    ) -> None:
        await self._ledger.update_policy(scope, PolicyEdit(delete_quota=_selector(action_kind, risk_class, window)))

    async def policy(self, scope: str) -> ScopePolicy:
        return _policy(await self._ledger.list_policies(tenant=_tenant_of(scope)), scope)

    async def allow_kinds(self, scope: str, kinds: _List[str]) -> ScopePolicy:
        return await self._ledger.update_policy(scope, PolicyEdit(allowed_action_kinds=kinds))

    async def deny_kinds(self, scope: str, kinds: _List[str]) -> ScopePolicy:
        return await self._ledger.update_policy(scope, PolicyEdit(denied_action_kinds=kinds))

    async def set_loop_guard(self, scope: str, max_repeats: int | None, *, window: str = "per_run") -> ScopePolicy:
        return await self._ledger.update_policy(scope, _loop_edit(max_repeats, window))

    async def set_observe_mode(self, tenant_scope: str, mode: str) -> ScopePolicy:
        return await self._ledger.update_policy(tenant_scope, _observe_edit(mode))

    async def counters_page(self, tenant: str, **filters: Any) -> CounterPage:
        return await self._ledger.list_quota_counters(_counter_query(tenant, **filters))

    async def counters(self, tenant: str, **filters: Any) -> _List[CounterState]:
        out: _List[CounterState] = []
        cursor = None
        while True:
            page = await self.counters_page(tenant, **filters, cursor=cursor, limit=200)
            out += page.counters
            if not page.has_more:
                return out
            cursor = page.next_cursor
