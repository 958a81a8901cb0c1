"""The runaway-agent demo: a writer drafts, an evaluator never approves, the writer retries forever.

Act 1 runs the loop with no guard for an hour of simulated time and shows the spend climbing. Act 2
runs the same loop with every model call guarded by Cycles under a small workflow budget: Cycles
says no before the call that would overspend, and the loop ends with a clear denial. Act 3 is the
loop a budget is slow to catch: an agent stuck asking for the same tool call with the same
arguments. Its model calls differ (the context grows) but the tool call does not, so the loop guard
(``cy.quotas.set_loop_guard``; the call's fingerprint is ``with_args_fingerprint``) refuses the
repeat long before the run's budget would.

The model is simulated (no network, no API key) but priced like the real one through
``cycles.pricing``: each call's cost is its token usage at the model's published prices, and each
call takes the time a real one would (time to first token plus decoding), on a simulated clock.
So every figure is the same whatever the machine and whether the demo is replayed over a few real
seconds or printed at once (``--fast``). The history is capped at the model's context window, as
a real agent framework would trim it.

Without ``--ledger`` the demo runs on a throw-away SQLite file: nothing is written to your ledger.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, TextIO

from cycles.client import Cycles
from cycles.errors import Denied, LoopDetected
from cycles.ledger.quotas import with_args_fingerprint
from cycles.models import MICROCENTS_PER_USD, Action, Amount, Subject, usd
from cycles.pricing import estimate_cost, price_usage

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["DemoResult", "LoopStats", "PhaseStats", "run_demo"]

MODEL = "openai:gpt-4o"
CONTEXT_WINDOW = 128_000  # gpt-4o's
MAX_OUTPUT_TOKENS = 700
SYSTEM_PROMPT_TOKENS = 1_800
WRITER_OUTPUT_TOKENS = 620
EVALUATOR_OUTPUT_TOKENS = 40
FIRST_TOKEN_S = 0.6  # simulated latency: time to first token ...
TOKENS_PER_S = 80.0  # ... then decoding speed
LOOP_GUARD = 3  # act 3: identical tool calls a run may make
LOOP_TOOL, LOOP_ARGS = "search_docs", {"query": "refund policy", "top_k": 5}
LOOP_TOOL_COST = usd("0.002")  # what one search costs (a search API's price)
LOOP_RUN_BUDGET = usd("0.50")


@dataclass
class _Usage:
    input_tokens: int
    output_tokens: int

    @property
    def seconds(self) -> float:
        return FIRST_TOKEN_S + self.output_tokens / TOKENS_PER_S


class SimulatedModel:
    """Answers like a chat model would, with the token counts a real one would report."""

    def complete(self, role: str, context_tokens: int) -> _Usage:
        output = WRITER_OUTPUT_TOKENS if role == "writer" else EVALUATOR_OUTPUT_TOKENS
        return _Usage(context_tokens, output)


@dataclass
class PhaseStats:
    calls: int = 0
    attempts: int = 0
    spent_microcents: int = 0
    simulated_s: float = 0.0
    context_tokens: int = SYSTEM_PROMPT_TOKENS
    stopped_by: str = ""  # "timer", "budget" or "hand"
    reason: str = ""

    def per_hour_microcents(self) -> int:
        return int(self.spent_microcents * 3600 / self.simulated_s) if self.simulated_s else 0


@dataclass
class LoopStats:
    """Act 3: a run whose agent repeats one tool call."""

    model_calls: int = 0
    tool_calls: int = 0  # the searches that ran
    spent_microcents: int = 0  # what the run's scope spent (model calls and searches)
    left_microcents: int = 0  # what its budget still had when it was stopped
    stopped_by: str = ""  # "loop_guard", or "budget" / "nothing" if something else happened
    reason: str = ""


@dataclass
class DemoResult:
    unguarded: PhaseStats
    guarded: PhaseStats
    budget: Amount
    ledger_url: str
    looping: LoopStats | None = None

    def to_json(self) -> dict[str, object]:
        """``cycles demo --json``: every act's figures (amounts in USD micro-cents)."""
        phases = {"without_cycles": self.unguarded, "with_cycles": self.guarded}
        return {
            "model": MODEL,
            "budget": self.budget.to_wire(),
            **{name: {**asdict(p), "simulated_s": round(p.simulated_s, 3)} for name, p in phases.items()},
            "loop_guard": {"max_repeats": LOOP_GUARD, **asdict(self.looping)} if self.looping else None,
        }


def dollars(microcents: int) -> str:
    """Money for people: cents above a dollar, four decimals below."""
    value = microcents / MICROCENTS_PER_USD
    if abs(value) >= 1 or value == 0:
        return f"${value:,.2f}"
    whole, _, cents = f"{value:.4f}".partition(".")
    return f"${whole}.{cents.rstrip('0').ljust(2, '0')}"


def _cost(usage: _Usage) -> Amount:
    return price_usage(MODEL, input_tokens=usage.input_tokens, output_tokens=usage.output_tokens)


class _Pacer:
    """Replays simulated time over ``replay_seconds`` real seconds (0: no pauses at all)."""

    def __init__(self, simulated_limit_s: float, replay_seconds: float) -> None:
        self.ratio = replay_seconds / simulated_limit_s if simulated_limit_s else 0.0
        self.started = time.monotonic()

    def wait_for(self, simulated_s: float) -> None:
        if self.ratio:
            delay = self.started + simulated_s * self.ratio - time.monotonic()
            if delay > 0:
                time.sleep(delay)


def _status(label: str, stats: PhaseStats) -> str:
    minutes = stats.simulated_s / 60
    return (  # fits in 80 columns: a live line wider than the terminal would be cut
        f"  {label:<8}  {minutes:5.1f} min  {stats.calls:5d} calls  {dollars(stats.spent_microcents):>10}  "
        f"context {stats.context_tokens:7,} tokens"
    )


@contextmanager
def _live(console: Console, label: str, stats: PhaseStats) -> Iterator[Callable[[], None]]:
    """A status line redrawn in place on a terminal; on anything else only its final state."""
    from rich.live import Live
    from rich.text import Text

    if not console.is_terminal:
        yield lambda: None
        console.print(_status(label, stats), highlight=False)
        return
    with Live(Text(_status(label, stats)), console=console, refresh_per_second=12) as live:
        yield lambda: live.update(Text(_status(label, stats)))


def _agent_loop(
    stats: PhaseStats,
    call: Callable[[str, int], _Usage],
    limit_s: float,
    pacer: _Pacer,
    refresh: Callable[[], None],
) -> None:
    """Write, get rejected, retry with the whole history, until the simulated time is up."""
    while stats.simulated_s < limit_s:
        stats.attempts += 1
        draft = call("writer", stats.context_tokens)
        review = call("evaluator", stats.context_tokens + draft.output_tokens)
        # The draft and the rejection join the history, trimmed to what the model can take.
        grown = stats.context_tokens + draft.output_tokens + review.output_tokens
        stats.context_tokens = min(grown, CONTEXT_WINDOW - MAX_OUTPUT_TOKENS)
        pacer.wait_for(stats.simulated_s)
        refresh()
    stats.stopped_by = stats.stopped_by or "timer"


def run_demo(
    ledger_url: str | None = None,
    *,
    budget: Amount | None = None,
    simulated_minutes: int = 60,
    replay_seconds: float = 3.0,
    out: TextIO | None = None,
) -> DemoResult:
    """Both acts and the summary. ``ledger_url=None``: a throw-away SQLite ledger, deleted after."""
    from rich.console import Console

    console = Console(file=out, highlight=False, soft_wrap=True)  # long lines are not cut at 80 columns
    budget = budget if budget is not None else usd(1)
    limit_s = simulated_minutes * 60.0
    console.print("[bold]Cycles demo: a runaway agent loop[/]")
    console.print("A writer drafts, an evaluator never approves, the writer retries with the whole history.")
    console.print(
        f"Model: {MODEL} (simulated: priced from genai-prices data, {FIRST_TOKEN_S:g} s to first token, "
        f"{TOKENS_PER_S:g} tokens/s). No network, no API key.\n"
    )

    # Act 1 ---------------------------------------------------------------------------------
    console.print(f"[bold]1) Without Cycles, for {simulated_minutes} simulated minutes:[/]")
    free = PhaseStats()

    def unguarded_call(role: str, context: int) -> _Usage:
        usage = SimulatedModel().complete(role, context)
        free.calls += 1
        free.spent_microcents += _cost(usage).amount
        free.simulated_s += usage.seconds
        return usage

    try:
        with _live(console, "no guard", free) as refresh:
            _agent_loop(free, unguarded_call, limit_s, _Pacer(limit_s, replay_seconds), refresh)
    except KeyboardInterrupt:
        free.stopped_by = "hand"
    console.print(
        f"   {free.calls} calls, [red]{dollars(free.spent_microcents)}[/] in {free.simulated_s / 60:.0f} simulated "
        f"minutes: {dollars(free.per_hour_microcents() * 24)} a day if nobody notices."
    )
    console.print(
        "   Stopped by the demo's timer: nothing in the loop itself would ever stop it.\n"
        if free.stopped_by == "timer"
        else "   Stopped by hand (Ctrl-C).\n"
    )

    # Act 2 ---------------------------------------------------------------------------------
    with _ledger(ledger_url) as url:
        guarded = _guarded_act(console, url, budget, limit_s, replay_seconds)
        looping = _loop_act(console, url)

    # Summary -------------------------------------------------------------------------------
    stopped = {
        "budget": "[green]Cycles[/], before the call that could overspend",
        "timer": "the demo's timer (the budget was never reached)",
        "hand": "hand (Ctrl-C)",
    }
    console.print("\n[bold]Summary[/] (simulated time, real prices)")
    console.print(
        f"  without Cycles  {free.calls:5d} calls  {dollars(free.spent_microcents):>10}  "
        f"in {free.simulated_s / 60:.0f} min, and still going"
    )
    console.print(
        f"  with Cycles     {guarded.calls:5d} calls  {dollars(guarded.spent_microcents):>10}  "
        f"of a {dollars(budget.amount)} budget, in {guarded.simulated_s / 60:.1f} min"
    )
    console.print(f"  stopped by      {stopped.get(guarded.stopped_by, guarded.stopped_by)}")
    if guarded.reason:
        console.print(f"  why             {guarded.reason}")
    console.print(
        "  how             every model call reserved its worst-case cost first; the call that could have\n"
        "                  overspent was refused before it reached the model."
    )
    if looping.stopped_by == "loop_guard":
        console.print(
            f"  stuck tool call stopped by the [green]loop guard[/] at identical call {looping.tool_calls + 1} "
            f"({LOOP_TOOL}), with {dollars(looping.left_microcents)} of the run's budget left"
        )
    else:
        console.print(f"  stuck tool call not stopped by the loop guard: {looping.stopped_by} ({looping.reason})")
    return DemoResult(free, guarded, budget, url, looping)


@contextmanager
def _ledger(url: str | None) -> Iterator[str]:
    if url is not None:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="cycles-demo-") as tmp:
        yield f"sqlite:///{tmp}/demo.db"


def _guarded_act(console: Console, url: str, budget: Amount, limit_s: float, replay_seconds: float) -> PhaseStats:
    stats = PhaseStats()
    run_id = "run-" + uuid.uuid4().hex[:8]
    scope = f"tenant:demo/workflow:{run_id}"
    subject = Subject(tenant="demo", workflow=run_id, agent="writer")
    with Cycles(url) as cy:
        cy.budgets.set("tenant:demo", usd(1_000))
        cy.budgets.set(scope, budget)
        console.print(f"[bold]2) With Cycles: {dollars(budget.amount)} budget on workflow {run_id}:[/]")
        where = url if url.startswith(("memory:", "redis", "http")) else url.removeprefix("sqlite:///")
        console.print(
            f"[dim]   ledger {where}{' (throw-away: pass --ledger to keep it)' if 'cycles-demo-' in url else ''}[/]"
        )

        def guarded_call(role: str, context: int) -> _Usage:
            action = Action("llm.completion", MODEL, tags=[role])
            estimate = estimate_cost(MODEL, input_tokens=context, max_output_tokens=MAX_OUTPUT_TOKENS)
            with cy.guard(subject.merged(agent=role), action, estimate=estimate) as g:
                usage = SimulatedModel().complete(role, context)
                actual = _cost(usage)
                g.commit(actual, metrics={"tokens_input": usage.input_tokens, "tokens_output": usage.output_tokens})
            stats.calls += 1
            stats.spent_microcents += actual.amount
            stats.simulated_s += usage.seconds
            return usage

        denial: Denied | None = None
        try:
            with _live(console, "cycles", stats) as refresh:
                _agent_loop(stats, guarded_call, limit_s, _Pacer(limit_s, replay_seconds), refresh)
        except Denied as exc:
            denial = exc
        except KeyboardInterrupt:
            stats.stopped_by = "hand"
        if denial is not None:
            stats.stopped_by = "budget"
            stats.reason = _why(denial)
            console.print(f"[red]   DENIED before call {stats.calls + 1}: {denial}[/]")
        balance = cy.budgets.get(scope, budget.unit)
        console.print(
            f"   ledger: {dollars(balance.spent.amount if balance.spent else 0)} spent, "
            f"{dollars(balance.remaining.amount)} left, {dollars(balance.reserved.amount if balance.reserved else 0)}"
            " held by unfinished calls"
        )
    return stats


def _loop_act(console: Console, url: str) -> LoopStats:
    """A run whose agent asks for the same search again and again; the loop guard stops the repeat."""
    stats = LoopStats()
    args = ", ".join(f"{k}={v!r}" for k, v in LOOP_ARGS.items())
    console.print(
        f"\n[bold]3) A stuck tool call, loop guard on ({LOOP_GUARD} identical calls per run), "
        f"{dollars(LOOP_RUN_BUDGET.amount)} run budget:[/]"
    )
    with Cycles(url) as cy:
        cy.quotas.set_loop_guard("tenant:demo", LOOP_GUARD)  # on for every run of the tenant
        run = cy.run(  # its budget is kept to show what was left (the demo ledger is thrown away)
            Subject(tenant="demo", agent="researcher"),
            budgets=[LOOP_RUN_BUDGET],
            name="stuck-search",
            keep_budgets=True,
        )
        context = SYSTEM_PROMPT_TOKENS
        try:
            with run:
                for _ in range(LOOP_GUARD + 2):  # the guard stops it at LOOP_GUARD + 1
                    action = Action("llm.completion", MODEL, tags=["researcher"])
                    estimate = estimate_cost(MODEL, input_tokens=context, max_output_tokens=MAX_OUTPUT_TOKENS)
                    with run.guard(action, estimate) as g:  # a different call each time: the context grows
                        usage = SimulatedModel().complete("evaluator", context)
                        g.commit(_cost(usage))
                    stats.model_calls += 1
                    context += usage.output_tokens + 200  # the answer and the search results join the history
                    search = with_args_fingerprint(Action("tool.call", LOOP_TOOL), LOOP_ARGS)
                    with run.guard(search, LOOP_TOOL_COST):  # the same call each time
                        stats.tool_calls += 1
                    console.print(f"   model call {stats.model_calls}, then {LOOP_TOOL}({args}): ran")
                stats.stopped_by, stats.reason = "nothing", f"{LOOP_GUARD + 2} identical calls ran"
        except LoopDetected as exc:
            stats.stopped_by, stats.reason = "loop_guard", exc.message
            console.print(f"   model call {stats.model_calls}, then {LOOP_TOOL}({args}): [red]DENIED: {exc}[/]")
        except Denied as exc:
            stats.stopped_by, stats.reason = "budget", exc.message
            console.print(f"[red]   DENIED: {exc}[/]")
        balance = cy.budgets.get(run.scope, LOOP_RUN_BUDGET.unit)
        stats.spent_microcents = balance.spent.amount if balance.spent else 0
        stats.left_microcents = balance.remaining.amount
        console.print(
            f"   ledger: the run spent {dollars(stats.spent_microcents)}, its budget had "
            f"{dollars(stats.left_microcents)} left: the loop guard, not the budget, stopped it"
            if stats.stopped_by == "loop_guard"
            else f"   ledger: the run spent {dollars(stats.spent_microcents)}"
        )
    return stats


def _why(denial: Denied) -> str:
    remaining = denial.details.get("remaining")
    requested = denial.details.get("requested")
    if isinstance(remaining, int) and isinstance(requested, int):
        return (
            f"{denial.scope or 'a scope'} had {dollars(remaining)} left, "
            f"the next call needed up to {dollars(requested)}"
        )
    return denial.message
