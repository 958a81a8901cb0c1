"""The runaway-agent demo: a writer drafts, an evaluator never approves, the writer retries forever.

Act 1 runs the loop with no guard for a few seconds and shows the spend climbing. Act 2 runs the
same loop with every model call guarded by Cycles under a $1 workflow budget: Cycles says no
before the call that would overspend, and the loop ends with a clear denial.

The model is simulated (no network, no API key) but priced like the real one through
``cycles.pricing``: each call's cost is its token usage at the model's published prices.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from cycles.client import Cycles
from cycles.errors import Denied
from cycles.models import Action, Amount, Subject, Unit, format_amount, usd
from cycles.pricing import estimate_cost, price_usage

MODEL = "openai:gpt-4o"
USD = Unit.USD_MICROCENTS
MAX_OUTPUT_TOKENS = 700


@dataclass
class _Usage:
    input_tokens: int
    output_tokens: int


class SimulatedModel:
    """Answers like a chat model would, with token counts a real one would report. The writer's
    context grows with every rejected draft: that is what makes runaway loops expensive."""

    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s
        self.calls = 0

    def complete(self, role: str, context_tokens: int) -> tuple[str, _Usage]:
        self.calls += 1
        if self.latency_s:
            time.sleep(self.latency_s)
        if role == "writer":
            return f"Draft v{self.calls} of the launch post...", _Usage(context_tokens, 620)
        return "REJECT: needs more detail.", _Usage(context_tokens, 40)


@dataclass
class RunStats:
    calls: int = 0
    spent_microcents: int = 0
    started: float = field(default_factory=time.monotonic)
    stopped_by: str = ""
    reason: str = ""

    @property
    def spent(self) -> str:
        return format_amount(USD, self.spent_microcents)

    def rate_per_hour(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        return format_amount(USD, int(self.spent_microcents / elapsed * 3600))


def _cost(usage: _Usage) -> Amount:
    return price_usage(MODEL, input_tokens=usage.input_tokens, output_tokens=usage.output_tokens)


class _Screen:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.live = out.isatty() and os.environ.get("TERM") != "dumb"
        self.color = self.live and "NO_COLOR" not in os.environ
        self._last_print = 0.0

    def paint(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def line(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def status(self, text: str, force: bool = False) -> None:
        """A progress line: redrawn in place on a terminal, printed twice a second otherwise."""
        if self.live:
            self.out.write("\r\033[K" + text)
            self.out.flush()
        elif force or time.monotonic() - self._last_print >= 0.5:
            self._last_print = time.monotonic()
            self.line(text)

    def end_status(self) -> None:
        if self.live:
            self.out.write("\n")


def _agent_loop(
    model: SimulatedModel,
    stats: RunStats,
    call: Callable[[str, int], _Usage],
    screen: _Screen,
    label: str,
    keep_going: Callable[[], bool],
) -> None:
    context = 1_800  # system prompt + brief
    attempt = 0
    while keep_going():
        attempt += 1
        draft = call("writer", context)
        context += draft.output_tokens
        call("evaluator", context)
        context += 40  # the rejection is fed back to the writer
        screen.status(
            f"  {label}  attempt {attempt:3d}  calls {stats.calls:4d}  spent {stats.spent:>9}"
            f"  context {context:6,} tokens"
        )


def run_demo(
    ledger_url: str | None = None,
    *,
    budget_usd: float = 1.0,
    unguarded_seconds: float = 3.0,
    latency_s: float = 0.02,
    out: TextIO | None = None,
) -> RunStats:
    screen = _Screen(out or sys.stdout)
    bold, dim, red, green = "1", "2", "31", "32"
    screen.line(screen.paint("Cycles demo: a runaway agent loop", bold))
    screen.line("A writer drafts, an evaluator never approves, the writer retries with the whole history.")
    screen.line(f"Model: {MODEL} (simulated, priced from genai-prices data). No network, no API key.\n")

    # Act 1 ---------------------------------------------------------------------------------
    screen.line(screen.paint(f"1) Without Cycles, for {unguarded_seconds:g} seconds:", bold))
    free = RunStats()
    model = SimulatedModel(latency_s)

    def unguarded_call(role: str, context: int) -> _Usage:
        _, usage = model.complete(role, context)
        free.calls += 1
        free.spent_microcents += _cost(usage).amount
        return usage

    deadline = time.monotonic() + unguarded_seconds
    _agent_loop(model, free, unguarded_call, screen, "no guard", lambda: time.monotonic() < deadline)
    screen.end_status()
    screen.line(
        f"   {free.calls} calls, {screen.paint(free.spent, red)} in {unguarded_seconds:g} s and still going "
        f"({free.rate_per_hour()}/hour if nobody notices). Stopped by hand.\n"
    )

    # Act 2 ---------------------------------------------------------------------------------
    cy = Cycles(ledger_url)
    run_id = "run-" + uuid.uuid4().hex[:8]
    subject = Subject(tenant="demo", workflow=run_id, agent="writer")
    cy.budgets.set("tenant:demo", usd(1_000))
    cy.budgets.set(f"tenant:demo/workflow:{run_id}", usd(budget_usd))
    screen.line(screen.paint(f"2) With Cycles: ${budget_usd:.2f} budget on workflow {run_id}", bold))
    screen.line(screen.paint(f"   ledger {cy.url}", dim))
    guarded = RunStats()
    model = SimulatedModel(latency_s)

    def guarded_call(role: str, context: int) -> _Usage:
        action = Action("llm.completion", MODEL, tags=[role])
        estimate = estimate_cost(MODEL, input_tokens=context, max_output_tokens=MAX_OUTPUT_TOKENS)
        with cy.guard(subject.merged(agent=role), action, estimate=estimate) as g:
            _, usage = model.complete(role, context)
            actual = _cost(usage)
            g.commit(actual, metrics={"tokens_input": usage.input_tokens, "tokens_output": usage.output_tokens})
        guarded.calls += 1
        guarded.spent_microcents += actual.amount
        return usage

    try:
        _agent_loop(model, guarded, guarded_call, screen, "cycles  ", lambda: True)
    except Denied as denial:
        screen.end_status()
        guarded.stopped_by = f"Cycles ({denial.code})"
        remaining = denial.details.get("remaining")
        requested = denial.details.get("requested")
        guarded.reason = (
            f"{denial.scope or 'a scope'} had {format_amount(USD, int(remaining))} left, "
            f"the next call needed up to {format_amount(USD, int(requested))}"
            if isinstance(remaining, int) and isinstance(requested, int)
            else denial.message
        )
        screen.line(screen.paint(f"   DENIED before call {guarded.calls + 1}: {denial}", red))
    balance = cy.budgets.get(f"tenant:demo/workflow:{run_id}")
    cy.close()

    # Summary -------------------------------------------------------------------------------
    screen.line()
    screen.line(screen.paint("Summary", bold))
    screen.line(f"  without Cycles  {free.calls:4d} calls  {free.spent:>9}  still running when we pulled the plug")
    screen.line(
        f"  with Cycles     {guarded.calls:4d} calls  {guarded.spent:>9}  "
        f"of a {format_amount(USD, usd(budget_usd).amount)} budget ({balance.remaining} left, {balance.reserved} held)"
    )
    screen.line(f"  stopped by      {screen.paint(guarded.stopped_by or 'nothing (!)', green)}")
    screen.line(f"  why             {guarded.reason}")
    screen.line(
        "  how             every model call reserved its worst-case cost first; the call that could "
        "have\n                  overspent was refused before it reached the model."
    )
    return guarded
