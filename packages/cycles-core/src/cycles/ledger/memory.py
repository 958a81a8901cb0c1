"""``memory://``: one process, dicts under a lock. Fast, and gone when the process exits.

Writes go to a per-transaction buffer and are applied only when the operation returns, so an
unexpected exception half-way through an operation leaves the store as it was.
"""

from __future__ import annotations

import bisect
import heapq
import json
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from pydantic import BaseModel

from cycles.errors import CyclesError
from cycles.ledger import rules
from cycles.ledger.base import TransactionalLedger
from cycles.ledger.limits import DEFAULT_LIMITS, TenantLimits, limits_from_query
from cycles.ledger.paging import ReservationScan, sorted_after
from cycles.ledger.rules import BudgetRow, IdempotencyRecord, ReservationRow
from cycles.models import Action, CommitOveragePolicy, ReservationStatus, Subject, Unit

__all__ = ["MemoryLedger", "open_memory"]

T = TypeVar("T")

_IdemKey = tuple[str, str, str]
#: A finished reservation as stored: strings, numbers and tuples of them only, which the garbage
#: collector stops tracking, so a retention window of finished rows costs it nothing to walk.
_Packed = tuple[Any, ...]
#: An idempotency record as stored: (fingerprint digest, response JSON, created_at_ms), untracked too.
_PackedRecord = tuple[str, Any, int]


_json_of: dict[tuple[Any, ...], str] = {}


def _model_json(model: Subject | Action) -> str:
    """A subject's or action's JSON, memoised by value: agents reuse a handful of each."""
    if isinstance(model, Subject):
        dims = model.dimensions
        key: tuple[Any, ...] = (
            model.tenant, model.workspace, model.app, model.workflow, model.agent, model.toolset,
            None if dims is None else tuple(dims.items()),
        )  # fmt: skip
    else:
        key = (model.kind, model.name, None if model.tags is None else tuple(model.tags))
    found = _json_of.get(key)
    if found is None:
        if len(_json_of) >= 4096:  # bounded, as scopes' derivation cache
            _json_of.clear()
        found = _json_of[key] = model.model_dump_json(exclude_none=True)
    return found


def _pack(row: ReservationRow) -> _Packed:
    return (
        row.reservation_id, row.tenant, row.status.value, _model_json(row.subject),
        _model_json(row.action), row.unit.value, row.amount, tuple(row.budgeted_scopes),
        tuple(row.affected_scopes), row.created_at_ms, row.expires_at_ms, row.grace_period_ms,
        row.overage_policy.value, row.idempotency_key, row.committed, row.finalized_at_ms, row.extensions,
        None if row.metadata is None else json.dumps(row.metadata, separators=(",", ":")),
        None if row.committed_metadata is None else json.dumps(row.committed_metadata, separators=(",", ":")),
    )  # fmt: skip


def _unpack(p: _Packed) -> ReservationRow:
    return ReservationRow(
        p[0], p[1], ReservationStatus(p[2]), Subject.model_validate_json(p[3]), Action.model_validate_json(p[4]),
        Unit(p[5]), p[6], list(p[7]), list(p[8]), p[9], p[10], p[11], CommitOveragePolicy(p[12]), p[13], p[14],
        p[15], p[16], None if p[17] is None else json.loads(p[17]), None if p[18] is None else json.loads(p[18]),
    )  # fmt: skip


def settled_fields(stored: ReservationRow | _Packed) -> tuple[str | None, str, str, int | None, int | None]:
    """(owner, status, unit, committed, finalized_at_ms) of a stored row, packed or live, without
    unpacking it (what an aggregate over every row, such as the dashboard's spend chart, needs)."""
    if isinstance(stored, ReservationRow):
        return stored.tenant, stored.status.value, stored.unit.value, stored.committed, stored.finalized_at_ms
    return stored[1], stored[2], stored[5], stored[14], stored[15]


def _live(stored: ReservationRow | _Packed) -> ReservationRow:
    return stored if isinstance(stored, ReservationRow) else _unpack(stored)


class _Store:
    def __init__(self) -> None:
        self.budgets: dict[tuple[str, Unit], BudgetRow] = {}
        self.units: dict[str, list[Unit]] = {}
        self.reservations: dict[str, ReservationRow | _Packed] = {}  # ACTIVE rows live, finished ones packed
        self.idempotency: dict[_IdemKey, _PackedRecord] = {}
        self.deadlines: list[tuple[int, str]] = []  # heap of (deadline_ms, reservation_id); stale entries skipped
        self.finished: deque[tuple[int, str]] = deque()  # (finished_at_ms, reservation_id), oldest first
        # Indexes for O(page) reads. Reservations: sorted (created_at_ms, id) per owner and for all;
        # purged ids are left in place and skipped until a compaction (when half are dead).
        self.by_owner: dict[str | None, list[tuple[int, str]]] = {}
        self.by_time: list[tuple[int, str]] = []
        self.dead_keys = 0
        # Budgets: sorted (scope, unit) per tenant and for all.
        self.budget_keys: dict[str | None, list[tuple[str, str]]] = {}
        self.all_budget_keys: list[tuple[str, str]] = []
        self.active: dict[str | None, int] = {}  # ACTIVE reservations per owner
        self.active_total = 0
        self.meta: dict[str, str] = {}  # rules.Txn.get_meta: periods, quota rules and counters

    def index_reservation(self, row: ReservationRow) -> None:
        key = (row.created_at_ms, row.reservation_id)
        for keys in (self.by_owner.setdefault(row.tenant, []), self.by_time):
            if not keys or keys[-1] < key:
                keys.append(key)  # the usual case: time moves forward
            else:
                bisect.insort(keys, key)

    def forget_reservation(self, rid: str) -> None:
        if self.reservations.pop(rid, None) is not None:
            self.dead_keys += 1
            if self.dead_keys > 1024 and self.dead_keys * 2 > len(self.by_time):
                live = self.reservations
                self.by_time = [k for k in self.by_time if k[1] in live]
                self.by_owner = {
                    owner: kept for owner, keys in self.by_owner.items() if (kept := [k for k in keys if k[1] in live])
                }
                self.dead_keys = 0


class _MemoryTxn:
    __slots__ = (
        "_budgets",
        "_deleted",
        "_idem",
        "_meta",
        "_popped",
        "_reservations",
        "_store",
        "include_balances",
        "limits",
        "now_ms",
    )

    def __init__(
        self, store: _Store, now_ms: int, include_balances: bool, limits: TenantLimits = DEFAULT_LIMITS
    ) -> None:
        self._store = store
        self.now_ms = now_ms
        self.include_balances = include_balances
        self.limits = limits
        self._budgets: dict[tuple[str, Unit], BudgetRow] = {}
        self._deleted: set[tuple[str, Unit]] = set()  # budgets this transaction deletes
        self._reservations: dict[str, ReservationRow] = {}
        self._idem: dict[_IdemKey, _PackedRecord] = {}
        self._popped: list[tuple[int, str]] = []
        self._meta: dict[str, str | None] = {}

    # budgets
    def get_budget(self, scope: str, unit: Unit) -> BudgetRow | None:
        key = (scope, unit)
        row = self._budgets.get(key)
        if row is None:
            if key in self._deleted:
                return None
            stored = self._store.budgets.get(key)
            if stored is None:
                return None
            row = self._budgets[key] = stored.copy()
        return row

    def get_budgets(self, scopes: Sequence[str], unit: Unit) -> list[BudgetRow]:
        rows = []
        for scope in scopes:
            row = self.get_budget(scope, unit)
            if row is not None:
                rows.append(row)
        return rows

    def budget_units(self, scope: str) -> list[Unit]:
        units = set(self._store.units.get(scope, ()))
        units.update(u for (s, u) in self._budgets if s == scope)
        units.difference_update(u for (s, u) in self._deleted if s == scope)
        return sorted(units, key=lambda u: u.value)  # the order SQLite and Redis report

    def put_budget(self, row: BudgetRow) -> None:
        self._budgets[(row.scope, row.unit)] = row
        self._deleted.discard((row.scope, row.unit))

    def delete_budget(self, scope: str, unit: Unit) -> None:
        self._budgets.pop((scope, unit), None)
        self._deleted.add((scope, unit))

    def iter_budgets(self, tenant: str | None, all_tenants: bool) -> Iterator[BudgetRow]:
        merged = {**self._store.budgets, **self._budgets}
        for key, row in merged.items():
            if key in self._deleted:
                continue
            if all_tenants or row.tenant == tenant:
                yield row

    def page_budgets(self, tenant: str | None, all_tenants: bool, after: tuple[str, str] | None) -> Iterator[BudgetRow]:
        store = self._store
        keys = store.all_budget_keys if all_tenants else store.budget_keys.get(tenant, [])
        for i in sorted_after(keys, False, after):
            scope, unit = keys[i]
            row = store.budgets.get((scope, Unit(unit)))
            if row is not None:
                yield row

    # reservations
    def get_reservation(self, reservation_id: str) -> ReservationRow | None:
        row = self._reservations.get(reservation_id)
        if row is None:
            stored = self._store.reservations.get(reservation_id)
            if stored is None:
                return None
            row = self._reservations[reservation_id] = (
                stored.copy() if isinstance(stored, ReservationRow) else _unpack(stored)
            )
        return row

    def put_reservation(self, row: ReservationRow) -> None:
        self._reservations[row.reservation_id] = row

    def iter_reservations(self, tenant: str | None, all_tenants: bool) -> Iterator[ReservationRow]:
        for reservation_id, stored in list(self._store.reservations.items()):
            owner = stored.tenant if isinstance(stored, ReservationRow) else stored[1]
            if all_tenants or owner == tenant:
                row = self.get_reservation(reservation_id)
                if row is not None:
                    yield row
        for reservation_id, row in list(self._reservations.items()):
            if reservation_id not in self._store.reservations and (all_tenants or row.tenant == tenant):
                yield row

    def page_reservations(self, scan: ReservationScan) -> Iterator[ReservationRow]:
        store = self._store
        keys = store.by_time if scan.all_tenants else store.by_owner.get(scan.tenant, [])
        statuses = scan.statuses
        for i in sorted_after(keys, scan.descending, scan.after):
            row = store.reservations.get(keys[i][1])
            if row is None:
                continue
            status = row.status if isinstance(row, ReservationRow) else ReservationStatus(row[2])
            if statuses is None or status in statuses:
                yield _live(row)

    def active_reservations(self, owner: str | None) -> int:
        return self._store.active.get(owner, 0)

    def due_reservations(
        self, now_ms: int, limit: int, tenant: str | rules.AllTenants | None = rules.ALL_TENANTS
    ) -> list[str]:
        heap = self._store.deadlines
        due: list[str] = []
        others: list[tuple[int, str]] = []  # another tenant's: back on the heap, untouched
        while heap and heap[0][0] < now_ms and len(due) < limit and len(others) < 4 * limit:
            entry = heapq.heappop(heap)
            row = self._store.reservations.get(entry[1])
            live = (
                isinstance(row, ReservationRow)
                and row.status is ReservationStatus.ACTIVE
                and row.deadline_ms == entry[0]
            )
            mine = isinstance(tenant, rules.AllTenants) or (isinstance(row, ReservationRow) and row.tenant == tenant)
            if live and not mine:
                others.append(entry)
                continue
            self._popped.append(entry)
            if live:
                due.append(entry[1])
        for entry in others:
            heapq.heappush(heap, entry)
        return due

    # idempotency
    def get_idempotency(self, tenant: str, endpoint: str, key: str) -> IdempotencyRecord | None:
        k = (tenant, endpoint, key)
        found = self._idem.get(k) or self._store.idempotency.get(k)
        return None if found is None else IdempotencyRecord(*found)

    def put_idempotency(self, tenant: str, endpoint: str, key: str, record: IdempotencyRecord) -> None:
        # Kept as a digest string and JSON bytes, like the SQLite store: records live for the whole
        # retention window, and live model objects there would be ~14 more objects per guarded
        # step for the garbage collector to walk (measured: a quarter of the step's time).
        fingerprint = record.fingerprint if isinstance(record.fingerprint, str) else record.fingerprint.digest
        response = record.response
        body = response.model_dump_json(exclude_none=True).encode() if isinstance(response, BaseModel) else response
        self._idem[(tenant, endpoint, key)] = (fingerprint, body, record.created_at_ms)

    def purge(self, older_than_ms: int, limit: int) -> int:
        """Forget the oldest records first. Both queues are in time order (dict insertion order for
        idempotency records), so the work is proportional to what is forgotten, not to the store."""
        store = self._store
        purged = 0
        idem = store.idempotency
        while idem and purged < limit:
            key = next(iter(idem))
            if idem[key][2] >= older_than_ms:
                break
            del idem[key]
            purged += 1
        finished = store.finished
        while finished and purged < limit and finished[0][0] < older_than_ms:
            _, rid = finished.popleft()
            if rid not in self._reservations:
                store.forget_reservation(rid)
            purged += 1
        return purged

    # meta
    def get_meta(self, keys: Sequence[str]) -> dict[str, str]:
        stored, own = self._store.meta, self._meta
        if not stored and not own:
            return {}
        out = {}
        for key in keys:
            value = own[key] if key in own else stored.get(key)
            if value is not None:
                out[key] = value
        return out

    def put_meta(self, key: str, value: str | None) -> None:
        self._meta[key] = value

    def scan_meta(self, prefix: str, limit: int | None = None, *, after: str | None = None) -> list[tuple[str, str]]:
        merged = {**self._store.meta, **self._meta}
        found = sorted(
            (k, v) for k, v in merged.items() if v is not None and k.startswith(prefix) and (after is None or k > after)
        )
        return found if limit is None else found[:limit]

    # end of transaction
    def apply(self) -> None:
        store = self._store
        for meta_key, value in self._meta.items():
            if value is None:
                store.meta.pop(meta_key, None)
            else:
                store.meta[meta_key] = value
        for key, budget in self._budgets.items():
            if key not in store.budgets:
                store.units.setdefault(key[0], []).append(key[1])
                index = (key[0], key[1].value)
                bisect.insort(store.budget_keys.setdefault(budget.tenant, []), index)
                bisect.insort(store.all_budget_keys, index)
            store.budgets[key] = budget
        for key in self._deleted:
            gone = store.budgets.pop(key, None)
            if gone is None:
                continue
            units = store.units[key[0]]
            units.remove(key[1])
            if not units:
                del store.units[key[0]]
            index = (key[0], key[1].value)
            for keys in (store.budget_keys[gone.tenant], store.all_budget_keys):
                del keys[bisect.bisect_left(keys, index)]
            if not store.budget_keys[gone.tenant]:
                del store.budget_keys[gone.tenant]
        active = store.active
        for reservation_id, row in self._reservations.items():
            stored = store.reservations.get(reservation_id)
            live = stored if isinstance(stored, ReservationRow) else None  # packed rows are finished
            was_active = live is not None and live.status is ReservationStatus.ACTIVE
            if row.status is ReservationStatus.ACTIVE:
                store.reservations[reservation_id] = row
                if stored is None:
                    active[row.tenant] = active.get(row.tenant, 0) + 1
                    store.active_total += 1
                if live is None or live.deadline_ms != row.deadline_ms:
                    heapq.heappush(store.deadlines, (row.deadline_ms, reservation_id))
            elif was_active or stored is None:
                store.reservations[reservation_id] = _pack(row)  # finished: kept compact until purged
            if stored is None:
                store.index_reservation(row)
            if was_active and row.status is not ReservationStatus.ACTIVE:
                store.finished.append((self.now_ms, reservation_id))
                store.active_total -= 1
                left = active.get(row.tenant, 1) - 1
                if left:
                    active[row.tenant] = left
                else:
                    active.pop(row.tenant, None)
        store.idempotency.update(self._idem)

    def undo(self) -> None:
        for entry in self._popped:
            heapq.heappush(self._store.deadlines, entry)


class MemoryLedger(TransactionalLedger):
    blocking = False

    #: memory:// keeps finished reservations and idempotency records for an hour (SQLite and Redis: a
    #: day): the store lives in the process's heap, where every retained object also costs GC time.
    DEFAULT_RETENTION_MS = 3600 * 1000
    #: Purging here is in-process and proportional to what is forgotten, so a sweep may do more per
    #: second and keep up with a busy process.
    lazy_sweep_limit = 1000

    def __init__(
        self,
        clock: Callable[[], int] | None = None,
        include_balances: bool = False,
        retention_ms: int = DEFAULT_RETENTION_MS,
        limits: TenantLimits = DEFAULT_LIMITS,
    ) -> None:
        super().__init__(clock, include_balances, retention_ms, limits)
        self.url = "memory://"
        self._store = _Store()
        self._lock = threading.Lock()

    def count_active(self) -> int:
        return self._store.active_total

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[_MemoryTxn]:
        with self._lock:
            txn = _MemoryTxn(self._store, self._clock(), self.include_balances, self.limits)
            try:
                yield txn
            except CyclesError:
                txn.apply()  # a refusal still keeps the expiries it discovered
                raise
            except BaseException:
                txn.undo()
                raise
            txn.apply()

    def _write(self, fn: Callable[..., T], *args: Any) -> T:
        # The base class's contextmanager costs more than this whole in-memory transaction: inline it.
        with self._lock:
            txn = _MemoryTxn(self._store, self._clock(), self.include_balances, self.limits)
            try:
                self._housekeeping(txn, fn)
                result = fn(txn, *args)
            except CyclesError:
                txn.apply()
                raise
            except BaseException:
                txn.undo()
                raise
            txn.apply()
            return result


def open_memory(
    url: str = "memory://",
    *,
    clock: Callable[[], int] | None = None,
    include_balances: bool = False,
    retention_ms: int = MemoryLedger.DEFAULT_RETENTION_MS,
    limits: TenantLimits | None = None,
) -> MemoryLedger:
    """``memory://``, with limits as query options (``memory://?max_active_reservations=100``)."""
    query = {k: v[-1] for k, v in parse_qs(urlsplit(url).query).items()}
    return MemoryLedger(
        clock=clock,
        include_balances=include_balances,
        retention_ms=retention_ms,
        limits=limits or limits_from_query(query),
    )
