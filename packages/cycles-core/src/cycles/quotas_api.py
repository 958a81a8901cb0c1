"""``cy.quotas``: action quotas and action-kind access on scopes (see ``cycles.ledger.quotas``).

    cy.quotas.set("tenant:acme", action_kind="tool.email", max_calls=5, window="per_run")
    cy.quotas.set("tenant:acme", risk_class="external_side_effect", max_calls=50, window="per_hour_tumbling")
    cy.quotas.deny_kinds("tenant:acme/agent:intern", ["code.deploy"])
    cy.quotas.list(tenant="acme"); cy.quotas.get(...); cy.quotas.delete(...)
    cy.quotas.counters("acme", window="per_run", run_id="run-42")   # live counters (ActionQuotaState)
    cy.quotas.counters_page("acme", limit=50, cursor=None)          # one page, with its next_cursor

Resetting a counter is an audited operator action: ``cy.operator.quota_counters.reset(...)`` (or
``cycles quotas reset``), which also emits the spec's ``quota.counter_reset`` event.

Each operation is written once, as a flow of ledger calls (``cycles.flows``): ``Quotas`` over a
``LedgerSender`` answers directly (``Cycles``), over an ``AsyncLedgerSender`` it is awaited
(``AsyncCycles``).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from cycles.errors import InvalidRequest, NotFound, describe_validation_error
from cycles.flows import Flow, Group, LedgerCall, S, operation
from cycles.ledger.counters import CounterPage, CounterQuery, CounterState
from cycles.ledger.quotas import PolicyEdit, Quota, ScopePolicy
from cycles.scopes import parse_scope, scope_tenant

__all__ = ["Quotas"]

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


def _edit(scope: str, edit: PolicyEdit) -> Flow[ScopePolicy]:
    policy: ScopePolicy = yield LedgerCall("update_policy", scope, edit)
    return policy


class Quotas(Group[S]):
    """``cy.quotas``: quotas, action-kind lists, loop guard and observe mode of scopes, and the live
    quota counters."""

    @operation
    def set(
        self,
        /,
        scope: str,
        *,
        max_calls: int,
        window: str,
        action_kind: str | None = None,
        risk_class: str | None = None,
        **options: Any,
    ) -> Flow[Quota]:
        """Set (or replace) the quota on ``action_kind`` or ``risk_class`` for ``window`` on ``scope``.
        ``options``: per_run_counter_ttl_ms, host_allowlist, recipient_domain_allowlist,
        resource_type_allowlist, threshold_pct (a server announces quota.threshold_approaching there)."""
        quota = _quota(action_kind, risk_class, window, max_calls=max_calls, **options)
        policy = yield from _edit(scope, PolicyEdit(set_quota=quota))
        return _find([policy], scope, quota)

    @operation
    def get(
        self, scope: str, *, window: str, action_kind: str | None = None, risk_class: str | None = None
    ) -> Flow[Quota]:
        policies: _List[ScopePolicy] = yield LedgerCall("list_policies", tenant=_tenant_of(scope))
        return _find(policies, scope, _selector(action_kind, risk_class, window))

    @operation
    def list(self, scope: str | None = None, *, tenant: str | None = None) -> Flow[_List[Quota]]:
        if scope is not None:
            tenant = _tenant_of(scope)
        policies: _List[ScopePolicy] = yield LedgerCall("list_policies", tenant=tenant)
        return _quotas(policies, scope)

    @operation
    def delete(
        self, scope: str, *, window: str, action_kind: str | None = None, risk_class: str | None = None
    ) -> Flow[None]:
        yield from _edit(scope, PolicyEdit(delete_quota=_selector(action_kind, risk_class, window)))

    @operation
    def policy(self, scope: str) -> Flow[ScopePolicy]:
        """Everything set on ``scope``: quotas and allowed/denied action kinds."""
        policies: _List[ScopePolicy] = yield LedgerCall("list_policies", tenant=_tenant_of(scope))
        return _policy(policies, scope)

    @operation
    def allow_kinds(self, scope: str, kinds: _List[str]) -> Flow[ScopePolicy]:
        """Only these action kinds may run under ``scope`` (``[]`` lifts the allowlist)."""
        return (yield from _edit(scope, PolicyEdit(allowed_action_kinds=kinds)))

    @operation
    def deny_kinds(self, scope: str, kinds: _List[str]) -> Flow[ScopePolicy]:
        """These action kinds never run under ``scope`` (``[]`` lifts the denylist)."""
        return (yield from _edit(scope, PolicyEdit(denied_action_kinds=kinds)))

    @operation
    def set_loop_guard(self, scope: str, max_repeats: int | None, *, window: str = "per_run") -> Flow[ScopePolicy]:
        """Deny a step once the same action with the same arguments fingerprint (see
        ``with_args_fingerprint``) ran ``max_repeats`` times in a run (or ``window``); ``None``: off."""
        return (yield from _edit(scope, _loop_edit(max_repeats, window)))

    @operation
    def set_observe_mode(self, tenant_scope: str, mode: str) -> Flow[ScopePolicy]:
        """The tenant's default observe mode: ``OBSERVE`` (evaluate, record, never block or charge),
        ``ENFORCE`` (default) or ``DISABLED``. A reservation's own ``observe_mode`` overrides it."""
        return (yield from _edit(tenant_scope, _observe_edit(mode)))

    @operation
    def counters_page(self, /, tenant: str, **filters: Any) -> Flow[CounterPage]:
        """One page of ``tenant``'s live quota counters in name order. Filters: scope (a prefix),
        action_kind (``"__risk__"``: the risk-class ones), window, run_id, include_zero, cursor, limit."""
        page: CounterPage = yield LedgerCall("list_quota_counters", _counter_query(tenant, **filters))
        return page

    @operation
    def counters(self, /, tenant: str, **filters: Any) -> Flow[_List[CounterState]]:
        """Every live counter of ``tenant`` matching the filters (all pages)."""
        out: _List[CounterState] = []
        cursor = None
        while True:
            page = yield from Quotas.counters_page.flow(self, tenant, **filters, cursor=cursor, limit=200)
            out += page.counters
            if not page.has_more:
                return out
            cursor = page.next_cursor
