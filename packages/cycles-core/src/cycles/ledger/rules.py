"""The accounting rules of the Cycles protocol, written once.

Every operation here runs inside one transaction of a store (``Txn``): memory and SQLite run these
functions directly; the Redis Lua scripts mirror them line for line and are held to the same
contract suite. Each operation checks everything first and only then writes, so an operation that
raises has written nothing -- except expiry, which is applied and then reported (see ``_expire``).

Balances are stored as allocated / spent / reserved / debt; ``remaining`` is always derived, so
``remaining = allocated - spent - reserved - debt`` holds by construction.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast

from pydantic import BaseModel

from cycles.errors import (
    BudgetClosed,
    BudgetExceeded,
    BudgetFrozen,
    BudgetInUse,
    CyclesError,
    DebtOutstanding,
    Denied,
    Forbidden,
    IdempotencyMismatch,
    InvalidRequest,
    MaxExtensionsExceeded,
    NotFound,
    OverdraftLimitExceeded,
    ReservationExpired,
    ReservationFinalized,
    UnitMismatch,
    deny_detail_of,
)
from cycles.identifiers import is_identifier
from cycles.ledger import custom_kinds, funding, periods, policies, quotas
from cycles.ledger.counters import CounterValue
from cycles.ledger.limits import TenantLimits, check_active_limit, check_metadata
from cycles.ledger.paging import ReservationScan, decode_position, encode_position, keyset_page
from cycles.models import (
    INT64_MAX,
    Action,
    Amount,
    Balance,
    BalanceResponse,
    Budget,
    Caps,
    CommitOveragePolicy,
    CommitRequest,
    CommitResponse,
    Decision,
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
    ReservationStatus,
    ReservationSummary,
    SignedAmount,
    Subject,
    Unit,
    trusted,
)
from cycles.scopes import LEVELS, derive_scopes, parse_scope, scope_tenant

MAX_EXTENSIONS = 10
IDEMPOTENCY_RETENTION_MS = 24 * 3600 * 1000
BUDGET_ACTIVE, BUDGET_FROZEN, BUDGET_CLOSED = "ACTIVE", "FROZEN", "CLOSED"
BUDGET_STATUSES = (BUDGET_ACTIVE, BUDGET_FROZEN, BUDGET_CLOSED)

R = TypeVar("R", bound=BaseModel)
_B = TypeVar("_B", bound=Balance)

# Enum members bound once: attribute access on an Enum class is slow on the hot path (Python 3.11).
_REJECT = CommitOveragePolicy.REJECT
_ACTIVE = ReservationStatus.ACTIVE


# ---- stored rows ----------------------------------------------------------------------------


@dataclass(slots=True)
class BudgetRow:
    scope: str
    unit: Unit
    tenant: str | None
    allocated: int = 0
    spent: int = 0
    reserved: int = 0
    debt: int = 0
    overdraft_limit: int = 0
    is_over_limit: bool = False
    status: str = BUDGET_ACTIVE
    caps: Caps | None = None

    @property
    def remaining(self) -> int:
        return self.allocated - self.spent - self.reserved - self.debt

    def copy(self) -> BudgetRow:
        return BudgetRow(
            self.scope,
            self.unit,
            self.tenant,
            self.allocated,
            self.spent,
            self.reserved,
            self.debt,
            self.overdraft_limit,
            self.is_over_limit,
            self.status,
            self.caps,
        )

    def to_balance(self) -> Balance:
        unit = self.unit
        mk = functools.partial(trusted, Amount)
        return trusted(
            Balance,
            scope=self.scope,
            scope_path=self.scope,
            remaining=trusted(SignedAmount, unit=unit, amount=self.remaining),
            reserved=mk(unit=unit, amount=self.reserved),
            spent=mk(unit=unit, amount=self.spent),
            debt=mk(unit=unit, amount=self.debt),
            allocated=mk(unit=unit, amount=self.allocated),
            overdraft_limit=mk(unit=unit, amount=self.overdraft_limit),
            is_over_limit=self.is_over_limit,
        )

    def to_budget(self) -> Budget:
        """The operator plane's view: the Balance plus status and caps."""
        balance = self.to_balance()
        return trusted(Budget, **balance.__dict__, status=self.status, caps=self.caps)


@dataclass(slots=True)
class ReservationRow:
    reservation_id: str
    tenant: str | None
    status: ReservationStatus
    subject: Subject
    action: Action
    unit: Unit
    amount: int
    budgeted_scopes: list[str]  # the scopes that had a budget at reserve time: settle exactly those
    affected_scopes: list[str]
    created_at_ms: int
    expires_at_ms: int
    grace_period_ms: int
    overage_policy: CommitOveragePolicy
    idempotency_key: str | None = None
    committed: int | None = None
    finalized_at_ms: int | None = None
    extensions: int = 0
    metadata: dict[str, Any] | None = None
    committed_metadata: dict[str, Any] | None = None

    @property
    def deadline_ms(self) -> int:
        """After this instant a commit is refused and the reserved amount goes back."""
        return self.expires_at_ms + self.grace_period_ms

    @property
    def scope_path(self) -> str:
        return self.affected_scopes[-1]

    def copy(self) -> ReservationRow:
        return ReservationRow(
            self.reservation_id,
            self.tenant,
            self.status,
            self.subject,
            self.action,
            self.unit,
            self.amount,
            self.budgeted_scopes,
            self.affected_scopes,
            self.created_at_ms,
            self.expires_at_ms,
            self.grace_period_ms,
            self.overage_policy,
            self.idempotency_key,
            self.committed,
            self.finalized_at_ms,
            self.extensions,
            self.metadata,
            self.committed_metadata,
        )

    def to_summary(self, cls: type[ReservationSummary] = ReservationSummary) -> ReservationSummary:
        mk = functools.partial(trusted, Amount)
        return trusted(
            cls,
            reservation_id=self.reservation_id,
            status=self.status,
            idempotency_key=self.idempotency_key,
            subject=self.subject,
            action=self.action,
            reserved=mk(unit=self.unit, amount=self.amount),
            created_at_ms=self.created_at_ms,
            expires_at_ms=self.expires_at_ms,
            finalized_at_ms=self.finalized_at_ms,
            scope_path=self.scope_path,
            affected_scopes=list(self.affected_scopes),
            committed=mk(unit=self.unit, amount=self.committed) if self.committed is not None else None,
            metadata=self.metadata,
            committed_metadata=self.committed_metadata,
        )


def _has_free_form_dicts(request: BaseModel) -> bool:
    """Whether a request carries maps whose key order comes from the caller (metadata, subject
    dimensions, custom metrics): the only parts of a request whose JSON is not canonical as is."""
    if getattr(request, "metadata", None):
        return True
    subject = getattr(request, "subject", None)
    if subject is not None and subject.dimensions:
        return True
    metrics = getattr(request, "metrics", None)
    return metrics is not None and bool(metrics.custom)


class Fingerprint:
    """The identity of a request payload for IDEMPOTENCY_MISMATCH detection.

    ``digest`` (sha256 of canonical JSON) is computed only when a store needs it: the memory store
    compares the request objects themselves, which costs nothing unless a key is replayed.
    """

    __slots__ = ("_digest", "extra", "request")

    def __init__(self, request: BaseModel, *extra: str) -> None:
        self.request = request
        self.extra = extra
        self._digest: str | None = None

    @property
    def digest(self) -> str:
        if self._digest is None:
            ready = getattr(_ready, "digest", None)  # computed before a store's lock (see prepared_digest)
            if ready is not None and ready[0] is self.request and ready[1] == self.extra:
                digest: str = ready[2]
                self._digest = digest
                return digest
            request = self.request
            if _has_free_form_dicts(request):  # user dicts: key order is the caller's, so canonicalise
                body = json.dumps(
                    request.model_dump(mode="json", exclude_none=True), sort_keys=True, separators=(",", ":")
                )
            else:  # field order is the model's: pydantic's own JSON is already canonical, and 4x cheaper
                body = request.model_dump_json(exclude_none=True)
            if self.extra:
                body += "\x1f" + "\x1f".join(self.extra)
            self._digest = hashlib.sha256(body.encode()).hexdigest()
        return self._digest

    def same_payload(self, other: Fingerprint | str) -> bool:
        if isinstance(other, str):
            return other == self.digest
        if other.extra != self.extra:
            return False
        if other.request is self.request:
            return True
        return other.digest == self.digest


_ready = threading.local()


@contextlib.contextmanager
def prepared_digest(request: BaseModel, *extra: str) -> Iterator[None]:
    """Compute ``request``'s fingerprint now -- before a store takes its write lock -- for the
    ``Fingerprint`` the operation makes of the same request object in this thread."""
    _ready.digest = (request, extra, Fingerprint(request, *extra).digest)
    try:
        yield
    finally:
        _ready.digest = None


@dataclass(slots=True)
class IdempotencyRecord:
    """A remembered success. Stores that serialize keep ``fingerprint`` as the digest string and
    ``response`` as its JSON dict; the memory store keeps the objects."""

    fingerprint: Fingerprint | str
    response: BaseModel | dict[str, Any] | bytes
    created_at_ms: int


class AllTenants:
    """``due_reservations``' default: every tenant's (``None`` is a tenant value: no tenant)."""


ALL_TENANTS = AllTenants()


class Txn(Protocol):
    """One atomic unit of work against a store. Reads see this transaction's own writes."""

    now_ms: int
    include_balances: bool  # put Balance snapshots into reserve/commit/release/event responses
    limits: TenantLimits  # per-tenant bounds on storage (metadata size, ACTIVE reservations)

    def get_budget(self, scope: str, unit: Unit) -> BudgetRow | None: ...
    def get_budgets(self, scopes: Sequence[str], unit: Unit) -> list[BudgetRow]:
        """The budgets that exist among ``scopes`` in ``unit``, in the order of ``scopes``."""
        ...

    def budget_units(self, scope: str) -> list[Unit]: ...
    def put_budget(self, row: BudgetRow) -> None: ...
    def delete_budget(self, scope: str, unit: Unit) -> None:
        """Remove the row (with its caps) and its place in the paging index."""
        ...

    def iter_budgets(self, tenant: str | None, all_tenants: bool) -> Iterable[BudgetRow]: ...
    def get_reservation(self, reservation_id: str) -> ReservationRow | None: ...
    def put_reservation(self, row: ReservationRow) -> None: ...
    def iter_reservations(self, tenant: str | None, all_tenants: bool) -> Iterable[ReservationRow]: ...
    def page_reservations(self, scan: ReservationScan) -> Iterable[ReservationRow]:
        """Rows in ``(created_at_ms, reservation_id)`` order (see ``ReservationScan``) from an
        index: the cost is what the caller reads, not what the store holds."""
        ...

    def page_budgets(self, tenant: str | None, all_tenants: bool, after: tuple[str, str] | None) -> Iterable[BudgetRow]:
        """Budgets in ``(scope, unit)`` order strictly after ``after``, from an index."""
        ...

    def active_reservations(self, owner: str | None) -> int:
        """How many ACTIVE reservations ``owner`` holds (a maintained count, not a scan)."""
        ...

    def due_reservations(self, now_ms: int, limit: int, tenant: str | AllTenants | None = ALL_TENANTS) -> list[str]:
        """Up to ``limit`` ACTIVE reservations past their deadline (of one tenant, ``None``: the
        subjects without one), earliest first."""
        ...

    def get_idempotency(self, tenant: str, endpoint: str, key: str) -> IdempotencyRecord | None: ...
    def put_idempotency(self, tenant: str, endpoint: str, key: str, record: IdempotencyRecord) -> None: ...
    def purge(self, older_than_ms: int, limit: int) -> int:
        """Drop idempotency records and finished reservations last touched before ``older_than_ms``."""
        ...

    # A small key -> text store for state beside the budgets: budget periods, quota rules and counters.
    def get_meta(self, keys: Sequence[str]) -> dict[str, str]: ...
    def put_meta(self, key: str, value: str | None) -> None:
        """Write ``key`` (``None`` deletes it)."""
        ...

    def scan_meta(self, prefix: str, limit: int | None = None, *, after: str | None = None) -> list[tuple[str, str]]:
        """Entries whose key starts with ``prefix``, in key order (the first ``limit``; strictly
        after the key ``after`` when given)."""
        ...


# ---- small helpers --------------------------------------------------------------------------


def fingerprint(request: BaseModel, *extra: str) -> str:
    """A stable digest of a request payload (canonical JSON), for IDEMPOTENCY_MISMATCH detection."""
    return Fingerprint(request, *extra).digest


class _Ids:
    """Unique ids without a syscall per id: a random per-process prefix (renewed after fork) and a
    counter. Ids are identifiers, not secrets: ownership is checked on every access."""

    def __init__(self) -> None:
        self._renew()
        os.register_at_fork(after_in_child=self._renew)

    def _renew(self) -> None:
        self._prefix = uuid.uuid4().hex[:16]
        self._counter = itertools.count(1)

    def next(self, kind: str) -> str:
        return f"{kind}_{self._prefix}{next(self._counter):016x}"


_ids = _Ids()


def new_reservation_id() -> str:
    return _ids.next("rsv")


def new_event_id() -> str:
    return _ids.next("evt")


def new_idempotency_key() -> str:
    return _ids.next("cyc")


def _check_tenant(owner: str | None, tenant: str | None) -> None:
    """``tenant`` is the caller's effective tenant; ``None`` means a trusted in-process caller."""
    if tenant is not None and owner != tenant:
        raise Forbidden("reservation belongs to another tenant")


def check_subject_tenant(subject: Subject, tenant: str | None) -> None:
    if tenant is not None and subject.tenant is not None and subject.tenant != tenant:
        raise Forbidden(f"subject.tenant {subject.tenant!r} does not match the authenticated tenant")


def _amount(unit: Unit, value: int) -> Amount:
    return trusted(Amount, unit=unit, amount=value)


def idempotency_tenant(tenant: str | None, owner: str | None) -> str:
    return tenant if tenant is not None else (owner or "")


def _replay(txn: Txn, tenant: str, endpoint: str, key: str, digest: Fingerprint, cls: type[R]) -> R | None:
    record = txn.get_idempotency(tenant, endpoint, key)
    if record is None:
        return None
    if not digest.same_payload(record.fingerprint):
        raise IdempotencyMismatch(
            f"idempotency key {key!r} was already used on {endpoint} with a different payload",
            details={"idempotency_key": key, "endpoint": endpoint},
        )
    if isinstance(record.response, BaseModel):
        return cast(R, record.response.model_copy())
    if isinstance(record.response, bytes | str):
        return cls.model_validate_json(record.response)
    return cls.model_validate(record.response)


def _remember(txn: Txn, tenant: str, endpoint: str, key: str, digest: Fingerprint, response: BaseModel) -> None:
    txn.put_idempotency(tenant, endpoint, key, IdempotencyRecord(digest, response, txn.now_ms))


def _remaining_ttl(txn: Txn, row: ReservationRow | None, expires_at_ms: int) -> int:
    if row is None or row.status is not ReservationStatus.ACTIVE:
        return 0
    return max(0, expires_at_ms - txn.now_ms)


# ---- evaluation (shared by reserve, dry-run and decide) -------------------------------------


@dataclass(slots=True)
class Verdict:
    scopes: list[str]
    budgets: list[BudgetRow] = field(default_factory=list)
    denial: CyclesError | None = None
    caps: Caps | None = None
    counters: list[quotas.Counter] = field(default_factory=list)  # quota counters a grant increments
    observe: bool = False  # the tenant's observe_mode is OBSERVE
    policy: policies.Resolved = field(default_factory=lambda: policies.NO_POLICIES)  # named policies in force

    @property
    def decision(self) -> Decision:
        if self.denial is not None:
            return Decision.DENY
        return Decision.ALLOW_WITH_CAPS if self.caps is not None else Decision.ALLOW


def _budgets_for(txn: Txn, scopes: Sequence[str], unit: Unit) -> list[BudgetRow]:
    rows = txn.get_budgets(scopes, unit)
    if rows:
        roll_periods(txn, rows)
    return rows


def _missing_budget(txn: Txn, scopes: Sequence[str], unit: Unit) -> CyclesError:
    """NOT_FOUND, or UNIT_MISMATCH when a derived scope has a budget in another unit."""
    for scope in scopes:
        units = txn.budget_units(scope)
        if units:
            return UnitMismatch(
                f"no {unit.value} budget for scope {scope}; it has budgets in " + ", ".join(u.value for u in units),
                details={"scope": scope, "requested_unit": unit.value, "expected_units": [u.value for u in units]},
            )
    return NotFound(f"Budget not found for provided scope: {scopes[-1]}", details={"scopes": list(scopes)})


def _status_denial(budgets: Sequence[BudgetRow]) -> CyclesError | None:
    for row in budgets:
        if row.status == BUDGET_CLOSED:
            return BudgetClosed(f"budget {row.scope} is closed", details={"scope": row.scope})
    for row in budgets:
        if row.status == BUDGET_FROZEN:
            return BudgetFrozen(f"budget {row.scope} is frozen", details={"scope": row.scope})
    return None


def evaluate(
    txn: Txn, subject: Subject, estimate: Amount, action: Action | None = None, *, reserving: bool = False
) -> Verdict:
    """Decide a reservation without writing. Order: a named policy's rate limit (``reserving``: a
    reservation would be created), action-kind access, risk-class quotas, per-kind quotas
    (``gate_quotas``), then budget exists, status, over-limit, debt, remaining; caps are the
    tightest of the budgets' and the deciding named policy's."""
    scopes = derive_scopes(subject)
    verdict = Verdict(scopes)
    if action is not None:
        verdict.denial = gate_quotas(txn, verdict, subject, action, reserving)
        if verdict.denial is not None:
            return verdict
    budgets = _budgets_for(txn, scopes, estimate.unit)
    verdict.budgets = budgets
    if not budgets:
        verdict.denial = _missing_budget(txn, scopes, estimate.unit)
        return verdict
    needed = estimate.amount
    pct = quotas.headroom_pct(action) if action is not None and action.tags else 0
    if all(
        b.status == BUDGET_ACTIVE
        and not b.is_over_limit
        and b.debt == 0
        and b.remaining >= needed
        and (not pct or b.remaining - needed >= b.allocated * pct // 100)
        for b in budgets
    ):  # the common case in one pass; the checks below only decide *which* denial it is
        if verdict.policy.caps is not None or any(b.caps for b in budgets):
            verdict.caps = merge_caps([verdict.policy.caps, *(b.caps for b in budgets)])
        return verdict
    verdict.denial = _status_denial(budgets)
    if verdict.denial is not None:
        return verdict
    for row in budgets:  # is_over_limit takes precedence over DEBT_OUTSTANDING (spec)
        if row.is_over_limit:
            verdict.denial = OverdraftLimitExceeded(
                f"scope {row.scope} is over its overdraft limit until reconciled",
                details={"scope": row.scope, "debt": row.debt, "overdraft_limit": row.overdraft_limit},
            )
            return verdict
    for row in budgets:
        if row.debt > 0 and row.overdraft_limit == 0:
            verdict.denial = DebtOutstanding(
                f"scope {row.scope} has outstanding debt; fund it before new reservations",
                details={"scope": row.scope, "debt": row.debt},
            )
            return verdict
    for row in budgets:
        if row.remaining < estimate.amount:
            verdict.denial = BudgetExceeded(
                f"Insufficient remaining budget for scope {row.scope}",
                details={
                    "scope": row.scope,
                    "unit": estimate.unit.value,
                    "remaining": row.remaining,
                    "requested": estimate.amount,
                },
            )
            return verdict
    if pct:
        for row in budgets:
            if row.remaining - needed < row.allocated * pct // 100:
                verdict.denial = quotas.headroom_denial(row.scope, estimate.unit.value, row.remaining, needed, pct)
                return verdict
    verdict.caps = merge_caps([verdict.policy.caps, *(row.caps for row in budgets)])
    return verdict


def merge_caps(all_caps: Iterable[Caps | None]) -> Caps | None:
    """The tightest combination: min of limits, intersection of allowlists, union of denylists."""
    present = [c for c in all_caps if c is not None and not c.is_empty()]
    if not present:
        return None
    if len(present) == 1:
        return present[0]

    def least(values: Iterable[int | None]) -> int | None:
        nums = [v for v in values if v is not None]
        return min(nums) if nums else None

    allow: list[str] | None = None
    for c in present:
        if c.tool_allowlist:
            allow = list(c.tool_allowlist) if allow is None else [t for t in allow if t in c.tool_allowlist]
    deny = sorted({t for c in present for t in (c.tool_denylist or [])}) or None
    cooldowns = [c.cooldown_ms for c in present if c.cooldown_ms is not None]
    return Caps(
        max_tokens=least(c.max_tokens for c in present),
        max_steps_remaining=least(c.max_steps_remaining for c in present),
        tool_allowlist=allow,
        tool_denylist=deny,
        cooldown_ms=max(cooldowns) if cooldowns else None,
    )


def _deny_reason(denial: CyclesError) -> str:
    if isinstance(denial, NotFound):
        return "BUDGET_NOT_FOUND"
    return denial.reason_code if isinstance(denial, Denied) else denial.code


def _deny_detail(denial: CyclesError | None) -> dict[str, Any] | None:
    return None if denial is None else deny_detail_of(denial.code, denial.details)


def denied_dry_run(req: ReservationCreateRequest, scopes: list[str], denial: CyclesError) -> ReservationCreateResponse:
    """A dry run refused before the budget was looked at (quotas, access lists)."""
    return trusted(
        ReservationCreateResponse,
        decision=Decision.DENY,
        affected_scopes=scopes,
        scope_path=scopes[-1],
        reason_code=_deny_reason(denial),
        deny_detail=_deny_detail(denial),
    )


def denied_decision(scopes: list[str], denial: CyclesError) -> DecisionResponse:
    return trusted(
        DecisionResponse,
        decision=Decision.DENY,
        reason_code=_deny_reason(denial),
        affected_scopes=scopes,
        deny_detail=_deny_detail(denial),
    )


# ---- runtime operations ---------------------------------------------------------------------


def _snapshot(txn: Txn, budgets: Sequence[BudgetRow]) -> list[Balance] | None:
    """Balances for a response, when the ledger was asked to include them (the spec makes them optional)."""
    return [b.to_balance() for b in budgets] if txn.include_balances else None


def reserve(txn: Txn, req: ReservationCreateRequest, tenant: str | None) -> ReservationCreateResponse:
    check_subject_tenant(req.subject, tenant)
    custom_kinds.check(req.action.kind)
    idem_tenant = idempotency_tenant(tenant, req.subject.tenant)
    endpoint = "reserve"
    digest = Fingerprint(req)
    replay = _replay(txn, idem_tenant, endpoint, req.idempotency_key, digest, ReservationCreateResponse)
    if replay is not None:
        if replay.reservation_id is not None and replay.expires_at_ms is not None:
            row = txn.get_reservation(replay.reservation_id)
            replay.remaining_ttl_ms = _remaining_ttl(txn, row, replay.expires_at_ms)
        return replay

    check_metadata(txn.limits, req.metadata)
    verdict = evaluate(txn, req.subject, req.estimate, req.action, reserving=not req.dry_run)
    observe = quotas.observing(req.observe_mode, verdict.observe)
    # Lazy expiry: budget held by dead clients goes back before we say no.
    lazy = isinstance(verdict.denial, BudgetExceeded) and not req.dry_run and not observe
    if lazy and expire_due(txn, 1000, req.subject.tenant):
        verdict = evaluate(txn, req.subject, req.estimate, req.action, reserving=True)

    if req.dry_run or observe:
        if isinstance(verdict.denial, UnitMismatch):
            raise verdict.denial
        response = trusted(
            ReservationCreateResponse,
            decision=verdict.decision,
            affected_scopes=verdict.scopes,
            scope_path=verdict.scopes[-1],
            caps=verdict.caps,
            balances=[b.to_balance() for b in verdict.budgets] or None,  # dry-run: always (cheap, wanted)
            reason_code=_deny_reason(verdict.denial) if verdict.denial is not None else None,
            reserved=req.estimate if verdict.denial is None else None,
            deny_detail=_deny_detail(verdict.denial),
        )
        _remember(txn, idem_tenant, endpoint, req.idempotency_key, digest, response)
        if observe:
            quotas.record_observation(req, response, tenant)
        return response

    if verdict.denial is not None:
        raise verdict.denial
    owner = tenant if tenant is not None else req.subject.tenant
    check_active_limit(txn.limits, txn.active_reservations(owner), owner)
    ttl = verdict.policy.ttl(req.ttl_ms)

    amount = req.estimate.amount
    for budget in verdict.budgets:
        budget.reserved += amount
        txn.put_budget(budget)
    now = txn.now_ms
    row_r = ReservationRow(  # positional: this runs on every reservation, keyword parsing is not free
        new_reservation_id(),
        owner,
        _ACTIVE,
        req.subject,
        req.action,
        req.estimate.unit,
        amount,
        [b.scope for b in verdict.budgets],
        verdict.scopes,
        now,
        now + ttl,
        req.grace_period_ms,
        verdict.policy.overage or req.overage_policy,
        req.idempotency_key,
        None,
        None,
        0,
        req.metadata,
    )
    txn.put_reservation(row_r)
    if verdict.counters:
        count_quotas(txn, verdict.counters, row_r.reservation_id)
    response = trusted(
        ReservationCreateResponse,
        decision=verdict.decision,
        reservation_id=row_r.reservation_id,
        reserved=req.estimate,
        expires_at_ms=row_r.expires_at_ms,
        remaining_ttl_ms=ttl,
        scope_path=row_r.scope_path,
        affected_scopes=verdict.scopes,
        caps=verdict.caps,
        balances=_snapshot(txn, verdict.budgets),
    )
    _remember(txn, idem_tenant, endpoint, req.idempotency_key, digest, response)
    return response


def decide(txn: Txn, req: DecisionRequest, tenant: str | None) -> DecisionResponse:
    check_subject_tenant(req.subject, tenant)
    custom_kinds.check(req.action.kind)
    idem_tenant = idempotency_tenant(tenant, req.subject.tenant)
    digest = Fingerprint(req)
    replay = _replay(txn, idem_tenant, "decide", req.idempotency_key, digest, DecisionResponse)
    if replay is not None:
        return replay
    verdict = evaluate(txn, req.subject, req.estimate, req.action)
    if isinstance(verdict.denial, UnitMismatch):  # request-validity error, not a budget state: 400
        raise verdict.denial
    response = trusted(
        DecisionResponse,
        decision=verdict.decision,
        caps=verdict.caps,
        reason_code=_deny_reason(verdict.denial) if verdict.denial is not None else None,
        affected_scopes=verdict.scopes,
        deny_detail=_deny_detail(verdict.denial),
    )
    _remember(txn, idem_tenant, "decide", req.idempotency_key, digest, response)
    return response


def _load_reservation(txn: Txn, reservation_id: str, tenant: str | None) -> ReservationRow:
    row = txn.get_reservation(reservation_id)
    if row is None:
        raise NotFound(f"reservation {reservation_id} not found", details={"reservation_id": reservation_id})
    _check_tenant(row.tenant, tenant)
    return row


def _ensure_settleable(txn: Txn, row: ReservationRow) -> None:
    """Commit and release are accepted until expires_at + grace; after that the lease is gone."""
    if row.status in (ReservationStatus.COMMITTED, ReservationStatus.RELEASED):
        raise ReservationFinalized(
            f"reservation {row.reservation_id} is already {row.status.value}",
            details={"reservation_id": row.reservation_id, "status": row.status.value},
        )
    if row.status is ReservationStatus.EXPIRED:
        raise _expired(row)
    if txn.now_ms > row.deadline_ms:
        _expire(txn, row)
        raise _expired(row)


def _settle_prologue(
    txn: Txn, endpoint: str, reservation_id: str, req: CommitRequest | ReleaseRequest, tenant: str | None, cls: type[R]
) -> tuple[ReservationRow, str, Fingerprint, R | None]:
    """What commit and release check first: the reservation exists and is the caller's, a replay
    returns the stored success, and the lease can still be settled."""
    row = _load_reservation(txn, reservation_id, tenant)
    idem_tenant = idempotency_tenant(tenant, row.tenant)
    digest = Fingerprint(req, reservation_id)
    replay = _replay(txn, idem_tenant, endpoint, req.idempotency_key, digest, cls)
    if replay is None:
        _ensure_settleable(txn, row)
    return row, idem_tenant, digest, replay


def _expired(row: ReservationRow) -> ReservationExpired:
    return ReservationExpired(
        f"reservation {row.reservation_id} expired at {row.expires_at_ms} (grace {row.grace_period_ms} ms)",
        details={"reservation_id": row.reservation_id, "expires_at_ms": row.expires_at_ms},
    )


def _expire(txn: Txn, row: ReservationRow) -> None:
    """Return an abandoned reservation's amount to every scope it held. Written even when the caller
    goes on to raise RESERVATION_EXPIRED: the expiry is a fact, not part of the refused request."""
    for scope in row.budgeted_scopes:
        budget = txn.get_budget(scope, row.unit)
        if budget is not None:
            budget.reserved = max(0, budget.reserved - row.amount)
            txn.put_budget(budget)
    row.status = ReservationStatus.EXPIRED
    txn.put_reservation(row)
    uncount_quotas(txn, row.reservation_id)


def expire_due(txn: Txn, limit: int, tenant: str | AllTenants | None = ALL_TENANTS) -> int:
    """Expire up to ``limit`` reservations whose deadline has passed (of ``tenant`` only, for the
    lazy expiry of a write: Redis's scripts see only the slot of the tenant they write, and every
    backend must answer alike). Returns how many."""
    count = 0
    for reservation_id in txn.due_reservations(txn.now_ms, limit, tenant):
        row = txn.get_reservation(reservation_id)
        if row is not None and row.status is _ACTIVE and txn.now_ms > row.deadline_ms:
            _expire(txn, row)
            count += 1
    return count


def _settle_budgets(
    txn: Txn,
    budgets: list[BudgetRow],
    row: ReservationRow,
    actual: int,
    policy: CommitOveragePolicy,
    *,
    is_event: bool = False,
) -> int:
    """Move a reservation (``row.amount`` held, 0 for events) to spent; returns the amount charged.

    Checks first, writes after, so a refused commit leaves every scope untouched.
    """
    held = row.amount
    delta = actual - held
    charged = actual
    if delta > 0 and policy is _REJECT and not is_event:
        # REJECT on commit refuses any overage: the client had to reserve a buffer.
        raise BudgetExceeded(
            f"actual {actual} exceeds the reserved {held} and overage_policy=REJECT",
            details={"reserved": held, "actual": actual, "scope": row.scope_path},
        )
    if delta > 0:
        short = [b for b in budgets if b.remaining < delta]
        if short:
            worst = min(short, key=lambda b: b.remaining)
            if policy is _REJECT:  # events: refuse what does not fit
                raise BudgetExceeded(
                    f"Insufficient remaining budget for scope {worst.scope}",
                    details={"scope": worst.scope, "remaining": worst.remaining, "requested": delta},
                )
            if policy is CommitOveragePolicy.ALLOW_WITH_OVERDRAFT:
                for b in short:
                    shortfall = delta - max(0, b.remaining)
                    if b.debt + shortfall > b.overdraft_limit:
                        raise OverdraftLimitExceeded(
                            f"commit would take scope {b.scope} past its overdraft limit",
                            details={
                                "scope": b.scope,
                                "debt": b.debt,
                                "shortfall": shortfall,
                                "overdraft_limit": b.overdraft_limit,
                            },
                        )
                for b in budgets:
                    shortfall = max(0, delta - max(0, b.remaining))
                    b.reserved = max(0, b.reserved - held)
                    b.spent += actual - shortfall
                    b.debt += shortfall
                    if b.debt > b.overdraft_limit:
                        b.is_over_limit = True
                    txn.put_budget(b)
                return actual
            # ALLOW_IF_AVAILABLE: charge what every scope can cover; flag the ones that could not.
            capped = max(0, min(b.remaining for b in budgets))
            charged = held + min(delta, capped)
            for b in short:
                b.is_over_limit = True
    for b in budgets:
        b.reserved = max(0, b.reserved - held)
        b.spent += charged
        txn.put_budget(b)
    return charged


def commit(txn: Txn, reservation_id: str, req: CommitRequest, tenant: str | None) -> CommitResponse:
    row, idem_tenant, digest, replay = _settle_prologue(txn, "commit", reservation_id, req, tenant, CommitResponse)
    if replay is not None:
        return replay
    if req.actual.unit != row.unit:
        raise UnitMismatch(
            f"actual is in {req.actual.unit.value} but the reservation is in {row.unit.value}",
            details={"requested_unit": req.actual.unit.value, "expected_units": [row.unit.value]},
        )
    check_metadata(txn.limits, req.metadata, "commit metadata")
    budgets = _budgets_for(txn, row.budgeted_scopes, row.unit)
    charged = _settle_budgets(txn, budgets, row, req.actual.amount, row.overage_policy)
    row.status = ReservationStatus.COMMITTED
    row.committed = charged
    row.finalized_at_ms = txn.now_ms
    row.committed_metadata = req.metadata
    txn.put_reservation(row)
    released = row.amount - req.actual.amount
    response = trusted(
        CommitResponse,
        status="COMMITTED",
        charged=req.actual if charged == req.actual.amount else _amount(row.unit, charged),
        released=_amount(row.unit, released) if released > 0 else None,
        balances=_snapshot(txn, budgets),
    )
    _remember(txn, idem_tenant, "commit", req.idempotency_key, digest, response)
    return response


def release(txn: Txn, reservation_id: str, req: ReleaseRequest, tenant: str | None) -> ReleaseResponse:
    row, idem_tenant, digest, replay = _settle_prologue(txn, "release", reservation_id, req, tenant, ReleaseResponse)
    if replay is not None:
        return replay
    budgets = _budgets_for(txn, row.budgeted_scopes, row.unit)
    for b in budgets:
        b.reserved = max(0, b.reserved - row.amount)
        txn.put_budget(b)
    row.status = ReservationStatus.RELEASED
    row.finalized_at_ms = txn.now_ms
    txn.put_reservation(row)
    uncount_quotas(txn, row.reservation_id)
    response = trusted(
        ReleaseResponse, status="RELEASED", released=_amount(row.unit, row.amount), balances=_snapshot(txn, budgets)
    )
    _remember(txn, idem_tenant, "release", req.idempotency_key, digest, response)
    return response


def extend(
    txn: Txn, reservation_id: str, req: ReservationExtendRequest, tenant: str | None
) -> ReservationExtendResponse:
    row = _load_reservation(txn, reservation_id, tenant)
    idem_tenant = idempotency_tenant(tenant, row.tenant)
    digest = Fingerprint(req, reservation_id)
    replay = _replay(txn, idem_tenant, "extend", req.idempotency_key, digest, ReservationExtendResponse)
    if replay is not None:
        replay.remaining_ttl_ms = _remaining_ttl(txn, row, replay.expires_at_ms)
        return replay
    if row.status in (ReservationStatus.COMMITTED, ReservationStatus.RELEASED):
        raise ReservationFinalized(
            f"reservation {row.reservation_id} is already {row.status.value}",
            details={"reservation_id": row.reservation_id, "status": row.status.value},
        )
    if row.status is ReservationStatus.EXPIRED or txn.now_ms > row.expires_at_ms:
        if row.status is _ACTIVE and txn.now_ms > row.deadline_ms:
            _expire(txn, row)
        raise _expired(row)
    if row.extensions >= MAX_EXTENSIONS:
        raise MaxExtensionsExceeded(
            f"reservation {row.reservation_id} has been extended {row.extensions} times (max {MAX_EXTENSIONS})",
            details={"reservation_id": row.reservation_id, "max_extensions": MAX_EXTENSIONS},
        )
    row.expires_at_ms += req.extend_by_ms
    row.extensions += 1
    txn.put_reservation(row)
    response = trusted(
        ReservationExtendResponse,
        status="ACTIVE",
        expires_at_ms=row.expires_at_ms,
        remaining_ttl_ms=row.expires_at_ms - txn.now_ms,
    )
    _remember(txn, idem_tenant, "extend", req.idempotency_key, digest, response)
    return response


def event(txn: Txn, req: EventCreateRequest, tenant: str | None) -> EventCreateResponse:
    """Post-only accounting: charge ``actual`` with no reservation, under the event's overage policy."""
    check_subject_tenant(req.subject, tenant)
    custom_kinds.check(req.action.kind)
    idem_tenant = idempotency_tenant(tenant, req.subject.tenant)
    digest = Fingerprint(req)
    replay = _replay(txn, idem_tenant, "event", req.idempotency_key, digest, EventCreateResponse)
    if replay is not None:
        return replay
    scopes = derive_scopes(req.subject)
    budgets = _budgets_for(txn, scopes, req.actual.unit)
    if not budgets:
        raise _missing_budget(txn, scopes, req.actual.unit)
    denial = _status_denial(budgets)
    if denial is not None:
        raise denial
    pseudo = ReservationRow(
        reservation_id="",
        tenant=None,
        status=ReservationStatus.ACTIVE,
        subject=req.subject,
        action=req.action,
        unit=req.actual.unit,
        amount=0,
        budgeted_scopes=[],
        affected_scopes=scopes,
        created_at_ms=txn.now_ms,
        expires_at_ms=txn.now_ms,
        grace_period_ms=0,
        overage_policy=req.overage_policy,
    )
    charged = _settle_budgets(txn, budgets, pseudo, req.actual.amount, req.overage_policy, is_event=True)
    response = trusted(
        EventCreateResponse,
        status="APPLIED",
        event_id=new_event_id(),
        charged=_amount(req.actual.unit, charged),
        balances=_snapshot(txn, budgets),
    )
    _remember(txn, idem_tenant, "event", req.idempotency_key, digest, response)
    return response


# ---- reads ----------------------------------------------------------------------------------


def get_reservation(txn: Txn, reservation_id: str, tenant: str | None) -> ReservationDetail:
    row = _load_reservation(txn, reservation_id, tenant)
    if row.status is _ACTIVE and txn.now_ms > row.deadline_ms:
        _expire(txn, row)
    if row.status is ReservationStatus.EXPIRED:
        raise _expired(row)
    summary = row.to_summary(ReservationDetail)
    assert isinstance(summary, ReservationDetail)
    return summary


@dataclass(slots=True)
class SubjectFilter:
    tenant: str | None = None
    workspace: str | None = None
    app: str | None = None
    workflow: str | None = None
    agent: str | None = None
    toolset: str | None = None

    def pairs(self) -> list[tuple[str, str]]:
        return [(lvl, v) for lvl in LEVELS if (v := getattr(self, lvl)) not in (None, "")]

    def matchable(self) -> bool:
        """Whether any stored row could match: stored levels are identifiers, so a filter value that
        is not one matches nothing (and must never reach an index key)."""
        return all(is_identifier(value) for _, value in self.pairs())

    def matches_scope(self, scope: str) -> bool:
        levels = dict(parse_scope(scope))
        return all(levels.get(lvl) == v for lvl, v in self.pairs())

    def matches_subject(self, subject: Subject) -> bool:
        return all(getattr(subject, lvl) == v for lvl, v in self.pairs())


@dataclass(slots=True)
class BalanceQuery(SubjectFilter):
    include_children: bool = False
    limit: int = 50
    cursor: str | None = None


@dataclass(slots=True)
class ReservationQuery(SubjectFilter):
    status: ReservationStatus | None = None
    idempotency_key: str | None = None
    created_from_ms: int | None = None
    created_to_ms: int | None = None
    expires_from_ms: int | None = None
    expires_to_ms: int | None = None
    finalized_from_ms: int | None = None
    finalized_to_ms: int | None = None
    sort_by: str | None = None
    sort_dir: str = "desc"
    include: tuple[str, ...] = ()
    limit: int = 50
    cursor: str | None = None


SORT_KEYS: dict[str, Callable[[ReservationRow], Any]] = {
    "reservation_id": lambda r: r.reservation_id,
    "tenant": lambda r: r.subject.tenant or "",
    "scope_path": lambda r: r.scope_path,
    "status": lambda r: r.status.value,
    "reserved": lambda r: r.amount,
    "created_at_ms": lambda r: r.created_at_ms,
    "expires_at_ms": lambda r: r.expires_at_ms,
}


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= 200:
        raise InvalidRequest("limit must be between 1 and 200")


def _encode_cursor(offset: int, binding: str) -> str:
    raw = json.dumps({"o": offset, "f": binding}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str | None, binding: str) -> int:
    if not cursor:
        return 0
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        offset, bound = int(data["o"]), str(data["f"])
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise InvalidRequest("cursor is not one this server issued") from exc
    if bound != binding or offset < 0:
        raise InvalidRequest("cursor was issued for different filters")
    return offset


def _page(items: list[Any], limit: int, cursor: str | None, binding: str) -> tuple[list[Any], str | None]:
    _check_limit(limit)
    start = _decode_cursor(cursor, binding)
    page = items[start : start + limit]
    more = start + limit < len(items)
    return page, (_encode_cursor(start + limit, binding) if more else None)


def balances(txn: Txn, query: BalanceQuery, tenant: str | None) -> BalanceResponse:
    if not query.pairs():
        raise InvalidRequest("at least one of tenant, workspace, app, workflow, agent, toolset is required")
    if tenant is not None and query.tenant not in (None, "", tenant):
        raise Forbidden("balances can only be queried within the authenticated tenant")
    _check_limit(query.limit)
    if not query.matchable():
        return trusted(BalanceResponse, balances=[], next_cursor=None, has_more=False)
    effective = tenant if tenant is not None else query.tenant
    binding = hashlib.sha256(repr((query.pairs(), effective)).encode()).hexdigest()[:16]
    after = decode_position(query.cursor, binding, (str, str))
    page, position = keyset_page(
        txn.page_budgets(effective, effective is None, after),
        lambda r: r if query.matches_scope(r.scope) else None,
        lambda r: (r.scope, r.unit.value),
        query.limit,
    )
    page, _ = current_view(txn, page)
    next_cursor = encode_position(position, binding) if position is not None else None
    return trusted(
        BalanceResponse,
        balances=[r.to_balance() for r in page],
        next_cursor=next_cursor,
        has_more=next_cursor is not None,
    )


def list_reservations(txn: Txn, query: ReservationQuery, tenant: str | None) -> ReservationListResponse:
    if tenant is not None and query.tenant not in (None, "", tenant):
        raise Forbidden("reservations can only be listed within the authenticated tenant")
    for lo, hi, name in (
        (query.created_from_ms, query.created_to_ms, "from/to"),
        (query.expires_from_ms, query.expires_to_ms, "expires_from/expires_to"),
        (query.finalized_from_ms, query.finalized_to_ms, "finalized_from/finalized_to"),
    ):
        if lo is not None and hi is not None and lo > hi:
            raise InvalidRequest(f"{name}: the lower bound is after the upper bound")
    if query.sort_dir not in ("asc", "desc"):
        raise InvalidRequest("sort_dir must be asc or desc")
    _check_limit(query.limit)
    if not query.matchable():
        return trusted(ReservationListResponse, reservations=[], next_cursor=None, has_more=False)
    effective = tenant if tenant is not None else (query.tenant or None)

    def keep(r: ReservationRow) -> ReservationRow | None:
        # A read writes nothing (it may run outside the write lock): an overdue reservation is
        # shown as the EXPIRED it is, and the sweep or the next write returns its amount.
        if r.status is ReservationStatus.ACTIVE and txn.now_ms > r.deadline_ms:
            r = r.copy()
            r.status = ReservationStatus.EXPIRED
        return r if _matches(r) else None

    def _matches(r: ReservationRow) -> bool:
        if query.status is not None and r.status is not query.status:
            return False
        if query.idempotency_key is not None and r.idempotency_key != query.idempotency_key:
            return False
        if not query.matches_subject(r.subject):
            return False
        for value, lo, hi in (
            (r.created_at_ms, query.created_from_ms, query.created_to_ms),
            (r.expires_at_ms, query.expires_from_ms, query.expires_to_ms),
        ):
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                return False
        if query.finalized_from_ms is not None or query.finalized_to_ms is not None:
            f = r.finalized_at_ms
            if f is None:
                return False
            if (query.finalized_from_ms is not None and f < query.finalized_from_ms) or (
                query.finalized_to_ms is not None and f > query.finalized_to_ms
            ):
                return False
        return True

    binding = hashlib.sha256(
        repr(
            (
                query.pairs(),
                effective,
                query.status,
                query.idempotency_key,
                query.created_from_ms,
                query.created_to_ms,
                query.expires_from_ms,
                query.expires_to_ms,
                query.finalized_from_ms,
                query.finalized_to_ms,
                query.sort_by,
                query.sort_dir,
            )
        ).encode()
    ).hexdigest()[:16]
    if (query.sort_by or "created_at_ms") == "created_at_ms":  # the default order: an index walk
        statuses: tuple[ReservationStatus, ...] | None
        if query.status is None:
            statuses = None
        elif query.status is ReservationStatus.EXPIRED:  # overdue ACTIVE rows read as EXPIRED
            statuses = (ReservationStatus.EXPIRED, _ACTIVE)
        else:
            statuses = (query.status,)
        after = decode_position(query.cursor, binding, (int, str))
        page, position = keyset_page(
            txn.page_reservations(
                ReservationScan(effective, effective is None, statuses, query.sort_dir == "desc", after)
            ),
            keep,
            lambda r: (r.created_at_ms, r.reservation_id),
            query.limit,
        )
        next_cursor = encode_position(position, binding) if position is not None else None
    else:  # other sort keys have no index: sorted in full (bounded by the tenant's retained rows)
        rows = [k for r in txn.iter_reservations(effective, all_tenants=effective is None) if (k := keep(r))]
        key = SORT_KEYS[query.sort_by or "created_at_ms"]
        rows.sort(key=lambda r: (key(r), r.reservation_id), reverse=query.sort_dir == "desc")
        page, next_cursor = _page(rows, query.limit, query.cursor, binding)
    summaries = []
    for r in page:
        s = r.to_summary()
        if "metadata" not in query.include:
            s.metadata = None
        if "committed_metadata" not in query.include:
            s.committed_metadata = None
        summaries.append(s)
    return trusted(
        ReservationListResponse, reservations=summaries, next_cursor=next_cursor, has_more=next_cursor is not None
    )


# ---- operator plane -------------------------------------------------------------------------


def set_budget(
    txn: Txn,
    scope: str,
    amount: Amount,
    overdraft_limit: Amount | None,
    caps: Caps | None,
    period: periods.PeriodSpec | None = None,
) -> Balance:
    """Create a budget or change its allocation. Spent, reserved and debt are kept."""
    parse_scope(scope)
    if overdraft_limit is not None and overdraft_limit.unit != amount.unit:
        raise UnitMismatch("overdraft_limit must be in the budget's unit")
    state = period.state(amount.amount, txn.now_ms) if period is not None else None
    row = txn.get_budget(scope, amount.unit) or BudgetRow(scope, amount.unit, scope_tenant(scope))
    if row.status == BUDGET_CLOSED:
        raise BudgetClosed(f"budget {scope} is closed", details={"scope": scope})
    state = configure_period(txn, row, state, period)
    row.allocated = amount.amount
    if state is not None:
        state.base = amount.amount
        txn.put_meta(periods.meta_key(scope, amount.unit.value), state.dumps())
    if overdraft_limit is not None:
        row.overdraft_limit = overdraft_limit.amount
    if caps is not None:
        row.caps = None if caps.is_empty() else caps
    _reconcile_over_limit(row)
    txn.put_budget(row)
    return with_period(row.to_budget(), state)


def fund_budget(txn: Txn, scope: str, amount: Amount) -> Balance:
    """Add funds. Debt is repaid first (it becomes spent), as the spec's DEBT SEMANTICS require."""
    row, states = _funding_target(txn, scope, amount.unit)
    if row.allocated + amount.amount > INT64_MAX:
        raise InvalidRequest(
            f"funding {scope} would take its allocation past the largest amount a ledger holds ({INT64_MAX})"
        )
    repay = min(row.debt, amount.amount)
    row.debt -= repay
    row.spent += repay
    row.allocated += amount.amount
    _reconcile_over_limit(row)
    txn.put_budget(row)
    return with_period(row.to_budget(), states.get(row.scope))


def set_overdraft_limit(txn: Txn, scope: str, limit: Amount) -> Balance:
    """Change only a budget's overdraft limit (governance ``PATCH /v1/admin/budgets``). Its amounts
    and period are left as they are: re-setting the allocation read a moment before would undo a
    funding that landed in between. lua/overdraft.lua mirrors it."""
    if limit.amount < 0:
        raise InvalidRequest("overdraft_limit must not be negative")
    row, states = _funding_target(txn, scope, limit.unit)
    row.overdraft_limit = limit.amount
    if row.debt > row.overdraft_limit:  # the spec: is_over_limit is recalculated with the limit
        row.is_over_limit = True
    _reconcile_over_limit(row)
    txn.put_budget(row)
    return with_period(row.to_budget(), states.get(row.scope))


def _funding_target(txn: Txn, scope: str, unit: Unit) -> tuple[BudgetRow, dict[str, periods.PeriodState]]:
    """The budget a funding applies to, rolled over to its current period, and not closed."""
    parse_scope(scope)
    row = txn.get_budget(scope, unit)
    if row is None:
        raise _missing_budget(txn, [scope], unit)
    states = roll_periods(txn, [row])
    if row.status == BUDGET_CLOSED:
        raise BudgetClosed(f"budget {scope} is closed", details={"scope": scope})
    return row, states


def apply_funding(
    row: BudgetRow, op: funding.FundingOperation, amount: int, spent: int | None, max_amount: int = INT64_MAX
) -> tuple[int, int, int]:
    """The new (allocated, spent, debt) of a funding operation on ``row`` (see ``funding``), or
    the refusal. Pure: checks only, the caller writes. lua/funding.lua mirrors it line for line."""
    allocated, used, debt = row.allocated, row.spent, row.debt
    if op is funding.FundingOperation.CREDIT:
        allocated += amount
    elif op is funding.FundingOperation.DEBIT:
        if row.remaining - amount < 0:
            raise funding.debit_refused(row.scope, row.unit.value, row.remaining, amount)
        allocated -= amount
    elif op is funding.FundingOperation.RESET:
        allocated = amount
    elif op is funding.FundingOperation.RESET_SPENT:
        allocated, used = amount, spent or 0
    else:  # REPAY_DEBT: the consumption that ran into debt is paid for, and becomes spent
        if amount > debt:
            raise funding.repay_refused(row.scope, row.unit.value, debt, amount)
        allocated, used, debt = allocated + amount, used + amount, debt - amount
    if max(allocated, used) > max_amount:
        raise InvalidRequest(
            f"{op.value} on {row.scope} would take it past the largest amount a ledger holds ({max_amount})"
        )
    return allocated, used, debt


def fund(
    txn: Txn, req: funding.FundingRequest, idempotency_key: str | None, tenant: str | None = None
) -> funding.FundingResult:
    """One funding operation (``funding``), atomic: replay, roll the period over, refuse a frozen or
    closed budget, apply, remember the result under the idempotency key."""
    scope, unit = req.scope, req.unit
    parse_scope(scope)
    idem_tenant = idempotency_tenant(tenant, scope_tenant(scope))
    digest = Fingerprint(req)
    if idempotency_key is not None:
        replayed = _replay(txn, idem_tenant, funding.ENDPOINT, idempotency_key, digest, funding.FundingResult)
        if replayed is not None:
            replayed.replayed = True
            return replayed
    row, states = _funding_target(txn, scope, unit)
    if row.status == BUDGET_FROZEN:
        raise BudgetFrozen(f"budget {scope} is frozen", details={"scope": scope})
    spent = req.spent.amount if req.spent is not None else None
    new = apply_funding(row, req.operation, req.amount.amount, spent)
    state = states.get(scope)
    before = with_period(row.to_balance(), state)
    row.allocated, row.spent, row.debt = new
    if row.spent + row.reserved > row.allocated:
        row.is_over_limit = True  # a ceiling below what is already used: no new work until funded
    else:
        _reconcile_over_limit(row)
    txn.put_budget(row)
    result = trusted(
        funding.FundingResult,
        operation=req.operation,
        scope=scope,
        unit=unit,
        before=before,
        after=with_period(row.to_balance(), state),
        funded_at_ms=txn.now_ms,
        replayed=False,
    )
    if idempotency_key is not None:
        _remember(txn, idem_tenant, funding.ENDPOINT, idempotency_key, digest, result)
    return result


def _reconcile_over_limit(row: BudgetRow) -> None:
    """Over-limit clears once debt is back within the limit and the scope is not short of funds."""
    if row.is_over_limit and row.debt <= row.overdraft_limit and row.remaining >= 0:
        row.is_over_limit = False


def set_budget_status(txn: Txn, scope: str, unit: Unit | None, status: str) -> list[Balance]:
    if status not in BUDGET_STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(BUDGET_STATUSES)}")
    parse_scope(scope)
    units = [unit] if unit is not None else txn.budget_units(scope)
    rows = [r for u in units if (r := txn.get_budget(scope, u)) is not None]
    if not rows:
        raise NotFound(f"Budget not found for provided scope: {scope}")
    for row in rows:  # check every unit before writing any: a refusal must leave all of them as they were
        if row.status == BUDGET_CLOSED and status != BUDGET_CLOSED:
            raise BudgetClosed(f"budget {scope} is closed for good", details={"scope": scope})
    for row in rows:
        row.status = status
        txn.put_budget(row)
    return [r.to_budget() for r in rows]


def delete_budget(txn: Txn, scope: str, unit: Unit | None, force: bool = False) -> list[Balance]:
    """Delete a scope's budgets (one unit, or all of them): the row, its caps and its period.
    Refused with ``BudgetInUse`` while a reservation holds an amount on one (it would settle
    against nothing), and with ``DebtOutstanding`` while one carries debt unless ``force`` (the
    debt is written off with the row). Spent goes with the row: the reservations and events keep
    the history. Frozen and closed budgets may be deleted. Every unit is checked before any is
    deleted. Returns the rows as they were last (after any period rollover)."""
    parse_scope(scope)
    units = [unit] if unit is not None else txn.budget_units(scope)
    rows = [r for u in units if (r := txn.get_budget(scope, u)) is not None]
    if not rows:
        raise NotFound(f"Budget not found for provided scope: {scope}")
    roll_periods(txn, rows, by_unit=True)
    for row in rows:
        if row.reserved > 0:
            raise budget_in_use(scope, row.unit.value, row.reserved)
        if row.debt > 0 and not force:
            raise debt_blocks_delete(scope, row.unit.value, row.debt)
    for row in rows:
        txn.delete_budget(scope, row.unit)
        txn.put_meta(periods.meta_key(scope, row.unit.value), None)
    return [r.to_budget() for r in rows]


def budget_in_use(scope: str, unit: str, reserved: int) -> BudgetInUse:
    return BudgetInUse(
        f"budget {scope} ({unit}) has {reserved} reserved: settle or let its reservations expire before deleting it",
        details={"scope": scope, "unit": unit, "reserved": reserved},
    )


def debt_blocks_delete(scope: str, unit: str, debt: int) -> DebtOutstanding:
    return DebtOutstanding(
        f"budget {scope} ({unit}) has a debt of {debt}: fund it, or delete with force to write it off",
        details={"scope": scope, "unit": unit, "debt": debt},
    )


def get_budget(txn: Txn, scope: str, unit: Unit | None) -> Balance:
    parse_scope(scope)
    units = [unit] if unit is not None else txn.budget_units(scope)
    for u in units:
        row = txn.get_budget(scope, u)
        if row is not None:
            (row,), states = current_view(txn, [row])
            return with_period(row.to_budget(), states.get(row.scope))
    raise NotFound(f"Budget not found for provided scope: {scope}")


def list_budgets(txn: Txn, tenant: str | None) -> list[Balance]:
    rows = sorted(txn.iter_budgets(tenant, all_tenants=tenant is None), key=lambda r: (r.scope, r.unit.value))
    rows, states = current_view(txn, rows, by_unit=True)
    return [with_period(r.to_budget(), states.get(f"{r.scope}|{r.unit.value}")) for r in rows]


def sweep(txn: Txn, limit: int, retention_ms: int = IDEMPOTENCY_RETENTION_MS) -> int:
    """Expire overdue reservations; forget finished ones and idempotency records past retention."""
    expired = expire_due(txn, limit)
    txn.purge(txn.now_ms - retention_ms, limit)
    purge_quota_counters(txn, limit)
    return expired


# ---- recurring budgets (periods.py holds the calendar; this is where a ledger applies it) -----


def configure_period(
    txn: Txn, row: BudgetRow, new: periods.PeriodState | None, spec: periods.PeriodSpec | None
) -> periods.PeriodState | None:
    """Store the period of a budget being set; returns the state now in force. Setting the same
    period again keeps the current window (a new allocation applies from now on); a different
    period starts its window at this instant. Without ``spec`` the stored period stays."""
    key = periods.meta_key(row.scope, row.unit.value)
    current_text = txn.get_meta([key]).get(key)
    current = periods.PeriodState.loads(current_text) if current_text is not None else None
    if current is not None and txn.now_ms >= current.end_ms:
        roll_periods(txn, [row])
        current = periods.PeriodState.loads(txn.get_meta([key])[key])
    if spec is None:
        return current
    if new is None:
        if current is not None:
            txn.put_meta(key, None)
        return None
    if current is not None and current.same_spec(new):
        current.rollover = new.rollover
        return current
    return new


def with_period(balance: _B, state: periods.PeriodState | None) -> _B:
    if state is not None:
        balance.period_start = periods.iso(state.start_ms)
        balance.period_end = periods.iso(state.end_ms)
    return balance


def roll_periods(
    txn: Txn, rows: Sequence[BudgetRow], *, by_unit: bool = False, persist: bool = True
) -> dict[str, periods.PeriodState]:
    """Roll over the budgets among ``rows`` whose period has ended (inside the caller's
    transaction). Returns the period of each periodic row, by scope (or ``scope|unit``).
    ``persist=False``: the rows change, the store does not (see ``current_view``)."""
    keys = [periods.meta_key(r.scope, r.unit.value) for r in rows]
    found = txn.get_meta(keys)
    if not found:
        return {}
    out: dict[str, periods.PeriodState] = {}
    for row, key in zip(rows, keys, strict=True):
        text = found.get(key)
        if text is None:
            continue
        state = periods.PeriodState.loads(text)
        if txn.now_ms >= state.end_ms:
            start, end = state.next_window(txn.now_ms)
            row.allocated, row.spent, row.debt = periods.rollover(state, start, end, row.allocated, row.spent, row.debt)
            _reconcile_over_limit(row)
            if persist:
                txn.put_budget(row)
                txn.put_meta(key, state.dumps())
        out[f"{row.scope}|{row.unit.value}" if by_unit else row.scope] = state
    return out


def current_view(
    txn: Txn, rows: Sequence[BudgetRow], *, by_unit: bool = False
) -> tuple[list[BudgetRow], dict[str, periods.PeriodState]]:
    """For reads, which never write (they may run outside the write lock, and a store may hand out
    its live rows): copies of ``rows`` showing the current period's figures, and the periods. The
    next write to such a budget rolls it over for real, with the same arithmetic."""
    copies = [r.copy() for r in rows]
    return copies, (roll_periods(txn, copies, by_unit=by_unit, persist=False) if copies else {})


# ---- action quotas and action-kind access (quotas.py holds the rules; this is their storage) ---
# Meta entries: "policy|<scope>" the scope's ScopePolicy; "qc|<counter>" a counters.CounterValue;
# "qx|<expires at, 16 digits>|<counter>" the expiry index a sweep purges by; "qr|<reservation id>"
# the per_run counters a reservation incremented (given back on release and expiry).
_RS = "\x1e"


def load_policies(txn: Txn, scopes: Sequence[str]) -> dict[str, quotas.ScopePolicy]:
    keys = [quotas.meta_key(s) for s in scopes]
    found = txn.get_meta(keys)
    if not found:
        return {}
    return {s: quotas.load_policy(s, found[k]) for s, k in zip(scopes, keys, strict=True) if k in found}


def _counts(txn: Txn, counters: Sequence[quotas.Counter]) -> list[int]:
    found = txn.get_meta(["qc|" + c.key for c in counters])
    counts = []
    for c in counters:
        text = found.get("qc|" + c.key)
        counts.append(CounterValue.loads(text).live(txn.now_ms) if text is not None else 0)
    return counts


def gate_quotas(
    txn: Txn, verdict: Verdict, subject: Subject, action: Action, reserving: bool = False
) -> CyclesError | None:
    """Steps 1-3 of the evaluation order over the per-scope and the named policies of the path
    (one lookup of O(depth) keys); on a pass ``verdict.counters`` holds what a grant counts."""
    scopes = verdict.scopes
    tenant = subject.tenant
    named = {policies.index_key(tenant, p): p for p in policies.anchor_candidates(scopes)} if tenant else {}
    found = txn.get_meta([quotas.meta_key(s) for s in scopes] + list(named))
    if not found:
        return None
    scoped = {s: quotas.load_policy(s, found[k]) for s in scopes if (k := quotas.meta_key(s)) in found}
    verdict.observe = quotas.tenant_observes(scoped, subject)
    resolved = policies.resolve({p: found[k] for k, p in named.items() if k in found}, scoped, scopes, txn.now_ms)
    verdict.policy = resolved
    return gate(resolved, subject, action, txn.now_ms, reserving, lambda cs: _counts(txn, cs), verdict)


def gate(
    resolved: policies.Resolved,
    subject: Subject,
    action: Action,
    now_ms: int,
    reserving: bool,
    counts: Callable[[list[quotas.Counter]], Sequence[int]] | None,
    verdict: Verdict,
) -> CyclesError | None:
    """Plan the counters of the ranked policies (+ the rate limit when a reservation would be
    created) and check them against ``counts`` (None: the Redis script checks them, atomically);
    ``verdict.counters`` holds them."""
    denial, counters = quotas.plan_ranked(resolved.entries, subject, action, now_ms)
    if denial is not None:
        return denial
    rate = policies.rate_counter(resolved, action.kind, now_ms) if reserving else None
    if rate is not None:
        counters.append(rate)
    if not counters:
        return None
    verdict.counters = counters
    return None if counts is None else quotas.violation(counters, counts(counters))


def count_quotas(txn: Txn, counters: Sequence[quotas.Counter], reservation_id: str) -> None:
    """Step 5, with the budget: +1 on every counter (TTL refreshed, the limit it counted under
    kept for readers); remember the per_run ones."""
    found = txn.get_meta(["qc|" + c.key for c in counters])
    for c in counters:
        text = found.get("qc|" + c.key)
        old = CounterValue.loads(text) if text is not None else None
        n = old.live(txn.now_ms) if old is not None else 0
        alerted = old is not None and old.expires_ms > txn.now_ms and old.alerted  # a new window starts over
        threshold = c.threshold()
        crossed = not alerted and threshold is not None and n + 1 >= threshold
        if crossed:
            quotas.note_threshold(c, n + 1)
        expires = txn.now_ms + c.ttl_ms
        value = CounterValue(n + 1, expires, c.limit, c.ttl_ms, txn.now_ms, alerted or crossed)
        txn.put_meta("qc|" + c.key, value.dumps())
        if n == 0:  # a new counter enters the purge index; a refreshed one is re-indexed when reached
            txn.put_meta(f"qx|{expires:016d}|{c.key}", "")
    runs = [c.key for c in counters if c.per_run]
    if runs:
        txn.put_meta("qr|" + reservation_id, _RS.join(runs))


def uncount_quotas(txn: Txn, reservation_id: str) -> None:
    """PER_RUN COUNTER LIFECYCLE: a released or expired reservation gives its per_run counts back."""
    key = "qr|" + reservation_id
    text = txn.get_meta([key]).get(key)
    if text is None:
        return
    for counter in text.split(_RS):
        found = txn.get_meta(["qc|" + counter]).get("qc|" + counter)
        if found is not None:
            value = CounterValue.loads(found)
            if value.live(txn.now_ms) > 0:
                txn.put_meta("qc|" + counter, dataclasses.replace(value, count=value.count - 1).dumps())
    txn.put_meta(key, None)


def purge_quota_counters(txn: Txn, limit: int) -> int:
    """Forget counters past their cleanup TTL, oldest first, by the expiry index."""
    purged = 0
    for index_key, _ in txn.scan_meta("qx|", limit):
        expires, counter = int(index_key[3:19]), index_key[20:]
        if expires > txn.now_ms:
            break
        found = txn.get_meta(["qc|" + counter]).get("qc|" + counter)
        txn.put_meta(index_key, None)
        if found is not None:
            alive_until = CounterValue.loads(found).expires_ms
            if alive_until <= txn.now_ms:
                txn.put_meta("qc|" + counter, None)
            else:  # refreshed since it was indexed: index it at its current expiry
                txn.put_meta(f"qx|{alive_until:016d}|{counter}", "")
        purged += 1
    return purged


def update_policy(txn: Txn, scope: str, edit: quotas.PolicyEdit) -> quotas.ScopePolicy:
    """Set or delete a quota, or replace an action-kind list, on one scope."""
    parse_scope(scope)
    key = quotas.meta_key(scope)
    text = txn.get_meta([key]).get(key)
    current = quotas.load_policy(scope, text) if text is not None else quotas.ScopePolicy(scope=scope)
    new = quotas.apply_edit(current, edit)
    txn.put_meta(key, None if new.is_empty() else new.dumps())
    return quotas.load_policy(scope, new.dumps())


def list_policies(txn: Txn, tenant: str | None) -> list[quotas.ScopePolicy]:
    out = []
    for key, text in txn.scan_meta("policy|"):
        scope = key[len("policy|") :]
        if tenant is None or scope_tenant(scope) == tenant:
            out.append(quotas.load_policy(scope, text))
    return out


# ---- named policies (policies.py holds the model and the ranking; this is their storage) -------
# Meta entries: "npat|<tenant>|<pattern>" the JSON list of that pattern's policies (what a
# reservation looks up); "npid|<policy id>" "<tenant>|<pattern>" (where a policy is).


def get_named_policy(txn: Txn, policy_id: str) -> policies.NamedPolicy:
    where = txn.get_meta([policies.id_key(policy_id)]).get(policies.id_key(policy_id))
    if where is not None:
        tenant, _, pattern = where.partition("|")
        text = txn.get_meta([policies.index_key(tenant, pattern)]).get(policies.index_key(tenant, pattern))
        for p in policies.load_list(text) if text else ():
            if p.policy_id == policy_id:
                return p
    raise NotFound(f"policy {policy_id} not found", details={"policy_id": policy_id})


def list_named_policies(txn: Txn, tenant: str) -> list[policies.NamedPolicy]:
    out = [p for _, text in txn.scan_meta(policies.index_key(tenant, "")) for p in policies.load_list(text)]
    return sorted(out, key=lambda p: (p.created_at, p.policy_id))


def put_named_policy(txn: Txn, policy: policies.NamedPolicy, create: bool) -> policies.NamedPolicy:
    """Store a new policy (``create``) or the new version of one (its pattern never changes);
    a name is unique within its tenant (409 DUPLICATE_RESOURCE)."""
    if not create:
        get_named_policy(txn, policy.policy_id)  # NotFound first
    policies.check_unique_name(list_named_policies(txn, policy.tenant_id), policy)
    key = policies.index_key(policy.tenant_id, policy.scope_pattern)
    txn.put_meta(key, policies.put_in_list(txn.get_meta([key]).get(key), policy))
    txn.put_meta(policies.id_key(policy.policy_id), f"{policy.tenant_id}|{policy.scope_pattern}")
    return policy
