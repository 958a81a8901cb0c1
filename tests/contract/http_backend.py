"""The contract suite over HTTP: a real ``cycles serve`` app (uvicorn in a thread) and a client.

Protocol v0 binds an API key to one tenant, while the contract tests use several tenants through
one ``Cycles`` object. ``TenantRoutedLedger`` is the test-side answer: it mints a key per tenant
through the server's admin plane and sends each request with the key of the tenant it concerns --
exactly what a multi-tenant gateway in front of Cycles would do. Everything on the wire is the
spec's; nothing here reaches into the server.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Sequence
from typing import Any

from cycles.ledger.base import BalanceQuery, Ledger, ReservationQuery
from cycles.ledger.counters import CounterPage, CounterQuery, CounterReset, CounterResetRequest
from cycles.ledger.funding import FundingOperation, FundingResult
from cycles.ledger.http import HttpLedger
from cycles.ledger.periods import PeriodSpec
from cycles.ledger.quotas import PolicyEdit, ScopePolicy
from cycles.models import (
    Amount,
    Balance,
    BalanceResponse,
    Caps,
    CommitRequest,
    CommitResponse,
    DecisionRequest,
    DecisionResponse,
    EventCreateRequest,
    EventCreateResponse,
    ReleaseRequest,
    ReleaseResponse,
    ReservationCreateRequest,
    ReservationCreateResponse,
    ReservationDetail,
    ReservationExtendRequest,
    ReservationExtendResponse,
    ReservationListResponse,
    Unit,
)
from cycles.shadow import ShadowEvent, ShadowStore, shadow_store_for

ADMIN_KEY = "contract-admin-key-0123456789abcdef"
DEFAULT_TENANT = "acme"


class _RoutedShadowStore(ShadowStore):
    """Shadow events written with the key of their tenant, read with the admin key."""

    def __init__(self, ledger: TenantRoutedLedger) -> None:
        self._ledger = ledger
        self._admin = shadow_store_for(ledger.admin)

    def append(self, events: Sequence[ShadowEvent]) -> None:
        for event in events:
            shadow_store_for(self._ledger._client(event.tenant)).append([event])

    def scan(self, *, tenant: str | None = None, since_ms: int = 0, until_ms: int | None = None) -> list[ShadowEvent]:
        return self._admin.scan(tenant=tenant, since_ms=since_ms, until_ms=until_ms)


class TenantRoutedLedger(Ledger):
    def __init__(self, url: str, admin_key: str = ADMIN_KEY) -> None:
        self.url = url
        self._admin_key = admin_key
        self.admin = HttpLedger(url, admin_key=admin_key)
        self._core = self.admin._core  # the operator (cy.policies, ...) finds the admin key here
        self._clients: dict[str, HttpLedger] = {}
        self._owner: dict[str, str] = {}
        self._lock = threading.Lock()

    def _client(self, tenant: str | None) -> HttpLedger:
        tenant = tenant or DEFAULT_TENANT
        with self._lock:
            client = self._clients.get(tenant)
            if client is None:
                request = urllib.request.Request(
                    self.url + "/admin/keys",
                    data=json.dumps({"tenant": tenant}).encode(),
                    headers={"X-Admin-API-Key": self._admin_key, "Content-Type": "application/json"},
                    method="POST",
                )
                with urllib.request.urlopen(request, timeout=10) as resp:
                    api_key = json.loads(resp.read())["api_key"]
                client = self._clients[tenant] = HttpLedger(self.url, api_key=api_key)
            return client

    def shadow_store(self) -> ShadowStore:
        return _RoutedShadowStore(self)

    def _owner_of(self, reservation_id: str) -> str | None:
        tenant = self._owner.get(reservation_id)
        if tenant is None:
            try:  # the spec lets an admin key read any reservation: learn whose it is
                tenant = self.admin.get_reservation(reservation_id).subject.tenant
            except Exception:  # noqa: BLE001 - unknown or expired: let the tenant call report it
                return None
        return tenant

    # runtime plane, routed by tenant
    def reserve(self, req: ReservationCreateRequest, *, tenant: str | None = None) -> ReservationCreateResponse:
        response = self._client(req.subject.tenant).reserve(req)
        if response.reservation_id and req.subject.tenant:
            self._owner[response.reservation_id] = req.subject.tenant
        return response

    def commit(self, reservation_id: str, req: CommitRequest, *, tenant: str | None = None) -> CommitResponse:
        return self._client(self._owner_of(reservation_id)).commit(reservation_id, req)

    def release(self, reservation_id: str, req: ReleaseRequest, *, tenant: str | None = None) -> ReleaseResponse:
        return self._client(self._owner_of(reservation_id)).release(reservation_id, req)

    def extend(
        self, reservation_id: str, req: ReservationExtendRequest, *, tenant: str | None = None
    ) -> ReservationExtendResponse:
        return self._client(self._owner_of(reservation_id)).extend(reservation_id, req)

    def decide(self, req: DecisionRequest, *, tenant: str | None = None) -> DecisionResponse:
        return self._client(req.subject.tenant).decide(req)

    def event(self, req: EventCreateRequest, *, tenant: str | None = None) -> EventCreateResponse:
        return self._client(req.subject.tenant).event(req)

    def balances(self, query: BalanceQuery, *, tenant: str | None = None) -> BalanceResponse:
        return self._client(query.tenant).balances(query)

    def get_reservation(self, reservation_id: str, *, tenant: str | None = None) -> ReservationDetail:
        return self._client(self._owner_of(reservation_id)).get_reservation(reservation_id)

    def list_reservations(self, query: ReservationQuery, *, tenant: str | None = None) -> ReservationListResponse:
        return self._client(query.tenant).list_reservations(query)

    # operator plane, with the admin key
    def set_budget(
        self,
        scope: str,
        amount: Amount,
        *,
        overdraft_limit: Amount | None = None,
        caps: Caps | None = None,
        period: PeriodSpec | None = None,
    ) -> Balance:
        return self.admin.set_budget(
            scope,
            amount,
            overdraft_limit=overdraft_limit,
            caps=caps,
            period=period,
        )

    def fund_budget(self, scope: str, amount: Amount) -> Balance:
        return self.admin.fund_budget(scope, amount)

    def set_overdraft_limit(self, scope: str, limit: Amount) -> Balance:
        return self.admin.set_overdraft_limit(scope, limit)

    def fund(
        self,
        scope: str,
        unit: Unit,
        operation: FundingOperation | str,
        amount: Amount,
        *,
        spent: Amount | None = None,
        idempotency_key: str | None = None,
    ) -> FundingResult:
        return self.admin.fund(scope, unit, operation, amount, spent=spent, idempotency_key=idempotency_key)

    def set_budget_status(self, scope: str, status: str, *, unit: Unit | None = None) -> list[Balance]:
        return self.admin.set_budget_status(scope, status, unit=unit)

    def delete_budget(self, scope: str, *, unit: Unit | None = None, force: bool = False) -> list[Balance]:
        return self.admin.delete_budget(scope, unit=unit, force=force)

    def get_budget(self, scope: str, *, unit: Unit | None = None) -> Balance:
        return self.admin.get_budget(scope, unit=unit)

    def list_budgets(self, *, tenant: str | None = None) -> list[Balance]:
        return self.admin.list_budgets(tenant=tenant)

    def sweep(self, limit: int = 1000) -> int:
        return self.admin.sweep(limit)

    def update_policy(self, scope: str, edit: PolicyEdit) -> ScopePolicy:
        return self.admin.update_policy(scope, edit)

    def list_policies(self, *, tenant: str | None = None) -> list[ScopePolicy]:
        return self.admin.list_policies(tenant=tenant)

    # quota counters: the spec's admin endpoints (the admin key reads any tenant, tenant_id given)
    def list_quota_counters(self, query: CounterQuery, *, tenant: str | None = None) -> CounterPage:
        return self.admin.list_quota_counters(query)

    def reset_quota_counter(self, req: CounterResetRequest, *, tenant: str | None = None) -> CounterReset:
        return self.admin.reset_quota_counter(req)

    def close(self) -> None:
        for client in [self.admin, *self._clients.values()]:
            client.close()


def start_server(ledger_url: str, **ledger_options: Any) -> Any:
    """A real ``cycles serve`` app over ``ledger_url`` in a uvicorn thread (readiness-probed).
    ``ledger_options`` (a ``clock``, for one) open the served ledger in this process."""
    from cycles.ledger.base import ThreadedAsyncLedger, open_ledger
    from cycles.server import create_app
    from cycles.server.testing import ServerThread

    if not ledger_options:
        return ServerThread(create_app(ledger_url, admin_key=ADMIN_KEY, access_log=False)).start()
    ledger = ThreadedAsyncLedger(open_ledger(ledger_url, include_balances=True, **ledger_options))
    app = create_app(ledger=ledger, keys_url=ledger_url, admin_key=ADMIN_KEY, access_log=False)
    return ServerThread(app).start()
