"""Events and audit records, kept in the ledger itself on every backend, bounded by retention.

The governance spec's two append-only streams live next to the budgets they describe, so the
embedded default (SQLite) has them as much as a Redis deployment does:

* **events** -- the spec's ``Event`` objects (``event_id``, ``event_type``, ``category``,
  ``timestamp``, ``tenant_id``, ``scope``, ``actor``, ``source``, ``data``, ``correlation_id``,
  ``request_id``, ``trace_id``): budget lifecycle, threshold crossings, denials, tenants, keys,
  webhooks, policies. Webhooks are dispatched from this stream.
* **audit** -- the spec's ``AuditLogEntry`` objects (``log_id``, ``timestamp``, ``tenant_id``,
  ``key_id``, ``operation``, ``resource_type``, ``resource_id``, ``request_id``, ``status``,
  ``error_code``, ``metadata`` with ``before``/``after``): one per operator action.

Records are plain ``dict`` in their wire shape (what ``GET /v1/admin/events`` returns), stored as
JSON with a few indexed columns. Ids sort by time (``evt_``/``aud_`` + 12 hex digits of epoch
milliseconds + a per-process counter + random), so "newest first" and cursors are one index walk;
the cursor is the last id returned.

A third, small part holds the governance *objects* (tenants, policies, webhook subscriptions) as
JSON documents with atomic compare-and-swap updates: ``doc_get``, ``doc_list``, ``doc_swap``,
``doc_update`` (SQLite table ``cycles_docs``; Redis hash ``<prefix>:{!records}:doc:<kind>`` with a
per-tenant id set).

Python API (``cycles.ledger.records``)::

    store = records_of(ledger)                 # the store of a ledger (cached on it), any local backend
    ev = new_event("budget.threshold_crossed", tenant_id="acme", scope="tenant:acme",
                   data={...}, actor={"type": "system"}, source="cycles-server")
    store.append(EVENTS, ev)                   # -> the record; AUDIT for audit entries
    store.get(EVENTS, ev["event_id"])          # -> dict | None
    page, cursor = store.page(EVENTS, tenant="acme", match=EventFilter(event_type="budget.exhausted"),
                              limit=50, cursor=None, ascending=False)
    for ev in store.iter(EVENTS, match=EventFilter(scope="tenant:acme")): ...   # every page
    store.purge()                              # forget records older than store.retention_ms
    store.cas("alert:tenant:acme:USD", expected=None, new="0.8")   # atomic state for alerts, leases
    store.tally("rate:denial:acme", bucket, {"denied": 1, "total": 1}, keep=10, ttl_ms=600_000)
                                               # windowed counters shared by every server: {bucket: {name: n}}
    store.trim_tenant(AUDIT, "__unauth__", keep=10_000)   # bound one tenant's share of a stream

    to_jsonl(records) / to_csv(records, kind)  # exports

From the client: ``cy.events(tenant="acme", event_type=..., since=...)`` and ``cy.audit(...)``
return lists newest first (``Cycles.events``/``Cycles.audit``).

Where they live:

* ``memory://`` -- sorted lists in the process (lost with it, like the ledger).
* ``sqlite:///path`` -- a ``cycles_records`` table (kind, id, ts_ms, tenant, body) and a
  ``cycles_kv`` table for ``cas``, in the ledger's file. Writers queue on the ledger's
  ``<db>.lock`` ``flock`` like the ledger's own transactions.
* ``redis://`` -- under ``<prefix>:{!records}:``: a score-0 sorted set of ids per stream and per
  (stream, tenant), walked with ``ZRANGE BYLEX``, and a hash id -> JSON; ``cas`` is a small Lua
  script on ``<prefix>:{!records}:kv:<key>`` strings. The ``{!records}`` hash tag keeps all of it in
  one cluster slot, apart from every tenant's.

Retention: ``retention_ms`` (default 90 days, the spec's recommended hot window) and
``max_records`` per stream (default 1,000,000). Every 1000th append (and ``purge()``) forgets the
oldest records past either bound, a bounded batch at a time.
"""

from __future__ import annotations

import abc
import bisect
import csv
import io
import itertools
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from cycles.errors import InvalidRequest, LedgerUnavailable
from cycles.ledger.sqlite import connect

try:  # POSIX; elsewhere SQLite's busy handler alone serialises writers
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "AUDIT",
    "EVENTS",
    "AuditFilter",
    "EventFilter",
    "MemoryRecordStore",
    "RecordStore",
    "RedisRecordStore",
    "SqliteRecordStore",
    "category_of",
    "iso_ms",
    "new_audit",
    "new_event",
    "parse_time",
    "records_of",
    "to_csv",
    "to_jsonl",
]

Kind = Literal["event", "audit"]
EVENTS: Kind = "event"
AUDIT: Kind = "audit"
_ID_FIELD = {EVENTS: "event_id", AUDIT: "log_id"}
_ID_PREFIX = {EVENTS: "evt_", AUDIT: "aud_"}

DEFAULT_RETENTION_MS = 90 * 24 * 3600 * 1000
DEFAULT_MAX_RECORDS = 1_000_000
_PURGE_EVERY = 1000
_PURGE_BATCH = 5000

Record = dict[str, Any]
Match = Callable[[Record], bool]

# ---- building records -----------------------------------------------------------------------

_counter = itertools.count()
_counter_lock = threading.Lock()


def _new_id(kind: Kind, now_ms: int) -> str:
    with _counter_lock:
        n = next(_counter) & 0xFFFF
    return f"{_ID_PREFIX[kind]}{now_ms:012x}{n:04x}{secrets.token_hex(6)}"


def _id_ms(record_id: str) -> int:
    return int(record_id[4:16], 16)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def iso_ms(ms: int) -> str:
    """Epoch milliseconds as the spec's ``date-time`` (UTC, millisecond precision, ``Z``)."""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value: str | int | datetime | None) -> int | None:
    """``date-time`` string, ``datetime`` or epoch ms -> epoch ms (``None`` passes through)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise InvalidRequest("a time must be an ISO 8601 date-time or epoch milliseconds")
    if isinstance(value, int):
        return value
    if isinstance(value, datetime):
        dt = value
    else:
        text = value.strip()
        if text.isdigit():
            return int(text)
        try:
            dt = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise InvalidRequest(f"{value[:64]!r} is not an ISO 8601 date-time") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def category_of(event_type: str) -> str:
    """``budget.threshold_crossed`` -> ``budget``; custom types (``custom.x.y``) -> ``system``."""
    head = event_type.split(".", 1)[0]
    return head if head in _CATEGORIES else "system"


_CATEGORIES = frozenset({"budget", "tenant", "api_key", "policy", "reservation", "system", "webhook"})


def _drop_none(d: Record) -> Record:
    return {k: v for k, v in d.items() if v is not None}


def new_event(
    event_type: str,
    *,
    tenant_id: str,
    source: str = "cycles-server",
    scope: str | None = None,
    data: Record | None = None,
    actor: Record | None = None,
    correlation_id: str | None = None,
    request_id: str | None = None,
    trace_id: str | None = None,
    metadata: Record | None = None,
    now_ms: int | None = None,
) -> Record:
    """An ``Event`` in its wire shape. System events use ``tenant_id="__system__"``."""
    ms = _now_ms() if now_ms is None else now_ms
    return _drop_none(
        {
            "event_id": _new_id(EVENTS, ms),
            "event_type": event_type,
            "category": category_of(event_type),
            "timestamp": iso_ms(ms),
            "tenant_id": tenant_id,
            "scope": scope,
            "actor": actor,
            "source": source,
            "data": data,
            "correlation_id": correlation_id,
            "request_id": request_id,
            "trace_id": trace_id,
            "metadata": metadata,
        }
    )


def new_audit(
    operation: str,
    *,
    tenant_id: str,
    status: int,
    key_id: str | None = None,
    resource_type: str | None = None,
    resource_id: str | None = None,
    request_id: str | None = None,
    trace_id: str | None = None,
    error_code: str | None = None,
    source_ip: str | None = None,
    user_agent: str | None = None,
    subject: Record | None = None,
    action: Record | None = None,
    amount: Record | None = None,
    before: Any = None,
    after: Any = None,
    metadata: Record | None = None,
    now_ms: int | None = None,
) -> Record:
    """An ``AuditLogEntry``. ``before``/``after`` (the resource's state around the change) and the
    actor type go into ``metadata``, the spec's open object for them."""
    ms = _now_ms() if now_ms is None else now_ms
    meta = dict(metadata or {})
    if before is not None:
        meta["before"] = before
    if after is not None:
        meta["after"] = after
    return _drop_none(
        {
            "log_id": _new_id(AUDIT, ms),
            "timestamp": iso_ms(ms),
            "tenant_id": tenant_id,
            "key_id": key_id,
            "user_agent": user_agent,
            "source_ip": source_ip,
            "operation": operation,
            "resource_type": resource_type,
            "resource_id": resource_id,
            "request_id": request_id,
            "trace_id": trace_id,
            "status": status,
            "error_code": error_code,
            "subject": subject,
            "action": action,
            "amount": amount,
            "metadata": meta or None,
        }
    )


# ---- filters (the spec's query parameters) -------------------------------------------------


def _one_of(value: str | Iterable[str] | None) -> frozenset[str] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    out = frozenset(p.strip() for item in items for p in item.split(",") if p.strip())
    if len(out) > 25:
        raise InvalidRequest("at most 25 values in a list filter")
    return out or None


def _check_search(search: str | None) -> str | None:
    if not search:
        return None
    if len(search) > 128:
        raise InvalidRequest("search is longer than 128 characters")
    return search.lower()


@dataclass(frozen=True)
class EventFilter:
    """``listEvents``'s filters, AND-composed. ``scope`` is a prefix match; ``since``/``until`` are
    the spec's ``from``/``to`` (inclusive), as date-time strings, datetimes or epoch ms."""

    tenant_id: str | None = None
    event_type: str | Iterable[str] | None = None
    category: str | Iterable[str] | None = None
    scope: str | None = None
    correlation_id: str | None = None
    trace_id: str | None = None
    request_id: str | None = None
    since: str | int | datetime | None = None
    until: str | int | datetime | None = None
    search: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "_types", _one_of(self.event_type))
        object.__setattr__(self, "_cats", _one_of(self.category))
        object.__setattr__(self, "_from", parse_time(self.since))
        object.__setattr__(self, "_to", parse_time(self.until))
        object.__setattr__(self, "_search", _check_search(self.search))

    def __call__(self, r: Record) -> bool:
        types: frozenset[str] | None = self._types  # type: ignore[attr-defined]
        cats: frozenset[str] | None = self._cats  # type: ignore[attr-defined]
        search: str | None = self._search  # type: ignore[attr-defined]
        if self.tenant_id is not None and r.get("tenant_id") != self.tenant_id:
            return False
        if types is not None and r.get("event_type") not in types:
            return False
        if cats is not None and r.get("category") not in cats:
            return False
        if self.scope and not str(r.get("scope") or "").startswith(self.scope):
            return False
        for name in ("correlation_id", "trace_id", "request_id"):
            want = getattr(self, name)
            if want is not None and r.get(name) != want:
                return False
        if not _in_time(r["event_id"], self._from, self._to):  # type: ignore[attr-defined]
            return False
        if search is not None:
            hay = f"{r.get('correlation_id') or ''}\n{r.get('scope') or ''}".lower()
            if search not in hay:
                return False
        return True


@dataclass(frozen=True)
class AuditFilter:
    """``listAuditLogs``'s filters. List filters take one value, an iterable, or a comma list."""

    tenant_id: str | None = None
    key_id: str | None = None
    operation: str | Iterable[str] | None = None
    resource_type: str | Iterable[str] | None = None
    resource_id: str | None = None
    request_id: str | None = None
    trace_id: str | None = None
    error_code: str | Iterable[str] | None = None
    error_code_exclude: str | Iterable[str] | None = None
    status: int | None = None
    status_min: int | None = None
    status_max: int | None = None
    since: str | int | datetime | None = None
    until: str | int | datetime | None = None
    search: str | None = None

    def __post_init__(self) -> None:
        if self.status is not None and (self.status_min is not None or self.status_max is not None):
            raise InvalidRequest("status cannot be combined with status_min or status_max")
        for name in ("status_min", "status_max"):
            v = getattr(self, name)
            if v is not None and not 100 <= v <= 599:
                raise InvalidRequest(f"{name} must be from 100 to 599")
        if self.status_min is not None and self.status_max is not None and self.status_min > self.status_max:
            raise InvalidRequest("status_min is greater than status_max")
        for name in ("operation", "resource_type", "error_code", "error_code_exclude"):
            object.__setattr__(self, "_" + name, _one_of(getattr(self, name)))
        object.__setattr__(self, "_from", parse_time(self.since))
        object.__setattr__(self, "_to", parse_time(self.until))
        object.__setattr__(self, "_search", _check_search(self.search))

    def __call__(self, r: Record) -> bool:
        for name in ("tenant_id", "key_id", "resource_id", "request_id", "trace_id", "status"):
            want = getattr(self, name)
            if want is not None and r.get(name) != want:
                return False
        for name in ("operation", "resource_type"):
            allowed: frozenset[str] | None = getattr(self, "_" + name)
            if allowed is not None and r.get(name) not in allowed:
                return False
        codes: frozenset[str] | None = self._error_code  # type: ignore[attr-defined]
        if codes is not None and r.get("error_code") not in codes:
            return False
        excluded: frozenset[str] | None = self._error_code_exclude  # type: ignore[attr-defined]
        if excluded is not None and r.get("error_code") in excluded:
            return False
        status = r.get("status")
        if self.status_min is not None and (status is None or status < self.status_min):
            return False
        if self.status_max is not None and (status is None or status > self.status_max):
            return False
        if not _in_time(r["log_id"], self._from, self._to):  # type: ignore[attr-defined]
            return False
        search: str | None = self._search  # type: ignore[attr-defined]
        if search is not None:
            hay = "\n".join(str(r.get(k) or "") for k in ("resource_id", "operation", "key_id")).lower()
            if search not in hay:
                return False
        return True


def _in_time(record_id: str, lo: int | None, hi: int | None) -> bool:
    ms = _id_ms(record_id)
    return (lo is None or ms >= lo) and (hi is None or ms <= hi)


# ---- exports --------------------------------------------------------------------------------

_CSV_COLUMNS = {
    EVENTS: ["event_id", "timestamp", "event_type", "category", "tenant_id", "scope", "source", "correlation_id",
             "request_id", "actor", "data"],
    AUDIT: ["log_id", "timestamp", "tenant_id", "key_id", "operation", "resource_type", "resource_id", "status",
            "error_code", "request_id", "source_ip", "metadata"],
}  # fmt: skip


def to_jsonl(records: Iterable[Record]) -> str:
    """One JSON object per line."""
    return "".join(json.dumps(r, separators=(",", ":"), sort_keys=True) + "\n" for r in records)


def to_csv(records: Iterable[Record], kind: Kind) -> str:
    """A CSV with a header row; nested objects (``data``, ``actor``, ``metadata``) as JSON cells."""
    out = io.StringIO()
    cols = _CSV_COLUMNS[kind]
    w = csv.writer(out, lineterminator="\n")
    w.writerow(cols)
    for r in records:
        w.writerow(
            [json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else ("" if v is None else v)
             for v in (r.get(c) for c in cols)]
        )  # fmt: skip
    return out.getvalue()


# ---- windowed counters (tally) ---------------------------------------------------------------


def _fold(fields: dict[str, int], bucket: int, values: Mapping[str, int], keep: int, once: bool) -> dict[str, int]:
    """``tally``'s step on a flat ``{"<bucket>|<name>": n}`` map (the memory and SQLite stores; the
    Redis store does the same in Lua on a hash)."""
    for name, n in values.items():
        field = f"{bucket}|{name}"
        if once:
            fields.setdefault(field, int(n))
        else:
            fields[field] = fields.get(field, 0) + int(n)
    return {f: v for f, v in fields.items() if int(f.split("|", 1)[0]) > bucket - keep}


def _unflatten(fields: Iterable[tuple[str, int]]) -> dict[int, dict[str, int]]:
    out: dict[int, dict[str, int]] = {}
    for field, value in fields:
        b, _, name = field.partition("|")
        out.setdefault(int(b), {})[name] = int(value)
    return out


# ---- the store ------------------------------------------------------------------------------


class RecordStore(abc.ABC):
    """Append-only streams of events and audit entries, plus a tiny compare-and-set table.

    Every method is safe from several threads, processes (SQLite) or machines (Redis) at once.
    """

    url: str = ""

    def __init__(self, *, retention_ms: int = DEFAULT_RETENTION_MS, max_records: int = DEFAULT_MAX_RECORDS) -> None:
        self.retention_ms = retention_ms
        self.max_records = max_records
        self._appends = 0
        #: called with (kind, record) after each append (the server wakes its webhook dispatcher).
        self.listeners: list[Callable[[Kind, Record], None]] = []

    def append(self, kind: Kind, record: Record) -> Record:
        rid = record.get(_ID_FIELD[kind])
        if not isinstance(rid, str) or not rid.startswith(_ID_PREFIX[kind]):
            raise InvalidRequest(f"a {kind} record needs a {_ID_FIELD[kind]} made by new_{kind}()")
        self._insert(kind, rid, str(record.get("tenant_id") or ""), json.dumps(record, separators=(",", ":")))
        self._appends += 1
        if self._appends % _PURGE_EVERY == 0:
            self.purge()
        for listener in self.listeners:
            listener(kind, record)
        return record

    def get(self, kind: Kind, record_id: str) -> Record | None:
        if not record_id.startswith(_ID_PREFIX[kind]) or len(record_id) > 64:
            return None
        body = self._get(kind, record_id)
        return json.loads(body) if body is not None else None

    def page(
        self,
        kind: Kind,
        *,
        tenant: str | None = None,
        match: Match | None = None,
        cursor: str | None = None,
        limit: int = 50,
        ascending: bool = False,
    ) -> tuple[list[Record], str | None]:
        """Up to ``limit`` records, newest first (``ascending`` for oldest first), after ``cursor``;
        returns them and the cursor of the next page (``None`` at the end)."""
        if not 1 <= limit <= 10_000:
            raise InvalidRequest("limit must be from 1 to 10000")
        if cursor is not None and (not cursor.startswith(_ID_PREFIX[kind]) or len(cursor) > 64):
            raise InvalidRequest("invalid cursor")
        out: list[Record] = []
        after = cursor
        batch = max(limit + 1, 200)
        while True:
            bodies = self._scan(kind, tenant, after, batch, ascending)
            for rid, body in bodies:
                after = rid
                record = json.loads(body)
                if match is None or match(record):
                    if len(out) == limit:
                        return out, _id_of(kind, out[-1])
                    out.append(record)
            if len(bodies) < batch:
                return out, None

    def iter(
        self, kind: Kind, *, tenant: str | None = None, match: Match | None = None, ascending: bool = False
    ) -> Iterator[Record]:
        cursor: str | None = None
        while True:
            items, cursor = self.page(kind, tenant=tenant, match=match, cursor=cursor, limit=500, ascending=ascending)
            yield from items
            if cursor is None:
                return

    def purge(self, now_ms: int | None = None) -> int:
        """Forget records older than ``retention_ms`` and the oldest beyond ``max_records``."""
        now = _now_ms() if now_ms is None else now_ms
        total = 0
        for kind in (EVENTS, AUDIT):
            cutoff = f"{_ID_PREFIX[kind]}{max(now - self.retention_ms, 0):012x}"
            total += self._purge(kind, cutoff, self.max_records)
        return total

    @abc.abstractmethod
    def cas(self, key: str, expected: str | None, new: str | None, *, ttl_ms: int | None = None) -> bool:
        """Atomically set ``key`` to ``new`` (``None`` deletes) if it holds ``expected`` (``None``:
        absent or expired). ``ttl_ms`` makes the new value expire (leases)."""

    @abc.abstractmethod
    def read(self, key: str) -> str | None:
        """The value ``cas`` left at ``key`` (``None`` if absent or expired)."""

    @abc.abstractmethod
    def tally(
        self, key: str, bucket: int, values: Mapping[str, int], *, keep: int, ttl_ms: int, once: bool = False
    ) -> dict[int, dict[str, int]]:
        """Counters in tumbling buckets, shared by every server on the store, in one atomic step:
        add ``values`` to bucket ``bucket`` of ``key`` (``once``: set each name only if that bucket
        has none yet -- a sample, not a count), forget buckets at or before ``bucket - keep`` (memory
        stays bounded), and return the buckets kept, ``{bucket: {name: value}}``. Empty ``values``
        only reads. The whole key expires ``ttl_ms`` after its last write."""

    def trim_tenant(self, kind: Kind, tenant: str, keep: int) -> int:
        """Forget the oldest records of ``tenant`` in ``kind`` beyond its newest ``keep``: a bound
        on one tenant's share of a stream (``max_records`` bounds the stream as a whole, oldest
        first whoever wrote them). Returns how many were forgotten."""
        return self._trim(kind, tenant, keep)

    @abc.abstractmethod
    def _trim(self, kind: Kind, tenant: str, keep: int) -> int: ...

    # -- documents: the governance objects (tenants, policies, webhooks, ...) -------------------

    def doc_get(self, kind: str, doc_id: str) -> Record | None:
        raw = self._doc_get(kind, doc_id)
        return json.loads(raw) if raw is not None else None

    def doc_list(self, kind: str, *, tenant: str | None = None) -> list[Record]:
        """Every document of ``kind`` (of one tenant), by id."""
        return [json.loads(raw) for _, raw in sorted(self._doc_list(kind, tenant))]

    def doc_swap(
        self, kind: str, doc_id: str, expected: Record | None, new: Record | None, *, index: str | None = None
    ) -> bool:
        """Atomically replace the document holding ``expected`` (``None``: absent) with ``new``
        (``None`` deletes). ``index`` (default ``new["tenant_id"]``) is what ``doc_list(tenant=...)``
        selects it by."""
        old_raw = _canon(expected) if expected is not None else None
        new_raw = _canon(new) if new is not None else None
        if index is None:
            index = str((new or expected or {}).get("tenant_id") or "")
        return self._doc_swap(kind, doc_id, index, old_raw, new_raw)

    def doc_update(
        self,
        kind: str,
        doc_id: str,
        change: Callable[[Record | None], Record | None],
        *,
        index: str | None = None,
    ) -> Record | None:
        """Read, ``change``, write back if nobody wrote in between (else again); returns the new
        document. ``change`` may raise to refuse."""
        while True:
            current = self.doc_get(kind, doc_id)
            new = change(None if current is None else json.loads(json.dumps(current)))
            if new == current or self.doc_swap(kind, doc_id, current, new, index=index):
                return new

    @abc.abstractmethod
    def _doc_get(self, kind: str, doc_id: str) -> str | None: ...
    @abc.abstractmethod
    def _doc_list(self, kind: str, tenant: str | None) -> list[tuple[str, str]]: ...
    @abc.abstractmethod
    def _doc_swap(self, kind: str, doc_id: str, tenant: str, old: str | None, new: str | None) -> bool: ...

    @abc.abstractmethod
    def _insert(self, kind: Kind, rid: str, tenant: str, body: str) -> None: ...
    @abc.abstractmethod
    def _get(self, kind: Kind, rid: str) -> str | None: ...
    @abc.abstractmethod
    def _scan(self, kind: Kind, tenant: str | None, after: str | None, n: int, asc: bool) -> list[tuple[str, str]]:
        """Up to ``n`` (id, body) strictly after ``after`` in the walk's direction."""

    @abc.abstractmethod
    def _purge(self, kind: Kind, cutoff_id: str, keep: int) -> int: ...

    def events(self, *, limit: int = 100, tenant: str | None = None, **filters: Any) -> list[Record]:
        """Events newest first, filtered as ``EventFilter`` (``tenant`` is its ``tenant_id``)."""
        return self._list(EVENTS, EventFilter(tenant_id=tenant, **filters), tenant, limit)

    def audit(self, *, limit: int = 100, tenant: str | None = None, **filters: Any) -> list[Record]:
        """Audit entries newest first, filtered as ``AuditFilter`` (``tenant`` is its ``tenant_id``)."""
        return self._list(AUDIT, AuditFilter(tenant_id=tenant, **filters), tenant, limit)

    def _list(self, kind: Kind, match: Match, tenant: str | None, limit: int) -> list[Record]:
        return self.page(kind, tenant=tenant, match=match, limit=limit)[0]

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


def _canon(doc: Record) -> str:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True)


def _id_of(kind: Kind, record: Record) -> str:
    value: str = record[_ID_FIELD[kind]]
    return value


class MemoryRecordStore(RecordStore):
    """``memory://``: sorted id lists per stream and per (stream, tenant)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.url = "memory://"
        self._lock = threading.Lock()
        self._ids: dict[tuple[Kind, str | None], list[str]] = {}
        self._bodies: dict[Kind, dict[str, tuple[str, str]]] = {EVENTS: {}, AUDIT: {}}
        self._kv: dict[str, tuple[str, int | None]] = {}
        self._tallies: dict[str, tuple[dict[str, int], int]] = {}
        self._docs: dict[str, dict[str, tuple[str, str]]] = {}

    def _doc_get(self, kind: str, doc_id: str) -> str | None:
        found = self._docs.get(kind, {}).get(doc_id)
        return found[1] if found else None

    def _doc_list(self, kind: str, tenant: str | None) -> list[tuple[str, str]]:
        with self._lock:
            items = list(self._docs.get(kind, {}).items())
        return [(k, raw) for k, (t, raw) in items if tenant is None or t == tenant]

    def _doc_swap(self, kind: str, doc_id: str, tenant: str, old: str | None, new: str | None) -> bool:
        with self._lock:
            docs = self._docs.setdefault(kind, {})
            found = docs.get(doc_id)
            if (found[1] if found else None) != old:
                return False
            if new is None:
                docs.pop(doc_id, None)
            else:
                docs[doc_id] = (tenant, new)
            return True

    def _insert(self, kind: Kind, rid: str, tenant: str, body: str) -> None:
        with self._lock:
            if rid in self._bodies[kind]:
                return
            self._bodies[kind][rid] = (tenant, body)
            for key in ((kind, None), (kind, tenant)):
                ids = self._ids.setdefault(key, [])
                if not ids or ids[-1] < rid:
                    ids.append(rid)
                else:
                    bisect.insort(ids, rid)

    def _get(self, kind: Kind, rid: str) -> str | None:
        found = self._bodies[kind].get(rid)
        return found[1] if found else None

    def _scan(self, kind: Kind, tenant: str | None, after: str | None, n: int, asc: bool) -> list[tuple[str, str]]:
        with self._lock:
            ids = self._ids.get((kind, tenant), [])
            if asc:
                i = 0 if after is None else bisect.bisect_right(ids, after)
                chosen = ids[i : i + n]
            else:
                j = len(ids) if after is None else bisect.bisect_left(ids, after)
                chosen = ids[max(j - n, 0) : j][::-1]
            bodies = self._bodies[kind]
            return [(rid, bodies[rid][1]) for rid in chosen]

    def _purge(self, kind: Kind, cutoff_id: str, keep: int) -> int:
        with self._lock:
            ids = self._ids.get((kind, None), [])
            n = max(bisect.bisect_left(ids, cutoff_id), len(ids) - keep, 0)
            gone = ids[:n]
            del ids[:n]
            bodies = self._bodies[kind]
            tenants: set[str] = set()
            for rid in gone:
                tenants.add(bodies.pop(rid)[0])
            for t in tenants:
                tids = self._ids.get((kind, t), [])
                self._ids[(kind, t)] = [r for r in tids if r in bodies]
            return len(gone)

    def cas(self, key: str, expected: str | None, new: str | None, *, ttl_ms: int | None = None) -> bool:
        with self._lock:
            if self._read(key) != expected:
                return False
            if new is None:
                self._kv.pop(key, None)
            else:
                self._kv[key] = (new, _now_ms() + ttl_ms if ttl_ms else None)
            return True

    def read(self, key: str) -> str | None:
        with self._lock:
            return self._read(key)

    def _read(self, key: str) -> str | None:
        found = self._kv.get(key)
        if found is None or (found[1] is not None and found[1] <= _now_ms()):
            return None
        return found[0]

    def tally(
        self, key: str, bucket: int, values: Mapping[str, int], *, keep: int, ttl_ms: int, once: bool = False
    ) -> dict[int, dict[str, int]]:
        with self._lock:
            now = _now_ms()
            found = self._tallies.get(key)
            fields = dict(found[0]) if found is not None and found[1] > now else {}
            fields = _fold(fields, bucket, values, keep, once)
            if values:
                if len(self._tallies) > 100_000:  # bounded: drop what has expired
                    self._tallies = {k: v for k, v in self._tallies.items() if v[1] > now}
                self._tallies[key] = (fields, now + ttl_ms)
            return _unflatten(fields.items())

    def _trim(self, kind: Kind, tenant: str, keep: int) -> int:
        with self._lock:
            ids = self._ids.get((kind, tenant), [])
            gone = ids[: max(len(ids) - keep, 0)]
            if not gone:
                return 0
            del ids[: len(gone)]
            bodies = self._bodies[kind]
            for rid in gone:
                bodies.pop(rid, None)
            dropped = set(gone)
            self._ids[(kind, None)] = [r for r in self._ids.get((kind, None), []) if r not in dropped]
            return len(gone)


_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS cycles_records (
    kind TEXT NOT NULL,
    id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (kind, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS cycles_records_tenant ON cycles_records (kind, tenant, id);
CREATE TABLE IF NOT EXISTS cycles_kv (key TEXT PRIMARY KEY, value TEXT NOT NULL, expires_ms INTEGER) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cycles_docs (
    kind TEXT NOT NULL,
    id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (kind, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS cycles_docs_tenant ON cycles_docs (kind, tenant);
"""


class SqliteRecordStore(RecordStore):
    """Tables ``cycles_records`` and ``cycles_kv`` in the ledger's SQLite file (its own connection;
    writers queue on the ledger's ``<db>.lock`` like the ledger's transactions)."""

    def __init__(self, path: str, *, busy_timeout_ms: int = 10_000, **options: Any) -> None:
        super().__init__(**options)
        self.path = path
        self.url = f"sqlite:///{path}"
        self._busy_timeout_ms = busy_timeout_ms
        self._thread_lock = threading.Lock()
        self._pid = -1
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        with self._tx():
            pass

    def _connect(self) -> sqlite3.Connection:
        if self._db is not None and self._pid == os.getpid():
            return self._db
        self._pid = os.getpid()
        db = self._db = connect(self.path, self._busy_timeout_ms)
        if fcntl is not None and self.path != ":memory:":
            self._lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._schema_ready = False
        return db

    @contextmanager
    def _tx(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        with self._thread_lock:
            db = self._connect()
            if not write and self._schema_ready:
                yield db
                return
            fd = self._lock_fd
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    if not self._schema_ready:
                        for statement in _SQLITE_SCHEMA.split(";"):
                            if statement.strip():
                                db.execute(statement)
                    yield db
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
                self._schema_ready = True
            finally:
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)

    def _doc_get(self, kind: str, doc_id: str) -> str | None:
        with self._tx(write=False) as db:
            row = db.execute("SELECT body FROM cycles_docs WHERE kind=? AND id=?", (kind, doc_id)).fetchone()
        return row[0] if row else None

    def _doc_list(self, kind: str, tenant: str | None) -> list[tuple[str, str]]:
        sql, params = "SELECT id, body FROM cycles_docs WHERE kind=?", [kind]
        if tenant is not None:
            sql, params = sql + " AND tenant=?", [kind, tenant]
        with self._tx(write=False) as db:
            return [(r[0], r[1]) for r in db.execute(sql, params).fetchall()]

    def _doc_swap(self, kind: str, doc_id: str, tenant: str, old: str | None, new: str | None) -> bool:
        with self._tx() as db:
            row = db.execute("SELECT body FROM cycles_docs WHERE kind=? AND id=?", (kind, doc_id)).fetchone()
            if (row[0] if row else None) != old:
                return False
            if new is None:
                db.execute("DELETE FROM cycles_docs WHERE kind=? AND id=?", (kind, doc_id))
            else:
                db.execute("INSERT OR REPLACE INTO cycles_docs VALUES (?,?,?,?)", (kind, doc_id, tenant, new))
            return True

    def _insert(self, kind: Kind, rid: str, tenant: str, body: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO cycles_records VALUES (?,?,?,?)", (kind, rid, tenant, body))

    def _get(self, kind: Kind, rid: str) -> str | None:
        with self._tx(write=False) as db:
            row = db.execute("SELECT body FROM cycles_records WHERE kind=? AND id=?", (kind, rid)).fetchone()
        return row[0] if row else None

    def _scan(self, kind: Kind, tenant: str | None, after: str | None, n: int, asc: bool) -> list[tuple[str, str]]:
        where = ["kind=?"]
        params: list[Any] = [kind]
        if tenant is not None:
            where.append("tenant=?")
            params.append(tenant)
        if after is not None:
            where.append("id>?" if asc else "id<?")
            params.append(after)
        order = "ASC" if asc else "DESC"
        sql = f"SELECT id, body FROM cycles_records WHERE {' AND '.join(where)} ORDER BY id {order} LIMIT ?"
        with self._tx(write=False) as db:
            return [(r[0], r[1]) for r in db.execute(sql, (*params, n)).fetchall()]

    def _purge(self, kind: Kind, cutoff_id: str, keep: int) -> int:
        with self._tx() as db:
            cur = db.execute(
                "DELETE FROM cycles_records WHERE kind=? AND id IN "
                "(SELECT id FROM cycles_records WHERE kind=? AND id<? ORDER BY id LIMIT ?)",
                (kind, kind, cutoff_id, _PURGE_BATCH),
            )
            gone = cur.rowcount
            (count,) = db.execute("SELECT COUNT(*) FROM cycles_records WHERE kind=?", (kind,)).fetchone()
            if count > keep:
                cur = db.execute(
                    "DELETE FROM cycles_records WHERE kind=? AND id IN (SELECT id FROM cycles_records WHERE kind=? "
                    "ORDER BY id LIMIT ?)",
                    (kind, kind, min(count - keep, _PURGE_BATCH)),
                )
                gone += cur.rowcount
            return int(gone)

    def cas(self, key: str, expected: str | None, new: str | None, *, ttl_ms: int | None = None) -> bool:
        now = _now_ms()
        with self._tx() as db:
            row = db.execute("SELECT value, expires_ms FROM cycles_kv WHERE key=?", (key,)).fetchone()
            current = row[0] if row and (row[1] is None or row[1] > now) else None
            if current != expected:
                return False
            if new is None:
                db.execute("DELETE FROM cycles_kv WHERE key=?", (key,))
            else:
                db.execute(
                    "INSERT OR REPLACE INTO cycles_kv VALUES (?,?,?)", (key, new, now + ttl_ms if ttl_ms else None)
                )
            return True

    def read(self, key: str) -> str | None:
        with self._tx(write=False) as db:
            row = db.execute("SELECT value, expires_ms FROM cycles_kv WHERE key=?", (key,)).fetchone()
        return row[0] if row and (row[1] is None or row[1] > _now_ms()) else None

    def tally(
        self, key: str, bucket: int, values: Mapping[str, int], *, keep: int, ttl_ms: int, once: bool = False
    ) -> dict[int, dict[str, int]]:
        now = _now_ms()
        kv_key = f"tally:{key}"
        with self._tx(write=bool(values)) as db:
            row = db.execute("SELECT value, expires_ms FROM cycles_kv WHERE key=?", (kv_key,)).fetchone()
            fields: dict[str, int] = json.loads(row[0]) if row and (row[1] is None or row[1] > now) else {}
            fields = _fold(fields, bucket, values, keep, once)
            if values:
                db.execute(
                    "INSERT OR REPLACE INTO cycles_kv VALUES (?,?,?)",
                    (kv_key, json.dumps(fields, separators=(",", ":")), now + ttl_ms),
                )
        return _unflatten(fields.items())

    def _trim(self, kind: Kind, tenant: str, keep: int) -> int:
        with self._tx() as db:
            cur = db.execute(
                "DELETE FROM cycles_records WHERE kind=? AND id IN (SELECT id FROM cycles_records "
                "WHERE kind=? AND tenant=? ORDER BY id DESC LIMIT ? OFFSET ?)",
                (kind, kind, tenant, _PURGE_BATCH, keep),
            )
            return int(cur.rowcount)

    def purge(self, now_ms: int | None = None) -> int:
        gone = super().purge(now_ms)
        # expired leases, once-per-window marks and tallies (cas/tally keys are made per window)
        now = _now_ms() if now_ms is None else now_ms
        with self._tx() as db:
            db.execute(
                "DELETE FROM cycles_kv WHERE key IN (SELECT key FROM cycles_kv WHERE expires_ms < ? LIMIT ?)",
                (now, _PURGE_BATCH),
            )
        return gone

    def close(self) -> None:
        with self._thread_lock:
            if self._db is not None and self._pid == os.getpid():
                self._db.close()
            self._db = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None


_CAS_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur == false then cur = '' else cur = '=' .. cur end
if cur ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) return 1 end
local v = string.sub(ARGV[2], 2)
if tonumber(ARGV[3]) > 0 then redis.call('SET', KEYS[1], v, 'PX', ARGV[3]) else redis.call('SET', KEYS[1], v) end
return 1
"""

_PURGE_LUA = """
-- KEYS[1] all-ids zset, KEYS[2] bodies hash; ARGV: cutoff id, keep, batch, tenant-zset prefix
local ids = redis.call('ZRANGE', KEYS[1], '-', '(' .. ARGV[1], 'BYLEX', 'LIMIT', 0, tonumber(ARGV[3]))
local extra = redis.call('ZCARD', KEYS[1]) - #ids - tonumber(ARGV[2])
if extra > 0 then
  local more = redis.call('ZRANGE', KEYS[1], #ids, #ids + math.min(extra, tonumber(ARGV[3])) - 1)
  for _, id in ipairs(more) do ids[#ids + 1] = id end
end
for _, id in ipairs(ids) do
  local body = redis.call('HGET', KEYS[2], id)
  if body then
    local t = cjson.decode(body)['tenant_id'] or ''
    redis.call('ZREM', ARGV[4] .. tostring(t), id)
  end
  redis.call('HDEL', KEYS[2], id)
  redis.call('ZREM', KEYS[1], id)
end
return #ids
"""


_TALLY_LUA = """
-- KEYS[1] hash of "<bucket>|<name>" -> n; ARGV: bucket, keep, ttl_ms, once ('1'), name, n, name, n...
local b = tonumber(ARGV[1])
for i = 5, #ARGV, 2 do
  local f = ARGV[1] .. '|' .. ARGV[i]
  if ARGV[4] == '1' then redis.call('HSETNX', KEYS[1], f, ARGV[i + 1])
  else redis.call('HINCRBY', KEYS[1], f, ARGV[i + 1]) end
end
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #all, 2 do
  local fb = tonumber(string.match(all[i], '^(-?%d+)|'))
  if fb == nil or fb <= b - tonumber(ARGV[2]) then redis.call('HDEL', KEYS[1], all[i])
  else out[#out + 1] = all[i]; out[#out + 1] = all[i + 1] end
end
if #ARGV > 4 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return out
"""

_TRIM_LUA = """
-- KEYS[1] tenant ids zset, KEYS[2] all ids zset, KEYS[3] bodies hash; ARGV: keep, batch
local extra = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[1])
if extra <= 0 then return 0 end
local ids = redis.call('ZRANGE', KEYS[1], 0, math.min(extra, tonumber(ARGV[2])) - 1)
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
end
return #ids
"""


_DOC_SWAP_LUA = """
-- KEYS[1] docs hash, KEYS[2] tenant index set prefix target (old), KEYS[3] (new); ARGV: id, old, new, tenant
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur == false then cur = '' else cur = '=' .. cur end
if cur ~= ARGV[2] then return 0 end
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('SREM', KEYS[2], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], string.sub(ARGV[3], 2))
  redis.call('SADD', KEYS[2], ARGV[1])
end
return 1
"""


_Store = TypeVar("_Store", bound=RecordStore)


def _outages_as_unavailable(cls: type[_Store]) -> type[_Store]:
    """Every Redis call of the store's primitives raises a Redis outage as ``LedgerUnavailable``,
    as the Redis ledger does (a server answers it 503 with Retry-After, never 500)."""

    def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                from cycles.ledger.redis import _TRANSIENT_ERRORS  # redis is there: this store uses it

                if isinstance(exc, _TRANSIENT_ERRORS):
                    raise LedgerUnavailable(f"Redis is unavailable for events and audit records: {exc}") from exc
                raise

        call.__name__, call.__doc__ = fn.__name__, fn.__doc__
        return call

    for name, fn in list(vars(cls).items()):
        if callable(fn) and not name.startswith("__") and name not in ("_docs", "_all", "_tenant", "_bodies"):
            setattr(cls, name, guarded(fn))
    return cls


@_outages_as_unavailable
class RedisRecordStore(RecordStore):
    """Under ``<prefix>:{!records}:`` beside the ledger (see the module docstring)."""

    def __init__(self, client: Any, *, prefix: str = "cycles", **options: Any) -> None:
        super().__init__(**options)
        self._r = client
        self.prefix = f"{prefix}:{{!records}}:"
        self.url = "redis://"
        self._cas = client.register_script(_CAS_LUA)
        self._purge_script = client.register_script(_PURGE_LUA)
        self._doc_swap_script = client.register_script(_DOC_SWAP_LUA)
        self._tally_script = client.register_script(_TALLY_LUA)
        self._trim_script = client.register_script(_TRIM_LUA)

    def _docs(self, kind: str) -> str:
        return f"{self.prefix}doc:{kind}"

    def _doc_get(self, kind: str, doc_id: str) -> str | None:
        raw = self._r.hget(self._docs(kind), doc_id)
        return _text(raw) if raw is not None else None

    def _doc_list(self, kind: str, tenant: str | None) -> list[tuple[str, str]]:
        if tenant is None:
            return [(_text(k), _text(v)) for k, v in self._r.hgetall(self._docs(kind)).items()]
        ids = sorted(_text(i) for i in self._r.smembers(f"{self._docs(kind)}:t:{tenant}"))
        if not ids:
            return []
        bodies = self._r.hmget(self._docs(kind), ids)
        return [(i, _text(b)) for i, b in zip(ids, bodies, strict=True) if b is not None]

    def _doc_swap(self, kind: str, doc_id: str, tenant: str, old: str | None, new: str | None) -> bool:
        args = [doc_id, "" if old is None else "=" + old, "" if new is None else "=" + new]
        keys = [self._docs(kind), f"{self._docs(kind)}:t:{tenant}"]
        return bool(self._doc_swap_script(keys=keys, args=args))

    def _all(self, kind: Kind) -> str:
        return f"{self.prefix}{kind}:ids"

    def _tenant(self, kind: Kind, tenant: str) -> str:
        return f"{self.prefix}{kind}:t:{tenant}"

    def _bodies(self, kind: Kind) -> str:
        return f"{self.prefix}{kind}:body"

    def _insert(self, kind: Kind, rid: str, tenant: str, body: str) -> None:
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(self._bodies(kind), rid, body)
        pipe.zadd(self._all(kind), {rid: 0})
        pipe.zadd(self._tenant(kind, tenant), {rid: 0})
        pipe.execute()

    def _get(self, kind: Kind, rid: str) -> str | None:
        body = self._r.hget(self._bodies(kind), rid)
        return _text(body) if body is not None else None

    def _scan(self, kind: Kind, tenant: str | None, after: str | None, n: int, asc: bool) -> list[tuple[str, str]]:
        key = self._all(kind) if tenant is None else self._tenant(kind, tenant)
        if asc:
            ids = self._r.zrange(key, "(" + after if after else "-", "+", bylex=True, offset=0, num=n)
        else:
            ids = self._r.zrange(key, "(" + after if after else "+", "-", desc=True, bylex=True, offset=0, num=n)
        ids = [_text(i) for i in ids]
        if not ids:
            return []
        bodies = self._r.hmget(self._bodies(kind), ids)
        return [(rid, _text(b)) for rid, b in zip(ids, bodies, strict=True) if b is not None]

    def _purge(self, kind: Kind, cutoff_id: str, keep: int) -> int:
        n = self._purge_script(
            keys=[self._all(kind), self._bodies(kind)],
            args=[cutoff_id, keep, _PURGE_BATCH, f"{self.prefix}{kind}:t:"],
        )
        return int(n)

    def cas(self, key: str, expected: str | None, new: str | None, *, ttl_ms: int | None = None) -> bool:
        args = ["" if expected is None else "=" + expected, "" if new is None else "=" + new, ttl_ms or 0]
        return bool(self._cas(keys=[f"{self.prefix}kv:{key}"], args=args))

    def read(self, key: str) -> str | None:
        value = self._r.get(f"{self.prefix}kv:{key}")
        return _text(value) if value is not None else None

    def tally(
        self, key: str, bucket: int, values: Mapping[str, int], *, keep: int, ttl_ms: int, once: bool = False
    ) -> dict[int, dict[str, int]]:
        args: list[Any] = [bucket, keep, ttl_ms, "1" if once else "0"]
        for name, n in values.items():
            args += [name, int(n)]
        flat = [_text(x) for x in self._tally_script(keys=[f"{self.prefix}tally:{key}"], args=args)]
        return _unflatten(zip(flat[::2], (int(v) for v in flat[1::2]), strict=True))

    def _trim(self, kind: Kind, tenant: str, keep: int) -> int:
        keys = [self._tenant(kind, tenant), self._all(kind), self._bodies(kind)]
        return int(self._trim_script(keys=keys, args=[keep, _PURGE_BATCH]))

    def close(self) -> None:
        self._r.close()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ---- finding a ledger's store ---------------------------------------------------------------

_ATTR = "_cycles_records"
_attach_lock = threading.Lock()


def records_of(ledger: Any, **options: Any) -> RecordStore:
    """The record store beside ``ledger`` (a Ledger or AsyncLedger of any local backend), created on
    first use and cached on the ledger object. ``options``: ``retention_ms``, ``max_records``."""
    with _attach_lock:
        ledger = getattr(ledger, "sync", ledger)  # the async face of a local ledger shares its store
        ledger = getattr(ledger, "inner", ledger)  # the server's observed ledger: the one it watches
        ledger = getattr(ledger, "sync", ledger)
        store: RecordStore | None = getattr(ledger, _ATTR, None)
        if store is None:
            store = _open_for(ledger, options)
            setattr(ledger, _ATTR, store)
        else:
            for name, value in options.items():
                setattr(store, name, value)
        return store


def _open_for(ledger: Any, options: dict[str, Any]) -> RecordStore:
    inner = ledger
    url = str(getattr(inner, "url", ""))
    scheme = url.split("://", 1)[0].lower()
    if scheme == "memory":
        return MemoryRecordStore(**options)
    if scheme == "sqlite":
        return SqliteRecordStore(inner.path, **options)
    if scheme in ("redis", "rediss"):
        return RedisRecordStore(_sync_redis(inner._client), prefix=inner.prefix, **options)
    raise InvalidRequest(
        f"events and audit records live in a local ledger (memory://, sqlite://, redis://); "
        f"for {url.split('?', 1)[0] or 'this ledger'} read them from the server (GET /v1/admin/events)"
    )


def _sync_redis(client: Any) -> Any:
    """A synchronous redis-py client to the same server as ``client`` (which may be async)."""
    import redis

    if isinstance(client, redis.Redis | redis.RedisCluster):
        return client
    if isinstance(client, redis.asyncio.RedisCluster):
        raise InvalidRequest("events over an async Redis Cluster ledger: open the store from a sync ledger")
    kwargs = dict(client.connection_pool.connection_kwargs)
    cls = client.connection_pool.connection_class
    kwargs.pop("retry", None)
    if getattr(cls, "__name__", "") == "SSLConnection":
        kwargs["ssl"] = True
    allowed = {f.name for f in fields(_RedisKw)}
    return redis.Redis(**{k: v for k, v in kwargs.items() if k in allowed})


@dataclass
class _RedisKw:  # the connection settings worth carrying from an async client to a sync one
    host: str = ""
    port: int = 0
    db: int = 0
    username: str = ""
    password: str = ""
    socket_timeout: float = 0
    socket_connect_timeout: float = 0
    ssl: bool = False
    client_name: str = ""
