"""Shadow-mode decisions kept in the ledger's own store, and the report over them.

A guard in shadow mode never blocks: when enforcement would have said no, the action runs and a
``ShadowRecord`` says why. Each one, once the guarded action has settled, becomes a
``reservation.observed_denied`` event in the ledger's governance event store
(``cycles.ledger.records``), next to the observe-mode decisions a server records there, so every
worker of every machine that shares the ledger adds to one history:

    memory:// sqlite:/// redis://   the ledger's event store (``records_of(ledger)``)
    http(s)://                      the server's ``/v1/shadow/events``, which writes to its own

Writes go through a ``ShadowRecorder``: a daemon thread that takes events off a queue and writes
them in batches, so a guard never waits on the store. ``flush()`` waits until everything queued is
written (the client calls it on close and before a report).

``shadow_report(events, balances)`` turns events into what an operator asks before turning
enforcement on: how many calls would have been denied (by scope, action and reason), how much spend
enforcement would have prevented, how far each budget would have gone over, and what budget each
scope would need for the spend it saw.
"""

from __future__ import annotations

import abc
import atexit
import hashlib
import json
import logging
import math
import queue
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from cycles.errors import InvalidRequest, LedgerUnavailable, error_for
from cycles.ledger.records import EVENTS, EventFilter, RecordStore, new_event, parse_time, records_of
from cycles.models import Amount, Balance, Unit, trusted
from cycles.scopes import derive_scopes

if TYPE_CHECKING:
    from cycles.guard import ShadowRecord
    from cycles.ledger.base import AsyncLedger, Ledger

__all__ = [
    "BudgetLine",
    "DenialGroup",
    "ShadowEvent",
    "ShadowRecorder",
    "ShadowReport",
    "ShadowStore",
    "parse_since",
    "report_from_store",
    "shadow_report",
    "shadow_store_for",
    "suggest_budget",
]

log = logging.getLogger("cycles.shadow")

Mode = Literal["shadow", "observe"]
OBSERVED_DENIED = "reservation.observed_denied"
#: Events older than this are dropped from the SQLite table and the Redis streams as new ones come.
RETENTION_MS = 35 * 86_400_000
MAX_EVENTS_PER_WRITE = 500
_TENANT = re.compile(r"^[a-zA-Z0-9_.-]{1,128}$")


@dataclass(frozen=True, slots=True)
class ShadowEvent:
    """One decision enforcement would have made and shadow (or observe) mode let through.

    ``scope`` is the budget that would have refused (``subject_scope`` when the ledger had no budget
    at all); amounts are integers in ``unit``'s smallest denomination. ``actual`` is None when the
    action never reported a cost (released); ``charged`` is what the ledger accounted for it.
    """

    event_id: str
    at_ms: int
    tenant: str
    scope: str
    subject_scope: str
    action_kind: str
    action_name: str
    reason_code: str
    unit: Unit
    estimate: int
    actual: int | None
    charged: int | None
    mode: Mode = "shadow"
    message: str = ""

    @property
    def spent(self) -> int:
        """What the action cost: its actual, else 0 (it did not happen or reported nothing)."""
        return self.actual or 0

    @property
    def overspend(self) -> int:
        """Spend the ledger could not account within the budgets: past the limit."""
        return max(0, self.spent - (self.charged or 0))

    def to_wire(self) -> dict[str, Any]:
        body = asdict(self)
        body["unit"] = self.unit.value
        return body

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> ShadowEvent:
        try:
            tenant = str(body["tenant"])
            if not _TENANT.match(tenant):
                raise InvalidRequest(f"invalid tenant {tenant!r}")
            mode = body.get("mode", "shadow")
            if mode not in ("shadow", "observe"):
                raise InvalidRequest("mode must be 'shadow' or 'observe'")
            return cls(
                event_id=str(body.get("event_id") or new_shadow_id(int(body["at_ms"])))[:64],
                at_ms=int(body["at_ms"]),
                tenant=tenant,
                scope=str(body["scope"])[:1024],
                subject_scope=str(body.get("subject_scope") or body["scope"])[:1024],
                action_kind=str(body["action_kind"])[:128],
                action_name=str(body["action_name"])[:256],
                reason_code=str(body["reason_code"])[:64],
                unit=Unit(body["unit"]),
                estimate=_nonneg(body["estimate"]),
                actual=None if body.get("actual") is None else _nonneg(body["actual"]),
                charged=None if body.get("charged") is None else _nonneg(body["charged"]),
                mode=mode,
                message=str(body.get("message") or "")[:512],
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, InvalidRequest):
                raise
            raise InvalidRequest(f"malformed shadow event: {exc}") from None

    @classmethod
    def from_record(cls, record: ShadowRecord, mode: Mode = "shadow") -> ShadowEvent:
        subject_scope = derive_scopes(record.subject)[-1]
        return cls(
            event_id=new_shadow_id(record.at_ms),
            at_ms=record.at_ms,
            tenant=record.subject.tenant or "_",  # no tenant in the subject: an HTTP server sets the key's
            scope=record.scope or subject_scope,
            subject_scope=subject_scope,
            action_kind=record.action.kind,
            action_name=record.action.name,
            reason_code=record.reason_code,
            unit=record.estimate.unit,
            estimate=record.estimate.amount,
            actual=None if record.actual is None else record.actual.amount,
            charged=None if record.charged is None else record.charged.amount,
            mode=mode,
            message=record.message[:512],
        )

    def to_event(self) -> dict[str, Any]:
        """This decision as a governance ``reservation.observed_denied`` Event (its wire shape).

        The spec's payload fields (scope, unit, deny_detail, action, subject, estimated_amount,
        observe_mode, would_have_blocked_at) plus what only a client that ran the action knows:
        ``actual_amount``, ``charged_amount``, and ``shadow_mode`` (``shadow``: a client guard;
        ``observe``: a server's observe mode)."""
        window = self.at_ms // 3_600_000  # correlation: (tenant, scope, action kind, hour, reason)
        key = f"{self.tenant}|{self.scope}|{self.action_kind}|{window}|{self.reason_code}"
        event = new_event(
            OBSERVED_DENIED,
            tenant_id=self.tenant,
            scope=self.scope,
            source="cycles-client" if self.mode == "shadow" else "cycles-server",
            correlation_id="obs_" + hashlib.sha256(key.encode()).hexdigest()[:24],
            now_ms=self.at_ms,
            data={
                "scope": self.scope,
                "unit": self.unit.value,
                "deny_detail": {"reason_code": self.reason_code, "blocked_by_scope": self.scope},
                "action": {"kind": self.action_kind, "name": self.action_name},
                "subject": {"scope_path": self.subject_scope},
                "estimated_amount": self.estimate,
                "observe_mode": "OBSERVE",
                "would_have_blocked_at": self.scope,
                "actual_amount": self.actual,
                "charged_amount": self.charged,
                "shadow_mode": self.mode,
                "message": self.message or None,
            },
        )
        if self.event_id.startswith("evt_"):
            event["event_id"] = self.event_id  # the writer's id: a retried write is the same event
        event["data"] = {k: v for k, v in event["data"].items() if v is not None}
        return event

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> ShadowEvent:
        """Read a ``reservation.observed_denied`` Event, ours or a server's observe mode's (which
        carries no actual: the action did not run)."""
        data = event.get("data") or {}
        detail = data.get("deny_detail") or {}
        action = data.get("action") or {}
        scope = str(data.get("scope") or event.get("scope") or "")
        return cls.from_wire(
            {
                "event_id": event["event_id"],
                "at_ms": parse_time(event["timestamp"]),
                "tenant": event.get("tenant_id") or "_",
                "scope": scope,
                "subject_scope": (data.get("subject") or {}).get("scope_path") or scope,
                "action_kind": action.get("kind") or "",
                "action_name": action.get("name") or "",
                "reason_code": detail.get("reason_code") or "UNKNOWN",
                "unit": data.get("unit") or Unit.USD_MICROCENTS.value,
                "estimate": data.get("estimated_amount") or 0,
                "actual": data.get("actual_amount"),
                "charged": data.get("charged_amount"),
                "mode": data.get("shadow_mode") or "observe",
                "message": data.get("message") or "",
            }
        )


def new_shadow_id(at_ms: int) -> str:
    """An event id that sorts by time, as the event store's own (``evt_...``)."""
    return str(new_event(OBSERVED_DENIED, tenant_id="_", now_ms=at_ms)["event_id"])


def _nonneg(value: Any) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < 0:
        raise ValueError(f"amounts are non-negative integers, got {value!r}")
    return int(value)


# ---- stores ---------------------------------------------------------------------------------


class ShadowStore(abc.ABC):
    """Where shadow events live: next to the ledger, shared by whoever shares the ledger."""

    @abc.abstractmethod
    def append(self, events: Sequence[ShadowEvent]) -> None: ...

    @abc.abstractmethod
    def scan(self, *, tenant: str | None = None, since_ms: int = 0, until_ms: int | None = None) -> list[ShadowEvent]:
        """Events of ``tenant`` (every tenant when None) with ``since_ms <= at_ms < until_ms``, oldest first."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class RecordsShadowStore(ShadowStore):
    """Shadow decisions as ``reservation.observed_denied`` events in the ledger's event store
    (``cycles.ledger.records``: memory, SQLite table, Redis), beside the observe-mode decisions a
    server records there: one history, whichever side decided."""

    def __init__(self, records: RecordStore) -> None:
        self.records = records

    def append(self, events: Sequence[ShadowEvent]) -> None:
        for e in events:
            self.records.append(EVENTS, e.to_event())

    def scan(self, *, tenant: str | None = None, since_ms: int = 0, until_ms: int | None = None) -> list[ShadowEvent]:
        match = EventFilter(
            event_type=OBSERVED_DENIED, since=since_ms, until=None if until_ms is None else until_ms - 1
        )
        found = self.records.iter(EVENTS, tenant=tenant, match=match, ascending=True)
        return [ShadowEvent.from_event(r) for r in found]


class HttpShadowStore(ShadowStore):
    """A Cycles server's ``/v1/shadow/events``: writes with the tenant's API key, reads with it (its
    own tenant) or with the admin key (any tenant)."""

    def __init__(self, base_url: str, *, runtime_headers: Mapping[str, str], admin_headers: Mapping[str, str]) -> None:
        self.base_url = base_url.rstrip("/")
        self._runtime = dict(runtime_headers)
        self._admin = dict(admin_headers)

    def _request(self, method: str, path: str, headers: Mapping[str, str], body: Any = None) -> Any:
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method, headers=dict(headers))
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                err = json.loads(exc.read())
                raise error_for(err.get("error", "INTERNAL_ERROR"), err.get("message", "")) from None
            except (ValueError, AttributeError):
                raise LedgerUnavailable(f"shadow events: HTTP {exc.code}") from None
        except OSError as exc:
            raise LedgerUnavailable(f"shadow events: {exc}") from exc

    def append(self, events: Sequence[ShadowEvent]) -> None:
        self._request("POST", "/v1/shadow/events", self._runtime, {"events": [e.to_wire() for e in events]})

    def scan(self, *, tenant: str | None = None, since_ms: int = 0, until_ms: int | None = None) -> list[ShadowEvent]:
        headers = self._admin if "X-Admin-API-Key" in self._admin else self._runtime
        params: dict[str, Any] = {"since_ms": since_ms}
        if tenant is not None:
            params["tenant"] = tenant
        if until_ms is not None:
            params["until_ms"] = until_ms
        out: list[ShadowEvent] = []
        while True:
            page = self._request("GET", "/v1/shadow/events?" + urllib.parse.urlencode(params), headers)
            out.extend(ShadowEvent.from_wire(e) for e in page["events"])
            if not page.get("next_since_ms"):
                return out
            params["since_ms"] = page["next_since_ms"]
            params["after_id"] = page["next_after_id"]


def shadow_store_for(ledger: Ledger | AsyncLedger) -> ShadowStore:
    """The shadow store that lives next to ``ledger`` (see the module docstring)."""
    from cycles.ledger.base import ThreadedAsyncLedger
    from cycles.otel import unwrap

    ledger = unwrap(ledger)
    if isinstance(ledger, ThreadedAsyncLedger):
        return shadow_store_for(ledger.sync)
    own = getattr(ledger, "shadow_store", None)
    if callable(own):  # a ledger of another package (or a gateway in front of one) brings its own
        store: ShadowStore = own()
        return store
    name = type(ledger).__name__
    core = getattr(ledger, "_core", None)
    if name in ("HttpLedger", "AsyncHttpLedger") and core is not None:
        return HttpShadowStore(
            core.endpoint.origin + core.endpoint.prefix,
            runtime_headers=core._runtime_headers,
            admin_headers=core._admin_headers,
        )
    return RecordsShadowStore(records_of(ledger))  # memory, sqlite, redis (InvalidRequest otherwise)


# ---- the recorder ---------------------------------------------------------------------------


class ShadowRecorder:
    """Writes events to a store from a daemon thread, in batches; a failed write is retried a few
    times, then logged and dropped (shadow mode must never hurt the workload it watches)."""

    def __init__(self, open_store: Any) -> None:
        self._open_store = open_store
        self._store: ShadowStore | None = None
        self._queue: queue.Queue[ShadowEvent | None] = queue.Queue(maxsize=100_000)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.dropped = 0
        atexit.register(_flush_at_exit, weakref.ref(self))  # a client never closed still writes its events

    @property
    def store(self) -> ShadowStore:
        with self._lock:
            if self._store is None:
                self._store = self._open_store()
            return self._store

    def submit(self, event: ShadowEvent) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="cycles-shadow-recorder", daemon=True)
                    self._thread.start()
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1
            log.warning("shadow recorder queue is full: dropped a shadow event for %s", event.scope)

    def flush(self) -> None:
        """Wait until every submitted event is written (or given up on)."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.join()

    def close(self) -> None:
        self.flush()
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=10)
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                self._queue.task_done()
                return
            batch = [first]
            while len(batch) < MAX_EVENTS_PER_WRITE:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # stop after this batch
                    self._queue.task_done()
                    break
                batch.append(more)
            self._write(batch)
            for _ in batch:
                self._queue.task_done()

    def _write(self, batch: list[ShadowEvent]) -> None:
        for attempt in range(4):
            try:
                self.store.append(batch)
                return
            except Exception as exc:  # noqa: BLE001 - logged; shadow mode never fails the workload
                if attempt == 3:
                    self.dropped += len(batch)
                    log.warning("could not record %d shadow event(s): %s", len(batch), exc)
                    return
                time.sleep(0.05 * 4**attempt)


def _flush_at_exit(ref: weakref.ref[ShadowRecorder]) -> None:
    recorder = ref()
    if recorder is not None:
        recorder.flush()


# ---- the report -----------------------------------------------------------------------------

_SINCE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_since(text: str | int | None, now_ms: int | None = None) -> int:
    """``"7d"``, ``"12h"``, ``"30m"`` -> a ms timestamp that long ago; an ISO date or ms number as is."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    if text is None or text == "":
        return now_ms - 7 * 86_400_000
    if isinstance(text, int):
        return text
    match = _SINCE.match(text)
    if match:
        return now_ms - int(match.group(1)) * _SECONDS[match.group(2)] * 1000
    if text.strip().isdigit():
        return int(text)
    from datetime import UTC, datetime

    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"--since takes 7d, 12h, 30m, an ISO date or a ms timestamp, got {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


@dataclass(slots=True)
class DenialGroup:
    """Would-denies that share a scope, an action and a reason."""

    scope: str
    action: str
    reason_code: str
    unit: Unit
    calls: int = 0
    estimated: int = 0
    spent: int = 0
    overspend: int = 0
    first_ms: int = 0
    last_ms: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {**asdict(self), "unit": self.unit.value}


@dataclass(slots=True)
class BudgetLine:
    """One budget (scope and unit): what shadow mode saw it let past, and what it should be."""

    scope: str
    unit: Unit
    would_deny: int = 0
    prevented: int = 0
    peak_overage: int = 0
    allocated: int | None = None
    spent: int | None = None
    suggested: int | None = None

    def to_wire(self) -> dict[str, Any]:
        return {**asdict(self), "unit": self.unit.value}


@dataclass(slots=True)
class ShadowReport:
    """What enforcement would have done over a window. Amounts are integers in their unit."""

    since_ms: int
    until_ms: int
    tenant: str | None
    would_deny: int
    prevented: dict[Unit, int]
    overspend: dict[Unit, int]
    groups: list[DenialGroup]
    budgets: list[BudgetLine]
    by_reason: dict[str, int]
    timeline: list[tuple[int, int]] = field(default_factory=list)  # (bucket start ms, would-denies)
    events: list[ShadowEvent] = field(default_factory=list)

    @property
    def peak_overage(self) -> dict[Unit, int]:
        peaks: dict[Unit, int] = {}
        for b in self.budgets:
            peaks[b.unit] = max(peaks.get(b.unit, 0), b.peak_overage)
        return peaks

    def to_wire(self) -> dict[str, Any]:
        return {
            "since_ms": self.since_ms,
            "until_ms": self.until_ms,
            "tenant": self.tenant,
            "would_deny": self.would_deny,
            "prevented": {u.value: v for u, v in self.prevented.items()},
            "overspend": {u.value: v for u, v in self.overspend.items()},
            "peak_overage": {u.value: v for u, v in self.peak_overage.items()},
            "by_reason": self.by_reason,
            "groups": [g.to_wire() for g in self.groups],
            "budgets": [b.to_wire() for b in self.budgets],
            "timeline": [{"at_ms": t, "would_deny": n} for t, n in self.timeline],
        }

    def summary(self) -> str:
        """``23 calls would have been denied. Peak overage: $47.30`` and what enforcement saves."""
        if not self.would_deny:
            return "No call would have been denied."
        calls = (
            "1 call would have been denied."
            if self.would_deny == 1
            else f"{self.would_deny} calls would have been denied."
        )
        parts = [calls]
        if self.prevented:
            parts.append("Enforcement would have prevented " + _amounts(self.prevented) + " of spend.")
        peaks = {u: v for u, v in self.peak_overage.items() if v}
        if peaks:
            parts.append("Peak overage: " + _amounts(peaks) + ".")
        return " ".join(parts)


def _amounts(values: Mapping[Unit, int]) -> str:
    return ", ".join(
        str(trusted(Amount, unit=u, amount=v)) for u, v in sorted(values.items(), key=lambda x: x[0].value)
    )


def suggest_budget(observed: int, headroom: float = 1.2) -> int:
    """``observed`` spend with 20% headroom, rounded up to two significant figures."""
    if observed <= 0:
        return 0
    target = observed * headroom
    step = 10 ** max(0, math.floor(math.log10(target)) - 1)
    return int(math.ceil(target / step) * step)


def shadow_report(
    events: Iterable[ShadowEvent],
    balances: Iterable[Balance] = (),
    *,
    since_ms: int,
    until_ms: int,
    tenant: str | None = None,
    buckets: int = 24,
) -> ShadowReport:
    """Aggregate shadow events (and the budgets' current balances, for the suggestions).

    - ``prevented``: what the would-denied calls cost; enforcement would have stopped them.
    - ``peak_overage`` per budget: how far past its limit the budget went in the window: the spend
      it could not account (actual - charged) of the calls it would have refused, added up; it only
      grows within a window, so the sum is its peak.
    - ``suggested`` per budget: what the scope spent (its ledger ``spent`` plus the spend that it or
      a scope under it could not account) with 20% headroom, two significant figures: the
      allocation that would have let the observed workload through.
    """
    evs = sorted(events, key=lambda e: e.at_ms)
    groups: dict[tuple[str, str, str, Unit], DenialGroup] = {}
    lines: dict[tuple[str, Unit], BudgetLine] = {}
    prevented: dict[Unit, int] = defaultdict(int)
    overspend: dict[Unit, int] = defaultdict(int)
    by_reason: dict[str, int] = defaultdict(int)
    width = max(1, (until_ms - since_ms) // max(1, buckets))
    timeline = [0] * max(1, buckets)
    for e in evs:
        action = f"{e.action_kind} {e.action_name}"
        g = groups.get((e.scope, action, e.reason_code, e.unit))
        if g is None:
            g = groups[(e.scope, action, e.reason_code, e.unit)] = DenialGroup(
                e.scope, action, e.reason_code, e.unit, first_ms=e.at_ms
            )
        g.calls += 1
        g.estimated += e.estimate
        g.spent += e.spent
        g.overspend += e.overspend
        g.last_ms = e.at_ms
        line = lines.get((e.scope, e.unit))
        if line is None:
            line = lines[(e.scope, e.unit)] = BudgetLine(e.scope, e.unit)
        line.would_deny += 1
        line.prevented += e.spent
        line.peak_overage += e.overspend
        prevented[e.unit] += e.spent
        overspend[e.unit] += e.overspend
        by_reason[e.reason_code] += 1
        slot = min(len(timeline) - 1, max(0, (e.at_ms - since_ms) // width))
        timeline[slot] += 1
    for b in balances:
        if b.allocated is None:
            continue
        line = lines.get((b.scope, b.remaining.unit))
        if line is None:
            line = lines[(b.scope, b.remaining.unit)] = BudgetLine(b.scope, b.remaining.unit)
        line.allocated = b.allocated.amount
        line.spent = b.spent.amount if b.spent is not None else 0
    # Spend a budget could not account also happened under every scope above it: add it to each.
    unaccounted: dict[tuple[str, Unit], int] = defaultdict(int)
    for e in evs:
        if e.overspend:
            parts = e.subject_scope.split("/")
            for i in range(1, len(parts) + 1):
                unaccounted[("/".join(parts[:i]), e.unit)] += e.overspend
    for (scope, unit), line in lines.items():
        observed = (line.spent or 0) + unaccounted.get((scope, unit), line.peak_overage)
        line.suggested = suggest_budget(observed) if observed else line.allocated
    ordered_groups = sorted(groups.values(), key=lambda g: (-g.calls, -g.spent, g.scope, g.action))
    ordered_lines = sorted(lines.values(), key=lambda b: (-b.would_deny, -b.peak_overage, b.scope, b.unit.value))
    return ShadowReport(
        since_ms=since_ms,
        until_ms=until_ms,
        tenant=tenant,
        would_deny=len(evs),
        prevented={u: v for u, v in prevented.items() if v},
        overspend={u: v for u, v in overspend.items() if v},
        groups=ordered_groups,
        budgets=ordered_lines,
        by_reason=dict(sorted(by_reason.items(), key=lambda kv: -kv[1])),
        timeline=[(since_ms + i * width, n) for i, n in enumerate(timeline)],
        events=evs,
    )


def report_from_store(
    store: ShadowStore,
    balances: Sequence[Balance],
    *,
    tenant: str | None,
    since: str | int | None,
    until_ms: int | None = None,
) -> ShadowReport:
    until = int(time.time() * 1000) + 1 if until_ms is None else until_ms
    since_ms = parse_since(since, until)
    if since_ms >= until:
        raise InvalidRequest("--since must be in the past")
    events = store.scan(tenant=tenant, since_ms=since_ms, until_ms=until)
    if tenant is not None:
        balances = [b for b in balances if b.scope.split("/", 1)[0] == f"tenant:{tenant}"]
    return shadow_report(events, balances, since_ms=since_ms, until_ms=until, tenant=tenant)
