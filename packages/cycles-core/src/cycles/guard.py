"""The guarded-action lifecycle: reserve -> run -> commit the actual (or release on failure).

The lifecycle is written once, as generator *flows* that yield ledger calls (``_Call``) and pauses
(``_Sleep``) and receive their results; ``Guard`` drives them synchronously and ``AsyncGuard``
with ``await``. Only the shells do I/O (the httpx ``auth_flow`` pattern).

Rules the flows keep:
- A denial raises before the body runs (enforce mode). In shadow mode nothing is blocked: the
  would-deny is recorded in ``Cycles.shadow_log`` and the spend is accounted with an event.
- One settlement rule for a step (a guard): an actual was recorded (the action happened) -> commit
  it, even if the body raised afterwards. The step never started (``begin=False`` and no
  ``begin()``) -> release. The body raised an ordinary exception -> the step *failed*: release by
  default, commit the estimate with ``on_failure="charge"`` (tools that bill even when they fail).
  The step was interrupted after it started (``CancelledError``, ``KeyboardInterrupt``,
  ``GeneratorExit``, or the run it belongs to ended first) -> it may have been billed, so it is
  never released: it ends *without an actual* (below).
- A step that ends without an actual when one was expected (``expect_actual``; by default model
  calls, kind ``llm.*``, whose cost is measured from usage) is surfaced: a warning names it, the
  guard's ``actual_missing`` flag is set, and ``on_missing_actual`` settles it: ``"estimate"``
  (default: commit the estimate), ``"release"``, or ``"leave"`` (no request at all; the
  reservation expires on its own, as CR-BOUNDARY-001 describes). Other steps (tools, nodes) are
  priced by their estimate: committing it is their normal settlement.
- A commit the ledger caps (ALLOW_IF_AVAILABLE on a spent-out scope) is never silent: the
  uncharged part is recorded on the guard (``uncharged``), logged and counted on its run. Record
  true spend as debt with ``overage_policy=ALLOW_WITH_OVERDRAFT`` and an overdraft limit.
- Settlement is never turned into a release: an ambiguous commit is retried with the same
  idempotency key; a commit refused because the reservation expired falls back to an event with
  the same key (``shared/spec/client-recovery-scenarios.yaml`` CR-CORE-001/002).
- A guard opened inside another guard of the same client, unit and subject (or an ancestor of it)
  draws from the outer reservation instead of reserving again, so nothing is counted twice; the
  outer guard then commits what its children spent plus whatever it commits itself.
- Long bodies keep their reservation alive with ``extend`` (heartbeat); a failing heartbeat is
  logged and recorded on the guard, never fatal. Leases are bounded: the heartbeat stops once the
  reservation has been held ``max_lease_ms`` (default 10 minutes), when its guard is garbage
  collected, or (async) when the task that started it is gone; a warning names the reservation,
  which then expires on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
import time
import weakref
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from cycles.errors import (
    BudgetExceeded,
    CyclesError,
    Denied,
    InternalError,
    LedgerUnavailable,
    LimitExceeded,
    MaxExtensionsExceeded,
    NotFound,
    ReservationExpired,
    ReservationFinalized,
    TenantClosed,
    ToolNotAllowed,
    deny_detail_of,
)
from cycles.ledger.rules import new_idempotency_key
from cycles.models import (
    Action,
    Amount,
    Caps,
    CommitOveragePolicy,
    CommitRequest,
    Decision,
    EventCreateRequest,
    ReleaseRequest,
    ReservationCreateRequest,
    ReservationCreateResponse,
    ReservationExtendRequest,
    StandardMetrics,
    Subject,
    trusted,
)
from cycles.otel import step_scope
from cycles.scopes import derive_scopes

if TYPE_CHECKING:
    from cycles.client import AsyncCycles, Cycles

__all__ = ["AsyncGuard", "Guard", "GuardSettings", "Mode", "OnFailure", "OnMissingActual", "ShadowRecord"]

log = logging.getLogger("cycles.guard")
shadow_log = logging.getLogger("cycles.shadow")

Mode = Literal["enforce", "shadow"]
OnFailure = Literal["release", "charge"]
"""A step whose action raised: release its reservation (default), or commit its estimate."""
OnMissingActual = Literal["estimate", "release", "leave"]
"""A step that ended without an actual: commit the estimate, release, or leave it to expire."""
DEFAULT_MAX_LEASE_MS = 600_000
_INTERRUPTIONS = (asyncio.CancelledError, KeyboardInterrupt, GeneratorExit, SystemExit)
_RETRYABLE = (LedgerUnavailable, InternalError, LimitExceeded)
_SETTLE_BACKOFF_S = (0.05, 0.2, 0.5, 1.0)


@dataclass(slots=True)
class ShadowRecord:
    """A decision enforcement would have made: what, for whom, and why it would have said no.

    Once the action has run, ``actual`` is what it cost and ``charged`` what the ledger could
    account for it (under ALLOW_IF_AVAILABLE a spent-out scope takes only what it has left, and is
    flagged over-limit); ``overspend`` is the difference enforcement would have prevented.
    """

    subject: Subject
    action: Action
    estimate: Amount
    reason_code: str
    message: str
    scope: str | None
    at_ms: int
    actual: Amount | None = None
    charged: Amount | None = None
    deny_detail: dict[str, Any] | None = None  # v0.1.26 DenyDetail: which rule, by how much, the fix

    @property
    def overspend(self) -> Amount | None:
        if self.actual is None:
            return None
        charged = self.charged.amount if self.charged is not None else 0
        return trusted(Amount, unit=self.actual.unit, amount=max(0, self.actual.amount - charged))


@dataclass(slots=True)
class GuardSettings:
    ttl_ms: int = 60_000
    grace_period_ms: int = 5_000
    overage_policy: CommitOveragePolicy = CommitOveragePolicy.ALLOW_IF_AVAILABLE
    mode: Mode = "enforce"
    heartbeat: bool = True
    metadata: dict[str, Any] | None = None
    max_lease_ms: int | None = DEFAULT_MAX_LEASE_MS
    on_failure: OnFailure = "release"
    on_missing_actual: OnMissingActual = "estimate"
    expect_actual: bool | None = None  # None: True for model calls (kind "llm.*")


@dataclass(slots=True)
class _Call:
    method: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class _Sleep:
    seconds: float


_Op = _Call | _Sleep
_Flow = Generator[_Op, Any, Any]

_children_lock = threading.Lock()
_current: contextvars.ContextVar[_GuardCore | None] = contextvars.ContextVar("cycles_guard", default=None)


def _metrics(value: StandardMetrics | Mapping[str, Any] | None) -> StandardMetrics | None:
    if value is None or isinstance(value, StandardMetrics):
        return value
    return StandardMetrics.model_validate(dict(value))


class _GuardCore:
    """Everything a guard knows and decides, with no I/O."""

    def __init__(
        self,
        owner: object,
        subject: Subject,
        action: Action,
        estimate: Amount,
        settings: GuardSettings,
        idempotency_key: str | None,
        shadow_sink: list[ShadowRecord] | Any,
    ) -> None:
        self.owner = owner
        self.subject = subject
        self.action = action
        self.estimate = estimate
        self.settings = settings
        self.key = idempotency_key or new_idempotency_key()
        self._shadow_sink = shadow_sink
        self.reservation: ReservationCreateResponse | None = None
        self.shadow: ShadowRecord | None = None
        self.parent: _GuardCore | None = None
        self.actual: Amount | None = None
        self.metrics: StandardMetrics | None = None
        self.commit_metadata: dict[str, Any] | None = None
        self.children_spent = 0
        self.children_held = 0
        self.has_children = False
        self.state: Literal["new", "open", "settled", "released", "denied", "left"] = "new"
        self.heartbeat_errors: list[CyclesError] = []
        self.extensions = 0
        self.charged: Amount | None = None
        self.heartbeat_on = settings.heartbeat
        self._last_lead_ms: int | None = None
        self.begun = True  # the action has started (guards that reserve ahead start with begin=False)
        self.failed = False  # the action raised
        self.interrupted = False  # cancelled / interrupted / its run ended while it was open
        self.actual_missing = False  # settled without an actual although one was expected
        self.lease_exceeded = False  # the heartbeat stopped at max_lease_ms
        self.uncharged: Amount | None = None  # what a capped commit did not record
        self.reserved_at = 0.0  # time.monotonic() when the reservation was granted
        self.run: Any = None  # the _RunCore this step belongs to
        self.span_attributes: dict[str, str | bool | int | float] = {}  # on its OTel spans (annotate)
        self.on_settled: Callable[[_GuardCore], None] | None = None

    @property
    def expects_actual(self) -> bool:
        expect = self.settings.expect_actual
        return self.action.kind.startswith("llm") if expect is None else expect

    # -- what the user sees ---------------------------------------------------------------

    @property
    def reservation_id(self) -> str | None:
        return self.reservation.reservation_id if self.reservation is not None else None

    @property
    def caps(self) -> Caps | None:
        if self.parent is not None:
            return self.parent.caps
        return self.reservation.caps if self.reservation is not None else None

    @property
    def decision(self) -> Decision:
        if self.shadow is not None:
            return Decision.DENY
        if self.parent is not None:
            return self.parent.decision
        return self.reservation.decision if self.reservation is not None else Decision.ALLOW

    def record(
        self,
        actual: Amount,
        metrics: StandardMetrics | Mapping[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if actual.unit != self.estimate.unit:
            raise ValueError(f"actual is in {actual.unit.value}, the guard reserved {self.estimate.unit.value}")
        self.actual = actual
        self.metrics = _metrics(metrics)
        self.commit_metadata = metadata

    def final_actual(self) -> Amount:
        """What to commit: own recorded cost (estimate if none and no children) plus children's spend."""
        if not self.has_children:  # the common case: no new Amount to build
            return self.actual if self.actual is not None else self.estimate
        if self.actual is not None:
            own = self.actual.amount
        else:
            own = 0 if self.has_children else self.estimate.amount
        return trusted(Amount, unit=self.estimate.unit, amount=own + self.children_spent)

    # -- nesting ---------------------------------------------------------------------------

    def adopt_parent(self) -> bool:
        """Draw from the enclosing guard when it covers every scope this guard would charge."""
        parent = _current.get()
        if parent is None or parent.owner is not self.owner or parent.state != "open":
            return False
        if parent.estimate.unit != self.estimate.unit or parent.reservation is None:
            return False
        if not set(derive_scopes(self.subject)) <= set(derive_scopes(parent.subject)):
            return False
        with _children_lock:  # parallel children (threads with a copied context) share the headroom
            return self._take_headroom(parent)

    def _take_headroom(self, parent: _GuardCore) -> bool:
        assert parent.reservation is not None
        headroom = parent.estimate.amount - parent.children_spent - parent.children_held
        if headroom < self.estimate.amount:
            raise BudgetExceeded(
                f"{self.action.name} needs {self.estimate} but the enclosing guard "
                f"({parent.action.name}) has {trusted(Amount, unit=self.estimate.unit, amount=max(0, headroom))} left",
                details={"scope": parent.reservation.scope_path, "enclosing_reservation": parent.reservation_id},
            )
        self.parent = parent
        parent.has_children = True
        parent.children_held += self.estimate.amount
        self.state = "open"
        return True

    def settle_child(self, spent: int | None) -> None:
        parent = self.parent
        assert parent is not None
        with _children_lock:
            parent.children_held -= self.estimate.amount
            if spent is not None:
                parent.children_spent += spent

    # -- flows -----------------------------------------------------------------------------

    def start_flow(self) -> _Flow:
        if self.state != "new":
            raise RuntimeError("a guard can be started once")
        req = trusted(
            ReservationCreateRequest,
            idempotency_key=self.key + ":reserve",
            subject=self.subject,
            action=self.action,
            estimate=self.estimate,
            ttl_ms=self.settings.ttl_ms,
            grace_period_ms=self.settings.grace_period_ms,
            overage_policy=self.settings.overage_policy,
            dry_run=False,
            metadata=self.settings.metadata,
        )
        try:
            ended_runs = getattr(self.owner, "_ended_runs", None)  # cycles.run.EndedRuns
            if ended_runs is not None:  # a straggler on an ended run's deleted scope: denied as if closed
                ended_runs.check(self.subject)
            self.reservation = yield from _retrying(_Call("reserve", (req,)))
            self.reserved_at = time.monotonic()
        except (Denied, NotFound) as denial:
            if self.settings.mode == "shadow":
                self._record_shadow(denial)
                self.state = "open"
                return None
            self.state = "denied"
            raise
        self.state = "open"
        caps = self.reservation.caps
        if caps is not None and self.action.is_tool and not caps.allows_tool(self.action.name):
            refusal = ToolNotAllowed(
                f"tool {self.action.name!r} is not allowed by the budget's caps",
                details={"tool": self.action.name, "scope": self.reservation.scope_path},
            )
            if self.settings.mode == "shadow":
                self._record_shadow(refusal)
                return None
            yield from self.release_flow("tool not allowed by caps")
            self.state = "denied"
            raise refusal
        return None

    def _record_shadow(self, denial: CyclesError) -> None:
        scope = denial.details.get("scope")
        record = ShadowRecord(
            subject=self.subject,
            action=self.action,
            estimate=self.estimate,
            reason_code="BUDGET_NOT_FOUND" if isinstance(denial, NotFound) else denial.code,
            message=denial.message,
            scope=scope if isinstance(scope, str) else None,
            at_ms=time.time_ns() // 1_000_000,
            deny_detail=deny_detail_of(denial.code, denial.details),
        )
        self.shadow = record
        self._shadow_sink.append(record)
        shadow_log.warning(
            "shadow mode: would deny %s %s for %s: %s",
            self.action.kind,
            self.action.name,
            derive_scopes(self.subject)[-1],
            denial,
        )

    def finish_flow(self) -> _Flow:
        """The step ended normally. Commit its actual (an expected but missing one is surfaced)."""
        if self.state == "released" and self.actual is not None and self.parent is None:
            # The action happened after its step was released (a call retried after its failure):
            # nothing is released once its action happened, so the actual is charged as an event.
            self.state = "settled"
            response = yield from _retrying(_Call("event", (self._event_request(self.actual, self.key + ":late"),)))
            self._note_charged(self.actual, response.charged or self.actual)
            return None
        if self.state != "open":
            return None
        if self.actual is None and not self.has_children and self.expects_actual:
            yield from self._settle_without_actual("it ended without one")
            return None
        yield from self._commit_flow()
        return None

    def _settle_without_actual(self, why: str) -> _Flow:
        """CR-BOUNDARY-001: a missing actual is surfaced, then settled as ``on_missing_actual`` says."""
        self.actual_missing = True
        how = self.settings.on_missing_actual
        log.warning(
            "%s %s (reservation %s) has no actual cost: %s; %s",
            self.action.kind,
            self.action.name,
            self.reservation_id or self.key,
            why,
            {"estimate": f"committing its estimate {self.estimate}", "release": "releasing it"}.get(
                how, "leaving it to expire"
            ),
        )
        if how == "estimate":
            yield from self._commit_flow()
        elif how == "release":
            yield from self.release_flow(f"no actual cost: {why}")
        else:
            self.heartbeat_on = False
            if self.parent is not None:
                self.settle_child(None)
            self.state = "left"
        return None

    def _note_charged(self, actual: Amount, charged: Amount | None) -> None:
        self.charged = charged
        if charged is not None and charged.amount < actual.amount:
            self.uncharged = trusted(Amount, unit=actual.unit, amount=actual.amount - charged.amount)
            log.warning(
                "%s %s cost %s but the ledger charged %s (overage policy %s): %s went unrecorded; "
                "use overage_policy=ALLOW_WITH_OVERDRAFT with an overdraft limit to record it as debt",
                self.action.kind,
                self.action.name,
                actual,
                charged,
                self.settings.overage_policy.value,
                self.uncharged,
            )

    def _commit_flow(self) -> _Flow:
        """Commit the final actual; fall back to an event if the lease expired."""
        if self.state != "open":
            return None
        actual = self.final_actual()
        if self.parent is not None:
            self.settle_child(actual.amount)
            self.state = "settled"
            return None
        if self.reservation is None or self.reservation.reservation_id is None:
            # shadow mode, denied: account what happened without a reservation
            self.state = "settled"
            record = self.shadow
            if record is not None:
                record.actual = actual
            if actual.amount > 0:
                try:
                    response = yield from _retrying(_Call("event", (self._event_request(actual),)))
                except CyclesError as exc:
                    shadow_log.warning("shadow mode: could not account %s for %s: %s", actual, self.action.name, exc)
                else:
                    self._note_charged(actual, response.charged or actual)
                    if record is not None:
                        record.charged = self.charged
            self._publish_shadow()
            return None
        req = trusted(
            CommitRequest,
            idempotency_key=self.key + ":commit",
            actual=actual,
            metrics=self.metrics,
            metadata=self.commit_metadata,
        )
        try:
            response = yield from _retrying(_Call("commit", (self.reservation.reservation_id, req)))
            self._note_charged(actual, response.charged)
        except ReservationExpired:
            # The lease lapsed before we settled; the spend still happened: record it as an event
            # under the same idempotency key so a retried fallback cannot charge twice.
            event = self._event_request(actual, key=req.idempotency_key)
            response_e = yield from _retrying(_Call("event", (event,)))
            self._note_charged(actual, response_e.charged or actual)
        self.state = "settled"
        self._publish_shadow()
        return None

    def _publish_shadow(self) -> None:
        """A shadowed action has settled: hand its record to the client, which stores it."""
        if self.shadow is not None:
            if self.shadow.actual is None and self.state == "settled":
                self.shadow.actual, self.shadow.charged = self.final_actual(), self.charged
            publish = getattr(self.owner, "publish_shadow", None)
            if publish is not None:
                publish(self.shadow)

    def _event_request(self, actual: Amount, key: str | None = None) -> EventCreateRequest:
        return trusted(
            EventCreateRequest,
            idempotency_key=key or self.key + ":event",
            subject=self.subject,
            action=self.action,
            actual=actual,
            overage_policy=self.settings.overage_policy,
            metrics=self.metrics,
            client_time_ms=None,
            metadata=self.commit_metadata,
        )

    def release_flow(self, reason: str) -> _Flow:
        if self.state != "open":
            return None
        if self.parent is not None:
            self.settle_child(None)
            self.state = "released"
            return None
        self.state = "released"
        self._publish_shadow()
        if self.reservation is None or self.reservation.reservation_id is None:
            return None
        req = trusted(ReleaseRequest, idempotency_key=self.key + ":release", reason=reason[:256])
        try:
            yield from _retrying(_Call("release", (self.reservation.reservation_id, req)))
        except (ReservationExpired, ReservationFinalized):
            pass  # nothing is held any more
        except CyclesError as exc:
            log.warning("could not release %s (it will expire on its own): %s", self.reservation_id, exc)
        return None

    def fail_flow(self, exc: BaseException | None) -> _Flow:
        """The step did not end normally: settle it by the rule in the module docstring."""
        if self.state != "open":
            return None
        if self.actual is not None or self.children_spent:
            yield from self._commit_flow()  # the action happened and said what it cost
        elif not self.begun:
            yield from self.release_flow("the action never started")
        elif isinstance(exc, _INTERRUPTIONS):
            yield from self._interrupted_flow(f"interrupted by {type(exc).__name__} after it started")
        else:
            self.failed = True
            if self.settings.on_failure == "charge":
                yield from self._commit_flow()
            else:
                yield from self.release_flow(f"guarded action failed: {type(exc).__name__}" if exc else "failed")
        return None

    def abandon_flow(self, why: str, exc: BaseException | None) -> _Flow:
        """Its run ended while the step was still open. A run that died of an error (not a denial)
        died of the step that raised it: that step failed. Otherwise (ended normally, denied,
        cancelled, interrupted) the step was cut short after it started: an interruption."""
        if self.state != "open":
            return None
        if isinstance(exc, Exception) and not isinstance(exc, Denied) and self.begun and self.actual is None:
            yield from self.fail_flow(exc)
        elif self.actual is not None or self.children_spent:
            yield from self._commit_flow()
        elif not self.begun:
            yield from self.release_flow("the action never started")
        else:
            yield from self._interrupted_flow(why)
        return None

    def _interrupted_flow(self, why: str) -> _Flow:
        """Interrupted after it started: it may have been billed, so it is never released."""
        self.interrupted = True
        if self.expects_actual:
            yield from self._settle_without_actual(why)
        else:
            yield from self._commit_flow()  # its estimate is its price
        return None

    # -- heartbeat -------------------------------------------------------------------------

    def beat_delay_s(self) -> float | None:
        """When to extend next, from the last known lead (the spec's HEARTBEAT GUIDANCE, simplified:
        keep one attempt budget plus a safety margin in reserve)."""
        if not self.heartbeat_on or self.reservation is None or self.reservation.reservation_id is None:
            return None
        lead = self._last_lead_ms if self._last_lead_ms is not None else self.reservation.remaining_ttl_ms
        if lead is None:
            lead = self.settings.ttl_ms
        # Keep one attempt budget plus margin (3 s) in hand; short leases beat at half their lead.
        retry_reserve_ms = 3_000
        return max(lead - retry_reserve_ms, lead / 2, 0) / 1000

    def lease_over(self) -> bool:
        """Held for ``max_lease_ms`` already: stop extending (once, with a warning naming it)."""
        limit = self.settings.max_lease_ms
        if not limit or (time.monotonic() - self.reserved_at) * 1000 < limit:
            return False
        self.stop_heartbeat(f"it has been held for max_lease_ms={limit}", lease=True)
        return True

    def stop_heartbeat(self, why: str, *, lease: bool = False) -> None:
        if self.heartbeat_on and self.state == "open":
            log.warning(
                "heartbeat for reservation %s (%s %s) stopped: %s; it will expire on its own",
                self.reservation_id,
                self.action.kind,
                self.action.name,
                why,
            )
        self.heartbeat_on = False
        self.lease_exceeded = self.lease_exceeded or lease

    def beat_flow(self) -> _Flow:
        if self.state != "open" or self.reservation is None or self.reservation.reservation_id is None:
            return None
        if not self.heartbeat_on or self.lease_over():
            return None
        self.extensions += 1
        req = trusted(
            ReservationExtendRequest,
            idempotency_key=f"{self.key}:extend:{self.extensions}",
            extend_by_ms=self.settings.ttl_ms,
            metadata=None,
        )
        try:
            response = yield from _retrying(_Call("extend", (self.reservation.reservation_id, req)), attempts=2)
            self._last_lead_ms = response.remaining_ttl_ms
        except (ReservationExpired, ReservationFinalized, MaxExtensionsExceeded, NotFound, TenantClosed) as exc:
            self.heartbeat_errors.append(exc)
            self._last_lead_ms = None
            self.heartbeat_on = False  # permanent for this reservation: stop beating
            log.warning("heartbeat for %s stopped: %s", self.reservation_id, exc)
        except CyclesError as exc:
            self.heartbeat_errors.append(exc)
            self._last_lead_ms = 1_000
            log.warning("heartbeat for %s failed, will retry: %s", self.reservation_id, exc)
        return None


def _retrying(call: _Call, attempts: int = len(_SETTLE_BACKOFF_S) + 1) -> _Flow:
    """Run a call; on an ambiguous failure retry the *same* request (same idempotency key)."""
    for attempt in range(attempts):
        try:
            return (yield call)
        except _RETRYABLE as exc:
            if attempt == attempts - 1:
                raise
            delay = _SETTLE_BACKOFF_S[min(attempt, len(_SETTLE_BACKOFF_S) - 1)]
            if exc.retry_after_s is not None:
                delay = max(delay, exc.retry_after_s)
            log.info("retrying %s after %s (attempt %d)", call.method, exc, attempt + 2)
            yield _Sleep(delay)
    raise AssertionError("unreachable")


# ---- heartbeat scheduling -------------------------------------------------------------------


class _Heartbeats:
    """One daemon thread beats every open sync guard of the process (a thread per guard would cost
    more than the guard). Guards are registered while open and removed when they settle, so the
    registry holds only in-flight guards, and only weakly: a guard its owner dropped without
    settling stops beating (its reservation expires). Registering is a dict store (atomic under
    the GIL); the lock is taken only to wake the thread for a beat earlier than the one it sleeps
    towards."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: dict[weakref.ref[Guard], tuple[float, str | None]] = {}
        self._wake_at = float("inf")
        self._thread: threading.Thread | None = None

    def add(self, guard: Guard, delay_s: float) -> None:
        due = time.monotonic() + delay_s
        self._due[weakref.ref(guard)] = (due, guard.reservation_id)
        if due < self._wake_at or self._thread is None:
            with self._cond:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="cycles-heartbeat", daemon=True)
                    self._thread.start()
                self._cond.notify()

    def remove(self, guard: Guard) -> None:
        self._due.pop(weakref.ref(guard), None)

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                ready = [(ref, rid) for ref, (due, rid) in list(self._due.items()) if due <= now]
                for ref, _ in ready:
                    self._due.pop(ref, None)
                if not ready:
                    self._wake_at = min((due for due, _ in self._due.values()), default=now + 3600.0)
                    self._cond.wait(max(0.0, self._wake_at - now))
                    continue
            for ref, rid in ready:
                guard = ref()
                if guard is None:
                    log.warning(
                        "heartbeat for reservation %s stopped: its guard is gone; it will expire on its own", rid
                    )
                    continue
                try:
                    guard._beat()
                except Exception:
                    log.exception("heartbeat failed")


_heartbeats = _Heartbeats()


def drive(ledger: Any, flow: _Flow) -> Any:
    """Run a flow against a synchronous ledger."""
    try:
        op = next(flow)
        while True:
            if isinstance(op, _Sleep):
                time.sleep(op.seconds)
                op = flow.send(None)
                continue
            try:
                result = getattr(ledger, op.method)(*op.args, **op.kwargs)
            except Exception as exc:  # noqa: BLE001 - handed to the flow, which decides
                op = flow.throw(exc)
            else:
                op = flow.send(result)
    except StopIteration as stop:
        return stop.value


async def adrive(ledger: Any, flow: _Flow) -> Any:
    """Run a flow against an asynchronous ledger."""
    try:
        op = next(flow)
        while True:
            if isinstance(op, _Sleep):
                await asyncio.sleep(op.seconds)
                op = flow.send(None)
                continue
            try:
                result = await getattr(ledger, op.method)(*op.args, **op.kwargs)
            except Exception as exc:  # noqa: BLE001 - handed to the flow, which decides
                op = flow.throw(exc)
            else:
                op = flow.send(result)
    except StopIteration as stop:
        return stop.value


# ---- the shells -----------------------------------------------------------------------------


class _GuardFace:
    """What user code reads on a guard, shared by both shells."""

    _core: _GuardCore

    @property
    def reservation_id(self) -> str | None:
        return self._core.reservation_id

    @property
    def caps(self) -> Caps | None:
        return self._core.caps

    @property
    def decision(self) -> Decision:
        return self._core.decision

    @property
    def shadow(self) -> ShadowRecord | None:
        """The would-deny record, when shadow mode let a denied action run."""
        return self._core.shadow

    @property
    def subject(self) -> Subject:
        return self._core.subject

    @property
    def action(self) -> Action:
        return self._core.action

    @property
    def estimate(self) -> Amount:
        return self._core.estimate

    @property
    def actual(self) -> Amount | None:
        """The actual cost recorded with ``commit()`` (None: none yet)."""
        return self._core.actual

    @property
    def charged(self) -> Amount | None:
        return self._core.charged

    @property
    def uncharged(self) -> Amount | None:
        """What the ledger did not charge of the committed actual (a capped commit), else None."""
        return self._core.uncharged

    @property
    def state(self) -> str:
        """``new``, ``open``, ``settled`` (committed), ``released``, ``denied`` or ``left`` (to expire)."""
        return self._core.state

    @property
    def begun(self) -> bool:
        return self._core.begun

    @property
    def failed(self) -> bool:
        """The action raised (settled by ``on_failure``)."""
        return self._core.failed

    @property
    def interrupted(self) -> bool:
        """Cancelled, interrupted, or its run ended while it was open."""
        return self._core.interrupted

    @property
    def actual_missing(self) -> bool:
        """It ended without the actual it was expected to report (settled by ``on_missing_actual``)."""
        return self._core.actual_missing

    @property
    def lease_exceeded(self) -> bool:
        """Its heartbeat stopped at ``max_lease_ms``."""
        return self._core.lease_exceeded

    @property
    def idempotency_key(self) -> str:
        return self._core.key

    @property
    def heartbeat_errors(self) -> list[CyclesError]:
        return self._core.heartbeat_errors

    def annotate(self, attributes: Mapping[str, str | bool | int | float | None]) -> None:
        """Add attributes to every OpenTelemetry span of this step (its reserve, extends, commit or
        release): an adapter's framework ids and GenAI attributes. ``None`` values are left out."""
        self._core.span_attributes.update({k: v for k, v in attributes.items() if v is not None})

    def allows_tool(self, name: str) -> bool:
        """Whether the caps this reservation was granted with let the model call tool ``name``."""
        caps = self._core.caps
        return caps is None or caps.allows_tool(name)

    def max_tokens(self, requested: int | None) -> int | None:
        """``requested`` clamped to the caps' ``max_tokens`` (None: no limit either way)."""
        return clamp_max_tokens(self._core.caps, requested)

    def commit(
        self,
        actual: Amount,
        *,
        metrics: StandardMetrics | Mapping[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        """Record the actual cost. Settlement happens when the guard exits (or ``finish()``)."""
        self._core.record(actual, metrics, metadata)

    def begin(self) -> None:
        """The action starts now (for a guard started with ``begin=False``, e.g. reserved ahead)."""
        self._core.begun = True

    def _settled(self) -> None:
        core = self._core
        if core.state != "open" and core.on_settled is not None:
            notify, core.on_settled = core.on_settled, None
            notify(core)

    def __repr__(self) -> str:
        core = self._core
        return f"<{type(self).__name__} {core.action.kind} {core.action.name} {core.state} {core.reservation_id}>"


def clamp_max_tokens(caps: Caps | None, requested: int | None) -> int | None:
    """A request's max output tokens within the caps' ``max_tokens`` (None: no limit either way)."""
    if caps is None or caps.max_tokens is None:
        return requested
    return caps.max_tokens if requested is None else min(requested, caps.max_tokens)


class Guard(_GuardFace):
    """``with cy.guard(...) as g:`` -- or ``g.start()`` / ``g.finish()`` / ``g.fail()``."""

    def __init__(self, client: Cycles, core: _GuardCore) -> None:
        self._client = client
        self._core = core
        self._token: contextvars.Token[_GuardCore | None] | None = None

    def _drive(self, flow: _Flow) -> Any:
        with step_scope(self._core.action, self._core.span_attributes):
            return drive(self._client.ledger, flow)

    def start(self, *, begin: bool = True) -> Guard:
        """Reserve (raises the ``Denied``). ``begin=False``: reserved ahead, the action starts at ``begin()``."""
        core = self._core
        core.begun = begin
        if not core.adopt_parent():
            try:
                self._drive(core.start_flow())
            finally:
                self._settled()  # a denial settles it (a run forgets it)
            delay = core.beat_delay_s()
            if delay is not None:
                _heartbeats.add(self, delay)
        return self

    def finish(self, actual: Amount | None = None) -> None:
        _heartbeats.remove(self)
        if actual is not None:
            self._core.record(actual, self._core.metrics, self._core.commit_metadata)
        try:
            self._drive(self._core.finish_flow())
        finally:
            self._settled()

    def fail(self, exc: BaseException | None = None) -> None:
        _heartbeats.remove(self)
        try:
            self._drive(self._core.fail_flow(exc))
        finally:
            self._settled()

    def _abandon(self, why: str, exc: BaseException | None) -> None:
        _heartbeats.remove(self)
        try:
            self._drive(self._core.abandon_flow(why, exc))
        finally:
            self._settled()

    def _beat(self) -> None:
        # No lock against finish(): a beat that loses the race meets RESERVATION_FINALIZED and stops.
        if self._core.state != "open":
            return
        self._drive(self._core.beat_flow())
        delay = self._core.beat_delay_s()
        if delay is not None and self._core.state == "open":
            _heartbeats.add(self, delay)

    def __enter__(self) -> Guard:
        self.start()
        self._token = _current.set(self._core)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self._token is not None:
            _current.reset(self._token)
            self._token = None
        if exc is None:
            self.finish()
        else:
            self.fail(exc)


_beat_tasks: set[asyncio.Task[None]] = set()


def _spawn_beat(ref: weakref.ref[AsyncGuard], rid: str | None) -> None:
    guard = ref()
    if guard is None:
        log.warning("heartbeat for reservation %s stopped: its guard is gone; it will expire", rid)
        return
    task = asyncio.get_running_loop().create_task(guard._beat())
    _beat_tasks.add(task)  # the loop keeps only weak references to tasks
    task.add_done_callback(_beat_tasks.discard)


class AsyncGuard(_GuardFace):
    """``async with acy.guard(...) as g:`` -- or ``await g.start()`` / ``finish()`` / ``fail()``."""

    def __init__(self, client: AsyncCycles, core: _GuardCore) -> None:
        self._client = client
        self._core = core
        self._token: contextvars.Token[_GuardCore | None] | None = None
        self._beat_handle: asyncio.TimerHandle | None = None
        self._owner: asyncio.Task[Any] | None = None

    async def _drive(self, flow: _Flow) -> Any:
        with step_scope(self._core.action, self._core.span_attributes):
            return await adrive(self._client.ledger, flow)

    async def start(self, *, begin: bool = True) -> AsyncGuard:
        """Reserve (raises the ``Denied``). ``begin=False``: reserved ahead, the action starts at ``begin()``."""
        core = self._core
        core.begun = begin
        if not core.adopt_parent():
            try:
                await self._drive(core.start_flow())
            finally:
                self._settled()
            self._owner = asyncio.current_task()
            self._schedule_beat()
        return self

    def _schedule_beat(self) -> None:
        delay = self._core.beat_delay_s()
        if delay is not None:
            loop = asyncio.get_running_loop()
            self._beat_handle = loop.call_later(delay, _spawn_beat, weakref.ref(self), self._core.reservation_id)

    async def _beat(self) -> None:
        core = self._core
        if core.state != "open":
            return
        if core.run is None and self._owner is not None and self._owner.done():
            core.stop_heartbeat("the task that started it has ended")
            return
        await self._drive(core.beat_flow())
        if core.state == "open":
            self._schedule_beat()

    def _cancel_beat(self) -> None:
        if self._beat_handle is not None:
            self._beat_handle.cancel()
            self._beat_handle = None

    async def finish(self, actual: Amount | None = None) -> None:
        self._cancel_beat()
        if actual is not None:
            self._core.record(actual, self._core.metrics, self._core.commit_metadata)
        try:
            await self._drive(self._core.finish_flow())
        finally:
            self._settled()

    async def fail(self, exc: BaseException | None = None) -> None:
        self._cancel_beat()
        try:
            await self._drive(self._core.fail_flow(exc))
        finally:
            self._settled()

    async def _abandon(self, why: str, exc: BaseException | None) -> None:
        self._cancel_beat()
        try:
            await self._drive(self._core.abandon_flow(why, exc))
        finally:
            self._settled()

    async def __aenter__(self) -> AsyncGuard:
        await self.start()
        self._token = _current.set(self._core)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self._token is not None:
            with contextlib.suppress(ValueError):  # exited in another context (another task): nothing to undo
                _current.reset(self._token)
            self._token = None
        if exc is None:
            await self.finish()
        else:
            await self.fail(exc)
