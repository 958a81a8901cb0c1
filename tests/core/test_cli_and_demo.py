"""The ``cycles`` command and the runaway-agent demo, run as a user would."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cycles import Cycles, usd
from cycles.cli import main, parse_amount, render_table
from cycles.demo import run_demo
from cycles.errors import InvalidRequest


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
        capsys, "--ledger", ledger, "budget", "set", "tenant:acme/workflow:w", "1.5", "--deny-tool", "deploy"
    )
    assert code == 0 and "tenant:acme/workflow:w" in out and "$1.5000" in out
    assert run(capsys, "--ledger", ledger, "budget", "fund", "tenant:acme", "$2.50")[0] == 0
    code, out, _ = run(capsys, "--ledger", ledger, "--json", "budget", "show", "tenant:acme")
    assert json.loads(out)[0]["allocated"] == {"unit": "USD_MICROCENTS", "amount": 5_250_000_000}
    code, out, _ = run(capsys, "--ledger", ledger, "budget", "list", "--tenant", "acme")
    assert out.count("tenant:acme") == 2 and "remaining" in out.splitlines()[0]
    code, out, _ = run(capsys, "--ledger", ledger, "balances", "--tenant", "acme", "--workflow", "w")
    assert "tenant:acme/workflow:w" in out and "tenant:acme " not in out
    code, out, _ = run(capsys, "--ledger", ledger, "budget", "set", "tenant:acme", "100", "--unit", "risk")
    assert "RISK_POINTS" in out


def test_reservations_and_sweep(ledger: str, capsys: pytest.CaptureFixture[str]) -> None:
    from cycles import Action, Subject

    with Cycles(ledger) as cy:
        cy.budgets.set("tenant:acme", usd(1))
        cy.reserve(Subject(tenant="acme"), Action("llm.completion", "m"), usd(0.1))
    code, out, _ = run(capsys, "--ledger", ledger, "reservations", "--tenant", "acme", "--status", "ACTIVE")
    assert code == 0 and "ACTIVE" in out and "llm.completion m" in out
    code, out, _ = run(capsys, "--ledger", ledger, "sweep")
    assert code == 0 and "expired 0" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["budget", "set", "tenant:a", "-5"], "non-negative"),
        (["budget", "set", "tenant:a", "abc"], "not a number"),
        (["budget", "set", "tenant:a", "1.5", "--unit", "tokens"], "whole numbers"),
        (["budget", "set", "tenant:a", "1", "--unit", "yen"], "unknown unit"),
        (["budget", "set", "not-a-scope", "1"], "INVALID_REQUEST"),
        (["budget", "show", "tenant:nobody"], "NOT_FOUND"),
        (["balances"], "INVALID_REQUEST"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(
    ledger: str, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = run(capsys, "--ledger", ledger, *argv)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_bad_ledger_url(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--ledger", "ftp://x", "budget", "list")
    assert code == 2 and "unsupported ledger URL" in err


def test_parse_amount_and_table() -> None:
    assert parse_amount("1,000", "tokens").amount == 1000
    assert parse_amount("$0.05", "usd") == usd(0.05)
    with pytest.raises(InvalidRequest):
        parse_amount("nan", "usd")
    table = render_table(["a", "n"], [["x", "10"], ["yy", "2"]])
    assert table.splitlines()[2] == "x   10"


def test_the_demo_stops_the_runaway_loop_at_the_budget(tmp_path: Path) -> None:
    out = io.StringIO()
    stats = run_demo(f"sqlite:///{tmp_path}/demo.db", budget_usd=1.0, unguarded_seconds=0.3, latency_s=0.0, out=out)
    text = out.getvalue()
    assert stats.stopped_by == "Cycles (BUDGET_EXCEEDED)"
    assert 0 < stats.spent_microcents <= 100_000_000
    assert "DENIED before call" in text and "Summary" in text
    with Cycles(f"sqlite:///{tmp_path}/demo.db") as cy:
        wf = next(b for b in cy.budgets.list(tenant="demo") if "workflow:" in b.scope)
        assert wf.spent is not None and wf.spent.amount == stats.spent_microcents  # ledger agrees with the loop
        assert wf.reserved is not None and wf.reserved.amount == 0


def test_the_console_script_runs_the_demo(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cycles.cli",
            "--ledger",
            f"sqlite:///{tmp_path}/d.db",
            "demo",
            "--fast",
            "--seconds",
            "0.2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "stopped by      Cycles (BUDGET_EXCEEDED)" in result.stdout
