"""Action quota counters as operators see them: read a tenant's live counters a page at a time, and
reset one (cycles-action-kinds v0.1.26, ``GET /v1/admin/action-quota-counters`` and ``POST
/v1/admin/action-quota-counters/reset``), written once.

A counter is stored under its name ``<scope>|<kind or __risk__:<class>>|<window>|<bucket>`` (see
``quotas.Counter``) with the value ``<count>,<expires at>,<limit>,<ttl ms>,<last increment at>,<alerted>``
(alerted: 1 once its threshold was announced in this window):
the limit and TTL it was last counted under, so a reader needs no policy lookup (the quota may have
changed or gone since) and a per_run reset can refresh its TTL. Values written before the limit was
kept (``<count>,<expires at>``) still count and reset; they are not listed (no limit to show) and
lapse with their window.

Stores hand names over in key order from an index (the key-ordered ``kv`` table in SQLite, a sorted
set per tenant in Redis); ``Pager`` keeps the ones the query asks for and stops at a full page or
after ``paging.SCAN_BUDGET`` names, so a page costs what it reads. The scope filter is a prefix of
the names, so it narrows the range read rather than filtering it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from cycles.errors import InvalidRequest, NotFound
from cycles.ledger import paging, quotas
from cycles.scopes import scope_tenant

if TYPE_CHECKING:
    from cycles.ledger.rules import Txn

__all__ = [
    "CounterPage",
    "CounterQuery",
    "CounterReset",
    "CounterResetRequest",
    "CounterState",
    "CounterValue",
    "Pager",
    "correlation_id",
    "counter_name",
    "list_counters",
    "reset_counter",
    "tenant_ranges",
]

RISK = "__risk__"
_LOOP = "__loop__:"


# ---- the stored value -------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class CounterValue:
    count: int
    expires_ms: int  # the count lapses (reads 0) at this time
    limit: int | None = None  # None: written before limits were kept
    ttl_ms: int | None = None
    last_ms: int | None = None
    alerted: bool = False  # its threshold was announced in this window instance

    @classmethod
    def loads(cls, text: str) -> CounterValue:
        f = [int(x) for x in text.split(",")]
        if len(f) >= 5:
            return cls(f[0], f[1], f[2], f[3], f[4], len(f) > 5 and f[5] == 1)
        return cls(f[0], f[1])

    def dumps(self) -> str:
        if self.limit is None:
            return f"{self.count},{self.expires_ms}"
        flag = 1 if self.alerted else 0
        return f"{self.count},{self.expires_ms},{self.limit},{self.ttl_ms},{self.last_ms},{flag}"

    def live(self, now_ms: int) -> int:
        """The count as the gate sees it: 0 once lapsed."""
        return self.count if self.expires_ms > now_ms else 0


# ---- wire models (ActionQuotaState, ActionQuotaCounterListResponse, the reset pair) -----------

RiskClass = Literal["read_only", "local_mutation", "side_effect", "external_side_effect", "high_risk"]
Window = Literal["per_run", "per_minute_tumbling", "per_hour_tumbling", "per_day_tumbling", "per_tenant_per_day"]
_Kind = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class CounterState(BaseModel):
    """The spec's ActionQuotaState: one counter (``action_kind="__risk__"`` + ``risk_class`` for a
    risk-class counter)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    action_kind: str
    risk_class: RiskClass | None = None
    scope: str
    scope_path: str | None = None
    window: Window
    window_key: str | None = None
    used: int = Field(ge=0)
    limit: int = Field(ge=1)
    remaining: int | None = None
    policy_id: str | None = None
    expires_at: str | None = None
    last_incremented_at: str | None = None


class CounterPage(BaseModel):
    """ActionQuotaCounterListResponse."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    counters: list[CounterState]
    has_more: bool
    next_cursor: str | None = None


class CounterQuery(BaseModel):
    """The filters of ``GET /v1/admin/action-quota-counters``. ``tenant`` is required unless the
    caller is a tenant (then it is the caller's). ``scope`` is a prefix of the counter's scope."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: str | None = None
    scope: Annotated[str, StringConstraints(max_length=1024)] | None = None
    action_kind: _Kind | None = None
    window: Window | None = None
    run_id: Annotated[str, StringConstraints(max_length=256)] | None = None
    include_zero: bool = False
    cursor: Annotated[str, StringConstraints(max_length=4096)] | None = None
    limit: Annotated[int, Field(ge=1, le=200)] = 50

    def binding(self) -> str:
        """What a cursor is bound to: the filters, not the position."""
        parts = (self.tenant, self.scope, self.action_kind, self.window, self.run_id, self.include_zero)
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


class CounterResetRequest(BaseModel):
    """ActionQuotaCounterResetRequest: one counter, named by all its key fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant_id: str | None = None
    scope: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    action_kind: _Kind
    risk_class: RiskClass | None = None
    window: Window
    window_key: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    reason: Annotated[str, StringConstraints(max_length=512)] | None = None

    @model_validator(mode="after")
    def _check(self) -> CounterResetRequest:
        if (self.action_kind == RISK) != (self.risk_class is not None):
            raise ValueError('risk_class is required with action_kind "__risk__", and only with it')
        return self


class CounterReset(BaseModel):
    """ActionQuotaCounterResetResponse."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    counter: CounterState
    previous_used: int = Field(ge=0)


# ---- names ------------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class _Name:
    scope: str
    target: str  # the kind, or "__risk__:<class>"
    window: str
    part: str  # run_id, or the bucket's index

    @classmethod
    def parse(cls, name: str) -> _Name | None:
        """``None`` for names that are not quota counters (loop-guard counters, foreign text)."""
        fields = name.split("|")
        for i in range(2, len(fields) - 1):  # a kind may hold "|"; the window never does
            if fields[i] in quotas.WINDOWS:
                target = "|".join(fields[1:i])
                if target.startswith(_LOOP):
                    return None
                return cls(fields[0], target, fields[i], "|".join(fields[i + 1 :]))
        return None

    def window_key(self) -> str:
        if self.window == "per_run":
            return self.part
        return quotas.bucket_label(self.window, int(self.part))


def counter_name(req: CounterResetRequest, owner: str) -> str:
    """The stored name of the counter a reset request names (the window_key as the listing shows
    it: the run_id, or the UTC bucket ``2026-04-09T14``), checked to be ``owner``'s."""
    if scope_tenant(req.scope) != owner:
        raise InvalidRequest(f"scope {req.scope[:128]!r} is not under tenant {owner!r}")
    target = f"{RISK}:{req.risk_class}" if req.action_kind == RISK else req.action_kind
    if req.window == "per_run":
        part = req.window_key
    else:
        part = str(quotas.bucket_index(req.window, req.window_key))
    return f"{req.scope}|{target}|{req.window}|{part}"


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def state_of(name: str, value: CounterValue, now_ms: int) -> CounterState | None:
    """The counter as ActionQuotaState, or ``None`` when it is not one to show: not a quota
    counter, lapsed, its window over, or written before limits were kept."""
    n = _Name.parse(name)
    if n is None or value.limit is None or value.expires_ms <= now_ms:
        return None
    if n.window == "per_run":
        expires = value.expires_ms
    else:
        expires = quotas.bucket_end(n.window, int(n.part))
        if expires <= now_ms:
            return None
    risk = n.target[len(RISK) + 1 :] if n.target.startswith(RISK + ":") else None
    return CounterState(
        action_kind=RISK if risk is not None else n.target,
        risk_class=risk,  # type: ignore[arg-type]
        scope=n.scope,
        scope_path=n.scope,
        window=n.window,  # type: ignore[arg-type]
        window_key=n.window_key(),
        used=value.count,
        limit=max(1, value.limit),
        remaining=max(0, value.limit - value.count),
        expires_at=_iso(expires),
        last_incremented_at=_iso(value.last_ms) if value.last_ms else None,
    )


def correlation_id(tenant: str, counter: CounterState | dict[str, Any]) -> str:
    """The spec's deterministic hash over (tenant_id, scope, action_kind or risk_class, window,
    window_key) of a counter (a state, or an event's data): a reset correlates with the counter's
    threshold crossings and denials."""
    c = counter.model_dump() if isinstance(counter, CounterState) else counter
    what = c.get("risk_class") or c["action_kind"]
    parts = [tenant, c["scope"], what, c["window"], c.get("window_key") or ""]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


# ---- which names a query reads ----------------------------------------------------------------


def effective_tenant(query_tenant: str | None, caller: str | None) -> str:
    """The one tenant a read or reset touches: a tenant caller's own (another one named is refused
    as not found, saying nothing about it), else the one the trusted caller names."""
    if caller is not None:
        if query_tenant is not None and query_tenant != caller:
            raise NotFound("no such counter")
        return caller
    if not query_tenant:
        raise InvalidRequest("tenant_id is required", details={"missing_required_field": "tenant_id"})
    return query_tenant


def tenant_ranges(tenant: str, scope_prefix: str | None) -> list[str]:
    """The name prefixes, in key order, that hold ``tenant``'s counters within ``scope_prefix``:
    ``tenant:<t>/...`` and ``tenant:<t>|...`` (never ``tenant:<t>x``, another tenant)."""
    root = f"tenant:{tenant}"
    if scope_prefix is None or root.startswith(scope_prefix):
        return [root + "/", root + "|"]
    if scope_prefix.startswith(root + "/"):
        return [scope_prefix]
    return []


class Pager:
    """Builds one page from names handed over in key order (``feed`` until it says stop)."""

    def __init__(self, query: CounterQuery, tenant: str, now_ms: int, scan_budget: int = paging.SCAN_BUDGET) -> None:
        self.query = query
        self.tenant = tenant
        self.now_ms = now_ms
        self.scan_budget = scan_budget
        self.items: list[CounterState] = []
        self._binding = query.model_copy(update={"tenant": tenant}).binding()
        self._scanned = 0
        self._last: str | None = None
        self._stopped_at: str | None = None
        after = paging.decode_position(query.cursor, self._binding, (str,))
        self.after: str | None = after[0] if after is not None else None

    def start(self, prefix: str) -> str | None:
        """Where to read ``prefix``'s range from: strictly after this name (``None``: its start)."""
        if self.after is None or self.after < prefix:
            return None
        return self.after

    def feed(self, name: str, text: str) -> bool:
        """Take one stored counter; ``True`` when the page is complete (read no more)."""
        if self._scanned >= self.scan_budget and self._last is not None:
            self._stopped_at = self._last
            return True
        state = self._keep(name, text)
        if state is not None:
            if len(self.items) == self.query.limit:
                self._stopped_at = self._last
                return True
            self.items.append(state)
        self._last = name
        self._scanned += 1
        return False

    def _keep(self, name: str, text: str) -> CounterState | None:
        q = self.query
        try:
            state = state_of(name, CounterValue.loads(text), self.now_ms)
        except ValueError:
            return None
        if state is None or scope_tenant(state.scope) != self.tenant:
            return None
        if q.action_kind is not None and state.action_kind != q.action_kind:
            return None
        if q.window is not None and state.window != q.window:
            return None
        if q.run_id is not None and (state.window != "per_run" or state.window_key != q.run_id):
            return None
        if state.used == 0 and not q.include_zero:
            return None
        return state

    def page(self) -> CounterPage:
        if self._stopped_at is None:
            return CounterPage(counters=self.items, has_more=False)
        cursor = paging.encode_position((self._stopped_at,), self._binding)
        return CounterPage(counters=self.items, has_more=True, next_cursor=cursor)


# ---- over a transactional store (memory, SQLite) ----------------------------------------------

_BATCH = 256


def _rows(txn: Txn, prefix: str, after: str | None) -> Iterator[tuple[str, str]]:
    """``qc|`` entries under ``prefix`` in key order, strictly after ``after``, a batch at a time."""
    while True:
        batch = txn.scan_meta("qc|" + prefix, _BATCH, after=None if after is None else "qc|" + after)
        for key, text in batch:
            yield key[3:], text
        if len(batch) < _BATCH:
            return
        after = batch[-1][0][3:]


def list_counters(txn: Txn, query: CounterQuery, tenant: str | None) -> CounterPage:
    """One page of the tenant's live counters, in name order."""
    owner = effective_tenant(query.tenant, tenant)
    pager = Pager(query, owner, txn.now_ms)
    for prefix in tenant_ranges(owner, query.scope):
        for name, text in _rows(txn, prefix, pager.start(prefix)):
            if pager.feed(name, text):
                return pager.page()
    return pager.page()


def reset_counter(txn: Txn, req: CounterResetRequest, tenant: str | None) -> CounterReset:
    """RESET SEMANTICS: the count goes to 0 at once; a tumbling window keeps its expiry, a per_run
    counter's TTL is refreshed; reservations are untouched. 404 when no live counter has the name."""
    owner = effective_tenant(req.tenant_id, tenant)
    name = counter_name(req, owner)
    found = txn.get_meta(["qc|" + name]).get("qc|" + name)
    value = CounterValue.loads(found) if found is not None else None
    if value is None or value.expires_ms <= txn.now_ms:
        raise not_found(req)
    new = reset_value(value, req.window, txn.now_ms)
    txn.put_meta("qc|" + name, new.dumps())
    if new.expires_ms != value.expires_ms:  # the purge index finds it at its new expiry
        txn.put_meta(f"qx|{new.expires_ms:016d}|{name}", "")
    return CounterReset(counter=reset_state(name, new, req, txn.now_ms), previous_used=value.count)


def not_found(req: CounterResetRequest) -> NotFound:
    return NotFound(
        f"no live {req.window} counter {req.window_key[:64]!r} for {req.action_kind} on {req.scope[:128]}",
        details={"scope": req.scope[:128], "window": req.window},
    )


def reset_value(value: CounterValue, window: str, now_ms: int) -> CounterValue:
    expires = value.expires_ms
    if window == "per_run" and value.ttl_ms:
        expires = now_ms + value.ttl_ms
    return CounterValue(0, expires, value.limit, value.ttl_ms, value.last_ms)  # the threshold may announce again


def reset_state(name: str, value: CounterValue, req: CounterResetRequest, now_ms: int) -> CounterState:
    """The counter after its reset (a value without a kept limit shows limit 1: it has none)."""
    shown = value if value.limit is not None else CounterValue(0, value.expires_ms, 1, None, value.last_ms)
    state = state_of(name, shown, now_ms)
    if state is None:  # a tumbling window that ended but whose count had not lapsed yet
        state = CounterState(
            action_kind=req.action_kind,
            risk_class=req.risk_class,
            scope=req.scope,
            scope_path=req.scope,
            window=req.window,
            window_key=req.window_key,
            used=0,
            limit=shown.limit or 1,
            remaining=shown.limit or 1,
        )
    return state


def detail(req: CounterResetRequest, result: CounterReset, actor_id: str) -> dict[str, Any]:
    """EventDataQuotaCounterReset of a reset."""
    data: dict[str, Any] = {
        "scope": req.scope,
        "action_kind": req.action_kind,
        "window": req.window,
        "window_key": req.window_key,
        "previous_used": result.previous_used,
        "actor_id": actor_id,
        "limit": result.counter.limit,
    }
    if req.risk_class is not None:
        data["risk_class"] = req.risk_class
    if req.reason:
        data["reason"] = req.reason
    return data
