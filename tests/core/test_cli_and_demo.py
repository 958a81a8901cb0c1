"""The ``cycles`` command in process (fast) and the runaway-agent demo. The subprocess table of bad
inputs, run through the real entry point, is ``test_cli_table.py``."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from cycles import Action, Cycles, Subject, tokens, usd
from cycles.amounts import format_amount_exact, parse_amount, parse_unit, unit_name
from cycles.cli import build_parser, main, render_table
from cycles.demo import CONTEXT_WINDOW, run_demo
from cycles.errors import InvalidRequest
from cycles.models import INT64_MAX, Unit


@pytest.fixture
def ledger(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/cli.db"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_budget_lifecycle_on_the_command_line(ledger: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--ledger", ledger, "budget", "set", "tenant:acme", "50")[0] == 0
    code, out, _ = run(
        capsys, "budget", "set", "tenant:acme/workflow:w", "1.5", "--deny-tool", "deploy", "--ledger", ledger
    )
    assert code == 0 and "tenant:acme/workflow:w" in out and "$1.50" in out and "deny=deploy" in out
    assert run(capsys, "budget", "--ledger", ledger, "fund", "tenant:acme", "$2.50")[0] == 0
    code, out, _ = run(capsys, "--ledger", ledger, "budget", "show", "tenant:acme", "--json")
    (shown,) = json.loads(out)
    assert shown["allocated"] == {"unit": "USD_MICROCENTS", "amount": 5_250_000_000} and shown["status"] == "ACTIVE"
    code, out, _ = run(capsys, "budget", "list", "--tenant", "acme", "--ledger", ledger)
    assert out.count("tenant:acme") == 2 and out.splitlines()[0].split()[:3] == ["scope", "unit", "status"]
    code, out, _ = run(capsys, "balances", "--tenant", "acme", "--workflow", "w", "--ledger", ledger)
    assert "tenant:acme/workflow:w" in out and "deny=deploy" in out
    code, out, _ = run(capsys, "--ledger", ledger, "budget", "set", "tenant:acme", "100", "--unit", "risk")
    assert re.search(r"tenant:acme\s+risk\s+ACTIVE\s+100\b", out)


def test_every_budget_view_shows_status_caps_overdraft_and_debt(
    ledger: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with Cycles(ledger) as cy:
        cy.budgets.set("tenant:acme", tokens(100), overdraft_limit=tokens(50))
        r = cy.reserve(
            Subject(tenant="acme"), Action("llm.completion", "m"), tokens(100), overage_policy="ALLOW_WITH_OVERDRAFT"
        )
        assert r.reservation_id is not None
        cy.commit(r.reservation_id, tokens(130))  # 30 tokens of debt
    assert run(capsys, "--ledger", ledger, "budget", "freeze", "tenant:acme")[0] == 0
    views = [
        ["budget", "show", "tenant:acme"],
        ["budget", "list"],
        ["budget", "list", "--tenant", "acme"],
        ["balances", "--tenant", "acme"],
    ]
    for argv in views:
        code, out, _ = run(capsys, *argv, "--ledger", ledger)
        assert code == 0
        assert re.search(r"tenant:acme\s+tokens\s+FROZEN\s+100\s+100\s+0\s+30\s+-30\s+50", out), (argv, out)
        code, out, _ = run(capsys, *argv, "--ledger", ledger, "--json")
        (view,) = json.loads(out)
        assert view["status"] == "FROZEN" and view["debt"]["amount"] == 30
        assert view["overdraft_limit"]["amount"] == 50 and view["remaining"]["amount"] == -30


def test_caps_show_in_every_view(ledger: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["budget", "set", "tenant:acme", "5", "--max-tokens", "2000", "--allow-tool", "search", "--ledger", ledger]
    assert run(capsys, *args)[0] == 0
    for argv in (["budget", "show", "tenant:acme"], ["budget", "list"], ["balances", "--tenant", "acme"]):
        _, out, _ = run(capsys, *argv, "--ledger", ledger)
        assert "max_tokens=2000 allow=search" in out
        _, out, _ = run(capsys, *argv, "--ledger", ledger, "--json")
        assert json.loads(out)[0]["caps"] == {"max_tokens": 2000, "tool_allowlist": ["search"]}


def test_options_are_accepted_before_or_after_the_command(tmp_path: Path) -> None:
    parser = build_parser()
    url = f"sqlite:///{tmp_path}/x.db"
    for argv in (
        ["--ledger", url, "--json", "budget", "list"],
        ["budget", "--ledger", url, "--json", "list"],
        ["budget", "list", "--ledger", url, "--json"],
        ["--json", "budget", "list", "--ledger", url],
    ):
        args = parser.parse_args(argv)
        assert (args.ledger, args.json) == (url, True), argv
    for command in (
        ["serve"],
        ["keys", "create", "--tenant", "a"],
        ["sweep"],
        ["reservations"],
        ["demo"],
        ["tenants", "list"],
        ["api-keys", "list"],
        ["budgets", "list"],
        ["webhooks", "list"],
        ["events"],
        ["audit"],
        ["shadow", "report"],
        ["dashboard"],
    ):
        args = parser.parse_args([*command, "--ledger", url, "--admin-key", "k"])
        assert (args.ledger, args.admin_key) == (url, "k"), command
        args = parser.parse_args(["--ledger", url, "--admin-key", "k", *command])
        assert (args.ledger, args.admin_key) == (url, "k"), command


def test_every_option_has_help_text() -> None:
    import argparse

    def walk(parser: argparse.ArgumentParser, path: str) -> list[str]:
        missing = [
            f"{path} {'/'.join(a.option_strings) or a.dest}"
            for a in parser._actions
            if not a.help and not isinstance(a, argparse._SubParsersAction)
        ]
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    missing += walk(sub, f"{path} {name}")
        return missing

    assert walk(build_parser(), "cycles") == []


def test_amounts_are_parsed_exactly_or_refused() -> None:
    assert parse_amount("$0.05", "usd") == usd("0.05")
    assert parse_amount("0.00005", "usd").amount == 5_000
    assert parse_amount("0.00000001", "usd").amount == 1
    assert parse_amount("12.", "usd") == usd(12) and parse_amount(".5", "usd") == usd("0.5")
    assert parse_amount("1000", "tokens") == tokens(1000)
    assert parse_amount("7", "RISK_POINTS").unit is Unit.RISK_POINTS
    assert parse_amount("92233720368.54775807", "usd").amount == INT64_MAX
    for text, unit, why in [
        ("0,50", "usd", "thousands separators"),
        ("1,000", "tokens", "thousands separators"),
        ("1e11", "usd", "exponent"),
        ("1E3", "tokens", "exponent"),
        ("-5", "usd", "never negative"),
        ("1.2.3", "usd", "more than one decimal point"),
        ("nan", "usd", "not an amount"),
        ("inf", "usd", "not an amount"),
        ("", "usd", "not an amount"),
        ("0.000000001", "usd", "one micro-cent"),
        ("1.5", "tokens", "whole numbers"),
        ("92233720368.54775808", "usd", "largest amount"),
        ("9223372036854775808", "tokens", "largest amount"),
        ("1", "yen", "unknown unit"),
    ]:
        with pytest.raises(InvalidRequest, match=why):
            parse_amount(text, unit)


def test_amounts_display_with_the_precision_they_have() -> None:
    usd_ = Unit.USD_MICROCENTS
    assert format_amount_exact(usd_, 5_000) == "$0.00005"
    assert format_amount_exact(usd_, 150_000_000) == "$1.50"
    assert format_amount_exact(usd_, 1) == "$0.00000001"
    assert format_amount_exact(usd_, -200_000_000) == "-$2.00"
    assert format_amount_exact(usd_, 123_456_789_000_000) == "$1,234,567.89"
    assert format_amount_exact(Unit.TOKENS, 1200) == "1,200"
    for unit in Unit:  # the names tables show are the names --unit accepts
        assert parse_unit(unit_name(unit)) is unit


def test_plain_table() -> None:
    table = render_table(["a", "n"], [["x", "10"], ["yy", "2"]])
    assert table.splitlines()[2] == "x   10"


def test_the_demo_stops_the_runaway_loop_at_the_budget(tmp_path: Path) -> None:
    out = io.StringIO()
    url = f"sqlite:///{tmp_path}/demo.db"
    result = run_demo(url, budget=usd(1), simulated_minutes=60, replay_seconds=0, out=out)
    text = out.getvalue()
    guarded, free = result.guarded, result.unguarded
    assert guarded.stopped_by == "budget" and free.stopped_by == "timer"
    assert 0 < guarded.spent_microcents <= 100_000_000
    assert "DENIED before call" in text and "Summary" in text
    assert "Stopped by the demo's timer" in text and "by hand" not in text
    # Sane figures: an hour of simulated calls, the context capped at the model's window.
    assert 59 * 60 <= free.simulated_s <= 61 * 60 and free.context_tokens <= CONTEXT_WINDOW
    assert usd(50).amount < free.spent_microcents < usd(1000).amount
    with Cycles(url) as cy:
        wf = next(b for b in cy.budgets.list(tenant="demo") if "workflow:" in b.scope)
        assert wf.spent is not None and wf.spent.amount == guarded.spent_microcents  # ledger agrees with the loop
        assert wf.reserved is not None and wf.reserved.amount == 0


def test_the_demo_reports_a_timer_stop_when_the_budget_is_never_reached(tmp_path: Path) -> None:
    out = io.StringIO()
    result = run_demo(f"sqlite:///{tmp_path}/d.db", budget=usd(10_000), simulated_minutes=5, replay_seconds=0, out=out)
    assert result.guarded.stopped_by == "timer"
    assert "the demo's timer (the budget was never reached)" in out.getvalue()


def test_the_demo_figures_do_not_depend_on_the_pace(tmp_path: Path) -> None:
    fast = run_demo(f"sqlite:///{tmp_path}/a.db", simulated_minutes=10, replay_seconds=0, out=io.StringIO())
    paced = run_demo(f"sqlite:///{tmp_path}/b.db", simulated_minutes=10, replay_seconds=0.3, out=io.StringIO())
    assert fast.unguarded.spent_microcents == paced.unguarded.spent_microcents
    assert fast.guarded.calls == paced.guarded.calls


def test_the_demo_stops_a_repeated_tool_call_with_the_loop_guard_not_the_budget(tmp_path: Path) -> None:
    from cycles.demo import LOOP_GUARD

    out = io.StringIO()
    url = f"sqlite:///{tmp_path}/loop.db"
    result = run_demo(url, simulated_minutes=5, replay_seconds=0, out=out)
    looping = result.looping
    assert looping is not None and looping.stopped_by == "loop_guard"
    assert looping.tool_calls == LOOP_GUARD and looping.model_calls == LOOP_GUARD + 1  # its model calls all differ
    assert "LOOP_DETECTED" not in looping.reason and "loop detected" in looping.reason
    text = out.getvalue()
    assert "DENIED: ACTION_QUOTA_EXCEEDED: loop detected" in text and "stopped by the loop guard" in text
    with Cycles(url) as cy:
        (scope,) = [b.scope for b in cy.budgets.list(tenant="demo") if "stuck-search" in b.scope]
        balance = cy.budgets.get(scope)
        assert balance.spent is not None and balance.spent.amount == looping.spent_microcents
        assert balance.reserved is not None and balance.reserved.amount == 0
        assert looping.left_microcents == balance.remaining.amount > 0  # the budget was not what stopped it
    assert result.to_json()["loop_guard"] == {"max_repeats": LOOP_GUARD, **vars(looping)}
