"""The action-kinds spec's operations as operator groups (``cycles.operator``): the kind registry
and the live action quota counters, on a server or in process on any local ledger.

    op = cy.operator
    op.action_kinds.list(risk_class="high_risk")          # GET /v1/action-kinds (every page)
    op.action_kinds.get("message.email.send")             # GET /v1/action-kinds/{kind}
    op.quota_counters.list("acme", window="per_run", run_id="run-42")
    op.quota_counters.reset("acme", "tenant:acme", "message.email.send", "per_run", "run-42",
                            reason="double-counted after incident 7")   # audited, quota.counter_reset

Results are the spec's JSON (ActionKind, ActionQuotaState, ActionQuotaCounterResetResponse).
"""

from __future__ import annotations

from typing import Any

from cycles.flows import Call, Flow, Group, Json, S, operation, pages

__all__ = ["ActionKinds", "QuotaCounters"]


def _present(params: dict[str, Any]) -> Json:
    return {k: ("true" if v is True else v) for k, v in params.items() if v is not None and v is not False}


class ActionKinds(Group[S]):
    @operation
    def list(self, /, *, risk_class: str | None = None, deprecated: bool = False) -> Flow[list[Json]]:
        """The built-in kinds in registry order (deprecated ones only with ``deprecated=True``)."""
        params = _present({"risk_class": risk_class, "deprecated": deprecated})
        return (yield from pages("/v1/action-kinds", "kinds", params, None))

    @operation
    def get(self, kind: str) -> Flow[Json]:
        """One kind, exact match (``NotFound`` otherwise)."""
        from urllib.parse import quote

        result: Json = yield Call("GET", "/v1/action-kinds/" + quote(kind, safe=""))
        return result


class QuotaCounters(Group[S]):
    @operation
    def list(
        self,
        /,
        tenant_id: str,
        *,
        scope: str | None = None,
        action_kind: str | None = None,
        window: str | None = None,
        run_id: str | None = None,
        include_zero: bool = False,
        limit: int | None = None,
    ) -> Flow[list[Json]]:
        """``listActionQuotaCounters``: the tenant's live counters in name order (every page, or
        the first ``limit``). ``scope`` is a prefix; ``action_kind="__risk__"`` the risk-class ones."""
        params = _present(
            {
                "tenant_id": tenant_id,
                "scope": scope,
                "action_kind": action_kind,
                "window": window,
                "run_id": run_id,
                "include_zero": include_zero,
            }
        )
        return (yield from pages("/v1/admin/action-quota-counters", "counters", params, limit))

    @operation
    def reset(
        self,
        tenant_id: str,
        scope: str,
        action_kind: str,
        window: str,
        window_key: str,
        *,
        risk_class: str | None = None,
        reason: str | None = None,
    ) -> Flow[Json]:
        """``resetActionQuotaCounter``: one counter to 0 (incident response; audited, and announced
        as a ``quota.counter_reset`` event). ``action_kind="__risk__"`` with ``risk_class`` for a
        risk-class counter; ``window_key`` as the listing shows it (run id, ``2026-04-09T14``)."""
        body = _present(
            {
                "tenant_id": tenant_id,
                "scope": scope,
                "action_kind": action_kind,
                "risk_class": risk_class,
                "window": window,
                "window_key": window_key,
                "reason": reason,
            }
        )
        result: Json = yield Call("POST", "/v1/admin/action-quota-counters/reset", json=body)
        return result
