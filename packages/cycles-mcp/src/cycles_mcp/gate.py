"""The gate: one tool call admitted against the policy, then settled by the core's rule.

Each MCP session is one core run (``acy.run``): its workflow scope carries the policy's session
budgets, set when the run starts and deleted when it ends. ``admit`` decides a call (deny list, cost
by glob, one step of the run per unit of the cost); ``settle`` ends each step through the core
guard, which commits when the tool ran and releases when it failed (the core's failed-step rule;
an interrupted call is never released). The proxy and the Claude Code hooks share it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio

from cycles import (
    Action,
    Amount,
    AsyncCycles,
    AsyncGuard,
    AsyncRun,
    BudgetExceeded,
    CyclesError,
    Denied,
    NotFound,
    ShadowRecord,
    risk_points,
    with_args_fingerprint,
)
from cycles.models import Unit, format_amount
from cycles_mcp.policy import Match, Policy

__all__ = ["Admission", "Gate", "ToolFailed"]

log = logging.getLogger("cycles.mcp")
T = TypeVar("T")


class ToolFailed(Exception):
    """The upstream answered the call with a tool error (``isError: true``): the step failed."""


@dataclass(slots=True)
class Admission:
    """The gate's verdict on one call; ``guards`` are the open reservations to settle afterwards."""

    match: Match
    allowed: bool
    refusal: str | None = None
    guards: list[AsyncGuard] = field(default_factory=list)
    shadow_denied: bool = False
    unchecked: bool = False  #: forwarded without a check because the ledger failed and fail_open is on


class Gate:
    def __init__(
        self,
        policy: Policy,
        cycles: AsyncCycles,
        *,
        shadow: bool = False,
        fail_open: bool = False,
        ttl_ms: int = 60_000,
        heartbeat: bool = True,
    ) -> None:
        self.policy = policy
        self.cycles = cycles
        self.shadow = shadow or policy.shadow
        self.fail_open = fail_open or policy.fail_open
        self.ttl_ms = policy.ttl_ms or ttl_ms
        self.heartbeat = heartbeat
        self._starting = anyio.Lock()

    def new_run(self, run_id: str | None = None) -> AsyncRun:
        """One session's run (not started: it starts at the session's first gated call)."""
        return self.cycles.run(
            self.policy.subject,
            budgets=self.policy.session_budget,
            run_id=run_id,
            name="mcp",
            keep_budgets=self.policy.keep_session_budgets,
        )

    async def start_run(self, run: AsyncRun) -> None:
        async with self._starting:  # concurrent first calls of one session start its run once
            if run.state == "new":
                await run.start()

    @staticmethod
    async def end_run(run: AsyncRun) -> None:
        """End a session's run: the core settles any step still open and deletes its budgets."""
        if run.state == "open":
            with anyio.CancelScope(shield=True):
                await run.end()

    def step(
        self, run: AsyncRun, action: Action, amount: Amount, key: str | None, on_failure: str = "release"
    ) -> AsyncGuard:
        """One unit of a call's cost, as a step of the session's run."""
        return run.guard(
            action,
            amount,
            ttl_ms=self.ttl_ms,
            overage_policy=self.policy.overage_policy,
            mode="shadow" if self.shadow else "enforce",
            heartbeat=self.heartbeat,
            idempotency_key=key,
            on_failure=on_failure,
        )

    async def admit(
        self,
        run: AsyncRun,
        tool: str,
        arguments: Any = None,
        *,
        idempotency_key: str | None = None,
        match: Match | None = None,
    ) -> Admission:
        """Reserve every unit of the tool's cost as steps of ``run`` (all or none), ahead of the call:
        a step is begun only when the call is forwarded, so one that never was is released. The
        steps carry the action kind the policy gives the tool and the fingerprint of its name and
        ``arguments`` (for a loop guard); the session's run id is the key of ``per_run`` quotas.
        ``match`` is what the policy says of the call when the caller knows better than the tool's
        name (its annotated kind, a sampling request)."""
        match = match or self.policy.match(tool)
        if match.denied:
            text = (
                f"Cycles refused the tool call {tool!r}: the policy denies it ({match.rule}). "
                "It was not run. Do not retry it; use another tool or ask the user to change the policy."
            )
            if self.shadow:
                self._record_shadow(run, match, "TOOL_DENIED", text)
                return Admission(match, True, shadow_denied=True)
            return Admission(match, False, refusal=text)
        if not match.cost:
            return Admission(match, True)
        admission = Admission(match, True)
        action = with_args_fingerprint(Action(match.kind, tool), {} if arguments is None else arguments)
        try:
            await self.start_run(run)
            for amount in match.cost:
                key = None if idempotency_key is None else f"{idempotency_key}:{amount.unit.value.lower()}"
                guard = self.step(run, action, amount, key, match.on_failure)
                await guard.start(begin=False)
                admission.guards.append(guard)
                if guard.shadow is not None:
                    admission.shadow_denied = True
        except (Denied, NotFound) as denial:
            await self._release(admission, "another unit of the cost was refused")
            return Admission(match, False, refusal=self.refusal_text(run, match, denial))
        except CyclesError as error:
            await self._release(admission, "the ledger failed")
            if self.fail_open:
                log.warning("cycles ledger error, forwarding %s unchecked (fail_open): %s", tool, error)
                return Admission(match, True, unchecked=True)
            return Admission(
                match,
                False,
                refusal=(
                    f"Cycles could not check the budget for the tool call {tool!r} ({error}), so it was not run "
                    "(the proxy fails closed). Retry later, or ask the user to check the Cycles ledger."
                ),
            )
        return admission

    async def settle(
        self,
        admission: Admission,
        *,
        ran: bool,
        error: BaseException | None = None,
        actual: Callable[[Amount], Amount | None] | None = None,
    ) -> None:
        """End each step by the core's rule: ``ran`` commits (``actual(estimate)`` when it knows the
        step's actual, else the estimate); otherwise ``error`` says how the call failed (a tool
        error or exception releases, an interruption commits). Shielded from cancel."""
        with anyio.CancelScope(shield=True):
            for guard in admission.guards:
                try:
                    guard.begin()  # the call happened (a hook reports it after the fact)
                    if ran:
                        await guard.finish(actual(guard.estimate) if actual is not None else None)
                    else:
                        await guard.fail(error)
                except CyclesError as exc:  # the call already happened: report, never mask its result
                    log.warning("cycles could not settle %s: %s", guard.reservation_id, exc)
            admission.guards.clear()

    async def call(
        self,
        run: AsyncRun,
        tool: str,
        forward: Callable[[], Awaitable[T]],
        failed: Callable[[T], bool],
        arguments: Any = None,
        *,
        match: Match | None = None,
        actual: Callable[[T, Amount], Amount | None] | None = None,
    ) -> T | Admission:
        """Admit, forward, settle. Returns the refused ``Admission`` instead of calling ``forward``.
        ``actual(result, estimate)`` is a step's actual cost when the result tells it (else the
        estimate is committed)."""
        admission = await self.admit(run, tool, arguments, match=match)
        log.info(
            "%s %s in %s: %s", "forward" if admission.allowed else "refuse", tool, run.id, admission.match.describe()
        )
        if not admission.allowed:
            return admission
        for guard in admission.guards:
            guard.begin()
        try:
            result = await forward()
        except BaseException as exc:
            await self.settle(admission, ran=False, error=exc)
            raise
        failure = failed(result)
        measured = None if actual is None else (lambda estimate: actual(result, estimate))
        await self.settle(admission, ran=not failure, error=ToolFailed(tool) if failure else None, actual=measured)
        return result

    async def _release(self, admission: Admission, reason: str) -> None:
        """The call will not be made: its steps never began, so the core releases them."""
        with anyio.CancelScope(shield=True):
            for guard in admission.guards:
                await guard.fail(RuntimeError(reason))
            admission.guards.clear()

    def _record_shadow(self, run: AsyncRun, match: Match, code: str, message: str) -> None:
        record = ShadowRecord(
            subject=run.subject,
            action=Action(match.kind, match.tool),
            estimate=match.cost[0] if match.cost else risk_points(0),
            reason_code=code,
            message=message,
            scope=None,
            at_ms=time.time_ns() // 1_000_000,
        )
        self.cycles.shadow_log.append(record)
        logging.getLogger("cycles.shadow").warning("shadow mode: would deny %s: %s", match.tool, message)

    @staticmethod
    def refusal_text(run: AsyncRun, match: Match, denial: CyclesError) -> str:
        """Which budget refused, what remains, what to do: the text the agent reads."""
        tool = match.tool
        cost = " + ".join(str(a) for a in match.cost)
        scope = denial.details.get("scope") if isinstance(denial.details, dict) else None
        head = f"Cycles refused the tool call {tool!r} (cost {cost}, {match.rule}); it was not run."
        if isinstance(denial, BudgetExceeded) and isinstance(scope, str):
            unit = _unit(denial.details.get("unit"), match.cost)
            remaining = denial.details.get("remaining")
            left = format_amount(unit, max(0, remaining)) if isinstance(remaining, int) and unit else "not enough"
            if scope == run.scope:
                return (
                    f"{head} This session's budget ({scope}) has {left} left. "
                    "Do not retry it in this session: finish with what the budget allows, "
                    "or ask the user to raise the session budget or start a new session."
                )
            return (
                f"{head} The budget {scope} has {left} left. Do not retry it now: "
                f"ask the user to fund it (cycles budget fund {scope} ...) or wait for the budget to be reset."
            )
        if isinstance(denial, NotFound):
            return (
                f"{head} No budget covers it ({denial.message}). "
                "Ask the user to set one (cycles budget set ...) for the policy's subject."
            )
        where = f" at {scope}" if isinstance(scope, str) else ""
        code = denial.reason_code if isinstance(denial, Denied) else denial.code  # e.g. LOOP_DETECTED
        detail = denial.details.get("deny_detail") if isinstance(denial.details, dict) else None
        fix = detail.get("suggested_fix") if isinstance(detail, dict) else None  # quotas, loop guard
        advice = f"{fix}." if isinstance(fix, str) and fix else "Do not retry it; ask the user to review the budget."
        return f"{head} {code}{where}: {denial.message}. {advice}"


def _unit(value: Any, cost: tuple[Amount, ...]) -> Unit | None:
    try:
        return Unit(value)
    except ValueError:
        return cost[0].unit if cost else None
