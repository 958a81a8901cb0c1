"""Every bad input a new user tried (issue 12), and the happy paths, through the real ``cycles``
entry point in a subprocess: the exit status, one line on stderr and no traceback, and the ledger
exactly as it was before."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cycles import Cycles, tokens, usd

CYCLES = str(Path(sys.executable).parent / "cycles")


@dataclass
class World:
    tmp: Path
    ledger: str
    env: dict[str, str]
    files: dict[str, str]

    def fill(self, argv: list[str]) -> list[str]:
        return [a.format(**self.files, ledger=self.ledger) for a in argv]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _set_read_only(path: Path, on: bool) -> None:
    """chmod for a normal user; root ignores modes, so there the immutable attribute does it."""
    if os.geteuid() != 0:
        path.chmod((0o555 if path.is_dir() else 0o444) if on else 0o755)
        return
    subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    home = tmp_path / "home"
    home.mkdir()
    ledger = f"sqlite:///{tmp_path}/ledger.db"
    with Cycles(ledger) as cy:
        cy.budgets.set("tenant:acme", usd(50))
        cy.budgets.set("tenant:acme/workflow:w", tokens(1000))
        cy.budgets.set("tenant:gone", usd(1))
        cy.budgets.close("tenant:gone")
    foreign = tmp_path / "photos.db"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE albums (id INTEGER PRIMARY KEY, name TEXT)")
        db.execute("INSERT INTO albums (name) VALUES ('holidays')")
    db.close()
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not a database\n" * 100)
    (tmp_path / "adir").mkdir()
    read_only = tmp_path / "ro.db"
    with Cycles(f"sqlite:///{read_only}") as cy:
        cy.budgets.set("tenant:ro", usd(3))
    locked_dir = tmp_path / "locked"
    locked_dir.mkdir()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    files = {
        "foreign": str(foreign),
        "corrupt": str(corrupt),
        "adir": str(tmp_path / "adir"),
        "ro": str(read_only),
        "locked": str(locked_dir),
        "closed_port": str(_closed_port()),
        "busy_port": str(busy.getsockname()[1]),
        "home": str(home),
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYCLES_")}
    env.update({"HOME": str(home), "CYCLES_HOME": str(home / "cycles"), "NO_COLOR": "1"})
    env.pop("XDG_DATA_HOME", None)
    _set_read_only(read_only, True)
    _set_read_only(locked_dir, True)
    try:
        yield World(tmp_path, ledger, env, files)
    finally:
        _set_read_only(read_only, False)
        _set_read_only(locked_dir, False)
        busy.close()


def _state(world: World) -> dict[str, object]:
    """Everything a failed command must leave as it was: the ledger's budgets, every file's bytes."""
    with Cycles(world.ledger) as cy:
        budgets = [b.to_wire() for b in cy.budgets.list()]
    digests = {
        name: hashlib.sha256(Path(p).read_bytes()).hexdigest() for name, p in world.files.items() if Path(p).is_file()
    }
    home = sorted(str(p) for p in Path(world.files["home"]).rglob("*"))
    return {"budgets": budgets, "files": digests, "home": home}


def _run(world: World, argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CYCLES, *world.fill(argv)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**world.env, **(env or {})},
        cwd=world.tmp,
    )


# (argv, exit status, what the one line must say, extra environment)
BAD_INPUTS: list[tuple[list[str], int, str, dict[str, str] | None]] = [
    # money
    (["budget", "set", "tenant:acme", "0,50", "--ledger", "{ledger}"], 2, "without thousands separators", None),
    (["budget", "set", "tenant:acme", "1,000", "--ledger", "{ledger}"], 2, "without thousands separators", None),
    (["budget", "set", "tenant:acme", "1e30", "--ledger", "{ledger}"], 2, "without an exponent", None),
    (["budget", "set", "tenant:acme", "1e11", "--ledger", "{ledger}"], 2, "without an exponent", None),
    (["budget", "set", "tenant:acme", "100000000000", "--ledger", "{ledger}"], 2, "largest amount", None),
    (["budget", "set", "tenant:acme", "0.000000001", "--ledger", "{ledger}"], 2, "one micro-cent", None),
    (["budget", "set", "tenant:acme", "-5", "--ledger", "{ledger}"], 2, "never negative", None),
    (["budget", "fund", "tenant:acme", "1.2.3", "--ledger", "{ledger}"], 2, "more than one decimal point", None),
    (["budget", "set", "tenant:acme", "1.5", "--unit", "tokens", "--ledger", "{ledger}"], 2, "whole numbers", None),
    (["budget", "set", "tenant:acme", "1", "--unit", "yen", "--ledger", "{ledger}"], 2, "unknown unit", None),
    (["budget", "set", "tenant:acme", "1", "--max-tokens", "-1", "--ledger", "{ledger}"], 2, "--max-tokens", None),
    (["budget", "set", "tenant:acme", "1", "--overdraft-limit", "1e3", "--ledger", "{ledger}"], 2, "exponent", None),
    (["demo", "--budget", "0,5"], 2, "thousands separators", None),
    # usage
    ([], 2, "required: COMMAND", None),
    (["budget"], 2, "required: ACTION", None),
    (["budget", "frobnicate"], 2, "invalid choice", None),
    (["budget", "set", "not-a-scope", "1", "--ledger", "{ledger}"], 2, "INVALID_REQUEST", None),
    (["balances", "--ledger", "{ledger}"], 2, "INVALID_REQUEST", None),
    (["reservations", "--limit", "0", "--ledger", "{ledger}"], 2, "between 1 and 200", None),
    (["--ledger", "ftp://x", "budget", "list"], 2, "unsupported ledger URL", None),
    (["keys"], 2, "say which action", None),
    (["keys", "create", "--ledger", "{ledger}"], 2, "--tenant", None),
    # state that would die with the process
    (["--ledger", "memory://", "budget", "set", "tenant:a", "1"], 2, "memory:// keeps nothing", None),
    (["--ledger", "memory://", "budget", "freeze", "tenant:a"], 2, "memory:// keeps nothing", None),
    (["keys", "create", "--tenant", "a", "--ledger", "memory://"], 2, "memory:// keeps nothing", None),
    (["sweep", "--ledger", "memory://"], 2, "memory:// keeps nothing", None),
    # what the ledger refuses
    (["budget", "show", "tenant:nobody", "--ledger", "{ledger}"], 1, "NOT_FOUND", None),
    (["budget", "set", "tenant:gone", "5", "--ledger", "{ledger}"], 1, "BUDGET_CLOSED", None),
    (["budget", "unfreeze", "tenant:gone", "--ledger", "{ledger}"], 1, "BUDGET_CLOSED", None),
    (["budget", "delete", "tenant:nobody", "--ledger", "{ledger}"], 1, "NOT_FOUND", None),
    (["budget", "delete", "tenant:acme", "--unit", "yen", "--ledger", "{ledger}"], 2, "unknown unit", None),
    (["--ledger", "memory://", "budget", "delete", "tenant:a"], 2, "memory:// keeps nothing", None),
    (["keys", "revoke", "0123456789abcdef", "--ledger", "{ledger}"], 1, "NOT_FOUND", None),
    # files that are not (writable) ledgers
    (["budget", "list", "--ledger", "sqlite:///{adir}"], 2, "is a directory", None),
    (["budget", "set", "tenant:a", "1", "--ledger", "sqlite:///{foreign}"], 2, "another program's SQLite", None),
    (["keys", "create", "--tenant", "a", "--ledger", "sqlite:///{foreign}"], 2, "another program's SQLite", None),
    (["serve", "--port", "0", "--ledger", "sqlite:///{foreign}"], 2, "another program's SQLite", None),
    (["budget", "list", "--ledger", "sqlite:///{corrupt}"], 1, "not a readable SQLite database", None),
    (["budget", "set", "tenant:ro", "9", "--ledger", "sqlite:///{ro}"], 1, "read-only", None),
    (["budget", "list", "--ledger", "sqlite:///{locked}/sub/x.db"], 1, "cannot create the directory", None),
    (["budget", "list"], 1, "set CYCLES_HOME", {"HOME": "{locked}", "CYCLES_HOME": ""}),
    # services that are not there
    (["serve", "--port", "99999"], 2, "between 0 and 65535", None),
    (["serve", "--port", "{busy_port}", "--ledger", "memory://"], 1, "already in use", None),
    (
        ["serve", "--host", "192.0.2.1", "--port", "0", "--ledger", "memory://"],
        1,
        "not an address of this machine",
        None,
    ),
    (["serve", "--workers", "2", "--ledger", "memory://"], 2, "shared ledger", None),
    (["serve", "--port", "0", "--ledger", "memory://", "--custom-kinds", "{adir}/none.json"], 2, "custom kinds", None),
    (
        ["keys", "create", "--tenant", "a", "--ledger", "redis://127.0.0.1:{closed_port}/0"],
        1,
        "LEDGER_UNAVAILABLE",
        None,
    ),
    (["budget", "list", "--ledger", "redis://127.0.0.1:{closed_port}/0"], 1, "LEDGER_UNAVAILABLE", None),
    (["balances", "--tenant", "a", "--ledger", "http://127.0.0.1:{closed_port}"], 1, "LEDGER_UNAVAILABLE", None),
    (["budget", "list", "--ledger", "http://127.0.0.1:{closed_port}"], 2, "--admin-key", None),
    (
        ["budget", "list", "--ledger", "http://127.0.0.1:{closed_port}", "--admin-key", "k"],
        1,
        "LEDGER_UNAVAILABLE",
        None,
    ),
]


@pytest.mark.parametrize(
    ("argv", "status", "needle", "env"), BAD_INPUTS, ids=[" ".join(c[0])[:60] or "(none)" for c in BAD_INPUTS]
)
def test_bad_input_is_one_line_the_right_status_and_changes_nothing(
    world: World, argv: list[str], status: int, needle: str, env: dict[str, str] | None
) -> None:
    before = _state(world)
    filled_env = {k: v.format(**world.files) for k, v in (env or {}).items()}
    result = _run(world, argv, filled_env)
    assert result.returncode == status, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert needle in result.stderr
    assert result.stdout == ""
    assert _state(world) == before


def _governance(world: World) -> dict[str, object]:
    """The governance plane's objects (the audit log is left out: it records failures too)."""
    with Cycles(world.ledger) as cy:
        return {"tenants": cy.tenants.list(), "keys": cy.keys.list(), "webhooks": cy.webhooks.list()}


# The governance commands (cycles.cli_admin) and the operators' ones (cycles.ops_cli): the world has
# the tenant "known" as an object, with one API key and one webhook.
GOVERNANCE_BAD_INPUTS: list[tuple[list[str], int, str]] = [
    (["tenants"], 2, "required: ACTION"),
    (["tenants", "show", "ghost", "--ledger", "{ledger}"], 1, "TENANT_NOT_FOUND"),
    (["--ledger", "{ledger}", "tenants", "suspend", "ghost"], 1, "TENANT_NOT_FOUND"),
    (["tenants", "create", "known", "--name", "Someone else", "--ledger", "{ledger}"], 1, "DUPLICATE_RESOURCE"),
    (["tenants", "create", "x", "--ledger", "{ledger}"], 2, "--name"),
    (["tenants", "list", "--status", "GONE", "--ledger", "{ledger}"], 2, "invalid choice"),
    (["api-keys", "create", "--tenant", "ghost", "--name", "k", "--ledger", "{ledger}"], 2, "'ghost' not found"),
    (["api-keys", "revoke", "0123456789abcdef", "--ledger", "{ledger}"], 1, "NOT_FOUND"),
    (["api-keys", "create", "--tenant", "known", "--name", "k", "--expires", "soon", "--ledger", "{ledger}"], 2, "ISO"),
    (["budgets", "create", "tenant:acme", "1", "--ledger", "{ledger}"], 1, "DUPLICATE_RESOURCE"),
    (["budgets", "create", "tenant:acme/workspace:w", "1e3", "--ledger", "{ledger}"], 2, "exponent"),
    (["budgets", "show", "tenant:acme", "--unit", "yen", "--ledger", "{ledger}"], 2, "unknown unit"),
    (["budgets", "show", "tenant:nobody", "--ledger", "{ledger}"], 1, "NOT_FOUND"),
    (["budgets", "fund", "tenant:acme", "1", "--spent", "x", "--ledger", "{ledger}"], 2, "is not an amount"),
    (["budgets", "fund", "tenant:acme", "1", "--operation", "top_up", "--ledger", "{ledger}"], 2, "invalid choice"),
    (
        ["budgets", "fund", "tenant:acme", "1", "--operation", "repay_debt", "--ledger", "{ledger}"],
        2,
        "more than the debt",
    ),
    (["budgets", "fund", "tenant:acme", "0", "--ledger", "{ledger}"], 2, "CREDIT needs an amount above 0"),
    (["budgets", "fund", "tenant:nobody", "1", "--operation", "DEBIT", "--ledger", "{ledger}"], 1, "BUDGET_NOT_FOUND"),
    (
        ["webhooks", "create", "--url", "not-a-url", "--event", "budget.exhausted", "--ledger", "{ledger}"],
        2,
        "WEBHOOK_URL_INVALID",
    ),
    (
        ["webhooks", "create", "--url", "http://127.0.0.1:9/x", "--event", "budget.exhausted", "--ledger", "{ledger}"],
        2,
        "must be https://",
    ),
    (
        [
            "webhooks",
            "create",
            "--url",
            "https://h.example/x",
            "--event",
            "budget.exhausted",
            "--threshold",
            "80",
            "--ledger",
            "{ledger}",
        ],
        2,
        "at most 1",
    ),
    (["webhooks", "show", "nosub", "--ledger", "{ledger}"], 1, "WEBHOOK_NOT_FOUND"),
    (["events", "--since", "yesterday", "--ledger", "{ledger}"], 2, "not an ISO 8601 date-time"),
    (["audit", "--until", "later", "--ledger", "{ledger}"], 2, "not an ISO 8601 date-time"),
    (["events", "--limit", "-1", "--ledger", "{ledger}"], 2, "must be 0 or more"),
    (["audit", "--status-min", "42", "--ledger", "{ledger}"], 2, "between 100 and 599"),
    (["shadow", "report", "--since", "yesterday", "--ledger", "{ledger}"], 2, "--since takes 7d"),
    (["--ledger", "{ledger}", "shadow", "report", "--since", "last week"], 2, "--since takes 7d"),
    (["dashboard", "--port", "99999", "--ledger", "{ledger}"], 2, "between 0 and 65535"),
    # state that would die with the process
    (["--ledger", "memory://", "tenants", "create", "a", "--name", "A"], 2, "memory:// keeps nothing"),
    (["api-keys", "create", "--tenant", "a", "--name", "k", "--ledger", "memory://"], 2, "memory:// keeps nothing"),
    (["--ledger", "memory://", "budgets", "fund", "tenant:a", "1"], 2, "memory:// keeps nothing"),
    (
        ["webhooks", "create", "--url", "https://h.example/x", "--event", "budget.exhausted", "--ledger", "memory://"],
        2,
        "memory:// keeps nothing",
    ),
    (["--ledger", "memory://", "webhooks", "security", "--allow-http"], 2, "memory:// keeps nothing"),
    (
        [
            "quotas",
            "reset",
            "--tenant",
            "a",
            "--scope",
            "tenant:a",
            "--kind",
            "k",
            "--window",
            "per_run",
            "--window-key",
            "r",
            "--ledger",
            "memory://",
        ],
        2,
        "memory:// keeps nothing",
    ),
    # quota counters and the action kind registry
    (["quotas", "counters", "--ledger", "{ledger}"], 2, "--tenant"),
    (["quotas", "counters", "--tenant", "known", "--window", "per_week", "--ledger", "{ledger}"], 2, "invalid choice"),
    (["quotas", "counters", "--tenant", "known", "--limit", "0", "--ledger", "{ledger}"], 2, "--limit"),
    (
        [
            "quotas",
            "reset",
            "--tenant",
            "known",
            "--scope",
            "tenant:known",
            "--kind",
            "__risk__",
            "--risk-class",
            "high_risk",
            "--window",
            "per_hour_tumbling",
            "--window-key",
            "noon",
            "--ledger",
            "{ledger}",
        ],
        2,
        "not a per_hour_tumbling bucket",
    ),
    (["action-kinds", "message.email", "--ledger", "{ledger}"], 1, "not in the registry"),
    (["action-kinds", "--risk-class", "scary"], 2, "invalid choice"),
    # ledgers that are not there or not ledgers
    (["tenants", "list", "--ledger", "sqlite:///{foreign}"], 2, "another program's SQLite"),
    (["audit", "--ledger", "sqlite:///{corrupt}"], 1, "not a readable SQLite database"),
    (["tenants", "list", "--ledger", "redis://127.0.0.1:{closed_port}/0"], 1, "LEDGER_UNAVAILABLE"),
    (["events", "--ledger", "redis://127.0.0.1:{closed_port}/0"], 1, "LEDGER_UNAVAILABLE"),
    (["tenants", "list", "--ledger", "http://127.0.0.1:{closed_port}"], 2, "--admin-key"),
    # --admin-key before the command is kept (it was lost): the server is asked, and is not there
    (["--admin-key", "k", "tenants", "list", "--ledger", "http://127.0.0.1:{closed_port}"], 1, "LEDGER_UNAVAILABLE"),
    (["--ledger", "http://127.0.0.1:{closed_port}", "--admin-key", "k", "shadow", "report"], 1, "LEDGER_UNAVAILABLE"),
]


@pytest.fixture
def governed(world: World) -> World:
    with Cycles(world.ledger) as cy:
        cy.tenants.create("known", "Known Ltd")
        cy.keys.create("known", "ci", permissions=["balances:read"])
        cy.webhooks.create("https://hooks.example/known", ["budget.exhausted"], tenant_id="known")
        cy.records.close()
    return world


@pytest.mark.parametrize(
    ("argv", "status", "needle"), GOVERNANCE_BAD_INPUTS, ids=[" ".join(c[0])[:60] for c in GOVERNANCE_BAD_INPUTS]
)
def test_bad_input_to_the_governance_and_operator_commands(
    governed: World, argv: list[str], status: int, needle: str
) -> None:
    before = (_state(governed), _governance(governed))
    result = _run(governed, argv)
    assert result.returncode == status, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert needle in result.stderr
    assert result.stdout == ""
    assert (_state(governed), _governance(governed)) == before


def test_options_go_before_or_after_the_governance_and_operator_commands(governed: World) -> None:
    import json

    for argv in (
        ["--ledger", "{ledger}", "--json", "tenants", "list"],
        ["tenants", "--json", "list", "--ledger", "{ledger}"],
        ["tenants", "list", "--json", "--ledger", "{ledger}"],
    ):
        listed = _run(governed, argv)
        assert listed.returncode == 0, listed.stderr
        assert [t["tenant_id"] for t in json.loads(listed.stdout)] == ["known"], argv
    for argv in (
        ["--ledger", "{ledger}", "--json", "shadow", "report", "--since", "1h"],
        ["shadow", "report", "--since", "1h", "--json", "--ledger", "{ledger}"],
    ):
        report = _run(governed, argv)
        assert report.returncode == 0, report.stderr
        assert json.loads(report.stdout)["would_deny"] == 0, argv
    plain = _run(governed, ["--ledger", "{ledger}", "shadow", "report"])
    assert plain.returncode == 0 and plain.stdout.startswith("Shadow report, all tenants")
    via_env = _run(governed, ["api-keys", "list", "--json"], {"CYCLES_URL": governed.ledger})
    assert [k["name"] for k in json.loads(via_env.stdout)] == ["ci"]
    shown = _run(governed, ["budgets", "show", "tenant:acme", "--ledger", "{ledger}"])
    assert shown.stdout == "tenant:acme usd ACTIVE: allocated $50.00, remaining $50.00\n"  # the names --unit takes
    events = _run(governed, ["--ledger", "{ledger}", "events", "--format", "jsonl", "--type", "tenant.created"])
    assert [json.loads(line)["data"]["tenant_id"] for line in events.stdout.splitlines()] == ["known"]


def test_a_refused_read_is_the_ledger_being_unavailable_not_an_internal_error(world: World) -> None:
    result = _run(world, ["balances", "--tenant", "a", "--ledger", "http://127.0.0.1:{closed_port}"])
    assert result.stderr.startswith("error: LEDGER_UNAVAILABLE: ")
    assert "INTERNAL_ERROR" not in result.stderr and "idempotency key" not in result.stderr
    assert "running and reachable" in result.stderr


def test_happy_paths(world: World) -> None:
    version = _run(world, ["--version"])
    assert version.returncode == 0 and re.fullmatch(r"cycles \d+\.\d+\.\d+\n", version.stdout)
    helped = _run(world, ["--help"])
    assert helped.returncode == 0
    for documented in ("CYCLES_URL", "CYCLES_API_KEY", "CYCLES_ADMIN_KEY", "--admin-key", "Exit status: 0"):
        assert documented in helped.stdout
    module = subprocess.run(
        [sys.executable, "-m", "cycles", "--version"], capture_output=True, text=True, env=world.env, timeout=60
    )
    assert module.returncode == 0 and module.stdout == version.stdout

    assert _run(world, ["budget", "set", "tenant:acme", "0.00005", "--ledger", "{ledger}"]).returncode == 0
    shown = _run(world, ["budget", "show", "tenant:acme", "--unit", "usd", "--ledger", "{ledger}"])
    assert shown.returncode == 0 and "$0.00005" in shown.stdout and "USD_MICROCENTS" not in shown.stdout
    assert re.search(r"tenant:acme\s+usd\s+ACTIVE", shown.stdout)
    assert _run(world, ["--ledger", "{ledger}", "budget", "freeze", "tenant:acme"]).returncode == 0
    listed = _run(world, ["budget", "list", "--tenant", "acme", "--json", "--ledger", "{ledger}"])
    assert '"status": "FROZEN"' in listed.stdout
    swept = _run(world, ["sweep", "--ledger", "{ledger}"])
    assert swept.returncode == 0 and swept.stdout == "expired 0 reservation(s)\n"
    key = _run(world, ["keys", "create", "--tenant", "acme", "--ledger", "{ledger}"])
    assert key.returncode == 0 and key.stdout.startswith("cyc_")
    deleted = _run(world, ["budget", "delete", "tenant:acme/workflow:w", "--unit", "tokens", "--ledger", "{ledger}"])
    assert deleted.returncode == 0 and re.search(r"tenant:acme/workflow:w\s+tokens", deleted.stdout)
    listed = _run(world, ["budget", "list", "--tenant", "acme", "--ledger", "{ledger}"])
    assert listed.returncode == 0 and "workflow:w" not in listed.stdout and "tenant:acme" in listed.stdout


def test_budget_delete_is_refused_while_reserved_and_forced_past_debt(world: World) -> None:
    from cycles import Action, BudgetInUse, CommitOveragePolicy, Subject

    with Cycles(world.ledger) as cy:
        cy.budgets.set("tenant:acme/workflow:w", tokens(1000), overdraft_limit=tokens(100))
        held = cy.reserve(
            Subject(tenant="acme", workflow="w"),
            Action("llm.completion", "openai:gpt-4o"),
            tokens(1000),
            overage_policy=CommitOveragePolicy.ALLOW_WITH_OVERDRAFT,
        ).reservation_id
    assert held
    before = _state(world)
    refused = _run(world, ["budget", "delete", "tenant:acme/workflow:w", "--ledger", "{ledger}"])
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.startswith(f"error: {BudgetInUse.code}: ") and refused.stderr.count("\n") == 1
    assert _state(world) == before
    with Cycles(world.ledger) as cy:
        cy.commit(held, tokens(1050))  # 50 over: debt
    in_debt = _run(world, ["budget", "delete", "tenant:acme/workflow:w", "--ledger", "{ledger}"])
    assert in_debt.returncode == 1 and in_debt.stderr.startswith("error: DEBT_OUTSTANDING: ")
    forced = _run(world, ["budget", "delete", "tenant:acme/workflow:w", "--force", "--ledger", "{ledger}"])
    assert forced.returncode == 0, forced.stderr
    with Cycles(world.ledger) as cy:
        assert [b.scope for b in cy.budgets.list(tenant="acme")] == ["tenant:acme"]


def test_the_default_ledger_is_the_per_user_file_and_cycles_url_overrides_it(world: World) -> None:
    assert _run(world, ["budget", "set", "tenant:me", "2"]).returncode == 0
    assert (Path(world.files["home"]) / "cycles" / "ledger.db").is_file()
    via_env = _run(world, ["budget", "list"], {"CYCLES_URL": world.ledger})
    assert "tenant:acme" in via_env.stdout and "tenant:me" not in via_env.stdout


def test_the_demo_leaves_the_users_ledger_alone(world: World) -> None:
    result = _run(world, ["demo", "--fast"])
    assert result.returncode == 0, result.stderr
    assert "Stopped by the demo's timer" in result.stdout and "stopped by      Cycles" in result.stdout
    assert "throw-away" in result.stdout
    assert list(Path(world.files["home"]).rglob("*")) == []  # no default ledger was created
    spent = re.search(r"without Cycles\s+\d+ calls\s+\$([\d,]+\.\d\d)", result.stdout)
    assert spent and 10 < float(spent.group(1).replace(",", "")) < 1000  # sane in --fast mode too
    assert all(int(n.replace(",", "")) <= 128_000 for n in re.findall(r"context ([\d,]+) tokens", result.stdout))


def test_serve_announces_its_real_port_and_the_admin_key_works_from_flag_and_environment(world: World) -> None:
    import json

    proc = subprocess.Popen(
        [
            CYCLES,
            "serve",
            "--port",
            "0",
            "--log-level",
            "warning",
            "--key-cache-ttl",
            "0",
            "--json",
            "--ledger",
            world.ledger,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**world.env, "CYCLES_ADMIN_KEY": "admin-secret"},
    )
    try:
        assert proc.stdout is not None
        announced = json.loads(proc.stdout.readline())
        url = announced["url"]
        assert announced["admin_api"] is True and not url.endswith(":0")
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert conn.recv(64).startswith(b"HTTP/1.1 200")
        over_http = ["--ledger", url]
        frozen = _run(world, ["budget", "freeze", "tenant:acme", *over_http, "--admin-key", "admin-secret"])
        assert frozen.returncode == 0, frozen.stderr
        shown = _run(world, ["budget", "show", "tenant:acme", *over_http], {"CYCLES_ADMIN_KEY": "admin-secret"})
        assert shown.returncode == 0 and re.search(r"tenant:acme\s+usd\s+FROZEN\s+\$50\.00", shown.stdout)
        admin = ["--admin-key", "admin-secret"]
        created = _run(world, ["keys", "create", "--tenant", "acme", "--name", "ci", *over_http, *admin])
        assert created.returncode == 0, created.stderr
        api_key = created.stdout.strip()
        seen = _run(world, ["balances", "--tenant", "acme", *over_http], {"CYCLES_API_KEY": api_key})
        assert seen.returncode == 0 and "tenant:acme" in seen.stdout, seen.stderr
        listed = _run(world, ["keys", "list", "--json", *over_http, *admin])
        (record,) = json.loads(listed.stdout)
        assert record["tenant"] == "acme" and record["status"] == "ACTIVE" and "api_key" not in record
        assert _run(world, ["keys", "revoke", record["key_id"], *over_http, *admin]).returncode == 0
        refused = _run(world, ["balances", "--tenant", "acme", *over_http, "--api-key", api_key])
        assert refused.returncode == 1 and refused.stderr.startswith("error: UNAUTHORIZED: ")
        wrong = _run(world, ["budget", "show", "tenant:acme", *over_http, "--admin-key", "nope"])
        assert wrong.returncode == 1 and wrong.stderr.startswith("error: UNAUTHORIZED: ")
        assert "Traceback" not in wrong.stderr and wrong.stderr.count("\n") == 1
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_json_is_honoured_by_every_command_that_prints(world: World) -> None:
    import json

    def as_json(*argv: str) -> Any:
        result = _run(world, [*argv, "--json"])
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    ledger = ("--ledger", "{ledger}")
    assert as_json("budget", "set", "tenant:acme", "2", *ledger)[0]["status"] == "ACTIVE"
    assert as_json("budget", "show", "tenant:acme", *ledger)[0]["scope"] == "tenant:acme"
    assert len(as_json("budget", "list", *ledger)) == 3
    assert as_json("balances", "--tenant", "acme", *ledger)
    assert as_json("reservations", *ledger) == []
    assert as_json("sweep", *ledger) == {"expired": 0}
    created = as_json("keys", "create", "--tenant", "acme", *ledger)
    assert created["api_key"].startswith("cyc_")
    (listed,) = as_json("keys", "list", *ledger)
    assert as_json("keys", "revoke", listed["key_id"], *ledger)["status"] == "REVOKED"
    assert as_json("quotas", "counters", "--tenant", "acme", *ledger) == []
    assert len(as_json("action-kinds")["kinds"]) == 62
    assert as_json("action-kinds", "code.exec")["risk_class"] == "high_risk"
    demo = as_json("demo", "--fast")
    assert demo["with_cycles"]["stopped_by"] == "budget" and demo["without_cycles"]["stopped_by"] == "timer"


def _on_a_terminal(world: World, argv: list[str], env: dict[str, str]) -> str:
    """Run with stdout on a pseudo-terminal, as in an interactive shell; what it drew."""
    import pty

    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            [CYCLES, *world.fill(argv)], stdout=follower, stderr=subprocess.DEVNULL, env={**world.env, **env}
        )
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(timeout=60) == 0
    finally:
        os.close(leader)
    return b"".join(chunks).decode()


def test_terminals_get_colours_unless_no_color_and_pipes_never_do(world: World) -> None:
    assert _run(world, ["budget", "freeze", "tenant:acme", "--ledger", "{ledger}"]).returncode == 0
    argv = ["budget", "list", "--ledger", "{ledger}"]
    coloured = _on_a_terminal(world, argv, {"NO_COLOR": "", "COLUMNS": "200", "TERM": "xterm-256color"})
    assert "FROZEN" in coloured and "\x1b[1;31m" in coloured  # a frozen budget stands out
    plain = _on_a_terminal(world, argv, {"NO_COLOR": "1", "COLUMNS": "200", "TERM": "xterm-256color"})
    assert "FROZEN" in plain and "\x1b[1;31m" not in plain and "\x1b[31m" not in plain
    piped = _run(world, argv, {"NO_COLOR": ""})
    assert "FROZEN" in piped.stdout and "\x1b" not in piped.stdout


def test_help_imports_neither_rich_nor_the_server_nor_a_driver() -> None:
    code = (
        "import sys\n"
        "from cycles.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('rich', 'cycles.server', 'redis', 'aiohttp', 'starlette') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_serve_says_at_once_when_its_ledger_is_not_answering(world: World) -> None:
    url = "redis://127.0.0.1:{closed_port}/0".format(**world.files)
    proc = subprocess.Popen(
        [CYCLES, "serve", "--port", "0", "--log-level", "error", "--ledger", url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=world.env,
    )
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        assert "is not answering" in first and "/readyz answers 503" in first
        assert "http://127.0.0.1:" in proc.stderr.readline()  # and it serves
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
