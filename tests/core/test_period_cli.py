"""``cycles budget set --period/--timezone/--rollover``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cycles.cli import main


def test_a_recurring_budget_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ledger = f"sqlite:///{tmp_path}/cli.db"
    argv = ["--ledger", ledger, "--json", "budget", "set", "tenant:acme", "500"]
    assert main([*argv, "--period", "month", "--timezone", "Europe/Berlin", "--rollover", "CARRY_FORWARD"]) == 0
    (shown,) = json.loads(capsys.readouterr().out)
    assert shown["period_start"].endswith(("T22:00:00Z", "T23:00:00Z"))  # a Berlin midnight
    assert shown["period_start"][8:10] in ("01", "28", "29", "30", "31")  # the first, local time
    assert main(["--ledger", ledger, "budget", "set", "tenant:acme", "5", "--period", "fortnight"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: INVALID_REQUEST") and "fortnight" in err and err.count("\n") == 1
