"""``cycles-mcp hook``: Claude Code's hook commands, each its own process, tied together by the ledger."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from cycles import Cycles, NotFound, ReservationStatus, Unit, risk_points
from cycles.testing import assert_ledger_invariant
from cycles_mcp.hook import session_run_id
from tests.mcp.conftest import Env

POLICY = """
tenant = "acme"
deny = ["mcp__db__drop_*"]
default_cost = { risk_points = 1 }
session_budget = { risk_points = 60 }

[tools."Bash"]
cost = { risk_points = 50 }

[tools."Read"]
gate = false
"""
SESSION = "3f1c9a2e-7b7d-4c1e-9a55-0d2b1f6c8e11"


def hook(env: Env, event: str, **payload: Any) -> subprocess.CompletedProcess[str]:
    data = {"session_id": SESSION, "transcript_path": "/tmp/t.jsonl", "cwd": str(env.tmp), **payload}
    return subprocess.run(
        [sys.executable, "-m", "cycles_mcp.cli", "hook", event, "--policy", str(env.tmp / "policy.toml")],
        input=json.dumps(data),
        capture_output=True,
        text=True,
        env=env.environ(),
        timeout=120,
        check=False,
    )


def pre(env: Env, tool: str, tool_use_id: str) -> dict[str, Any] | None:
    done = hook(env, "pre", hook_event_name="PreToolUse", tool_name=tool, tool_input={}, tool_use_id=tool_use_id)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout) if done.stdout.strip() else None


def test_pre_post_failure_and_session_end(env: Env) -> None:
    env.policy(POLICY)
    scope = f"tenant:acme/workflow:{session_run_id(SESSION)}"
    assert hook(env, "session-start", hook_event_name="SessionStart", source="startup").returncode == 0

    assert pre(env, "Bash", "toolu_1") is None  # allowed: nothing printed, Claude Code's own rules still apply
    post = {"hook_event_name": "PostToolUse", "tool_name": "Bash", "tool_input": {}, "tool_response": {"stdout": "ok"}}
    done = hook(env, "post", tool_use_id="toolu_1", **post)
    assert done.returncode == 0, done.stderr

    refusal = pre(env, "Bash", "toolu_2")  # 50 of 60 spent: the second Bash is refused
    assert refusal is not None
    out = refusal["hookSpecificOutput"]
    assert out["hookEventName"] == "PreToolUse" and out["permissionDecision"] == "deny"
    assert "10 risk points left" in out["permissionDecisionReason"]

    denied = pre(env, "mcp__db__drop_table", "toolu_3")
    assert denied is not None and "mcp__db__drop_*" in denied["hookSpecificOutput"]["permissionDecisionReason"]
    assert pre(env, "Read", "toolu_4") is None  # ungated

    assert pre(env, "Edit", "toolu_5") is None  # default cost 1, then it fails: released
    failure = {"hook_event_name": "PostToolUseFailure", "tool_name": "Edit", "tool_input": {}, "error": "no such file"}
    failed = hook(env, "failure", tool_use_id="toolu_5", **failure)
    assert failed.returncode == 0, failed.stderr
    assert pre(env, "Write", "toolu_6") is None  # never reported back: the session end releases it

    with Cycles(env.ledger) as cy:
        balance = cy.budgets.get(scope, unit=Unit.RISK_POINTS)
        assert balance.spent == risk_points(50) and balance.reserved == risk_points(1)
    assert hook(env, "session-end", hook_event_name="SessionEnd", reason="logout").returncode == 0
    with Cycles(env.ledger) as cy:
        with pytest.raises(NotFound):  # the session's budget row is deleted when it ends
            cy.budgets.get(scope)
        statuses = sorted(r.status.value for r in cy.list_reservations(tenant="acme", limit=50).reservations)
        assert statuses == ["COMMITTED", "RELEASED", "RELEASED"]
        committed = [r.committed for r in cy.list_reservations(tenant="acme", limit=50).reservations if r.committed]
        assert committed == [risk_points(50)]
        assert all(r.status is not ReservationStatus.ACTIVE for r in cy.list_reservations(tenant="acme").reservations)
        assert_ledger_invariant(cy)


def test_post_is_idempotent_per_tool_use_id(env: Env) -> None:
    env.policy(POLICY)
    assert pre(env, "Bash", "toolu_9") is None
    for _ in range(2):  # a retried PostToolUse hook commits once
        done = hook(env, "post", hook_event_name="PostToolUse", tool_name="Bash", tool_input={}, tool_use_id="toolu_9")
        assert done.returncode == 0, done.stderr
    with Cycles(env.ledger) as cy:
        scope = f"tenant:acme/workflow:{session_run_id(SESSION)}"
        assert cy.budgets.get(scope, unit=Unit.RISK_POINTS).spent == risk_points(50)


def test_bad_hook_input_is_a_one_line_error_that_blocks(env: Env) -> None:
    env.policy(POLICY)
    done = subprocess.run(
        [sys.executable, "-m", "cycles_mcp.cli", "hook", "pre", "--policy", str(env.tmp / "policy.toml")],
        input="not json",
        capture_output=True,
        text=True,
        env=env.environ(),
        timeout=60,
        check=False,
    )
    assert done.returncode == 2  # Claude Code blocks the tool on exit code 2 and shows stderr
    assert done.stderr.startswith("error: INVALID_REQUEST: hook input is not JSON")
    assert len(done.stderr.strip().splitlines()) == 1
