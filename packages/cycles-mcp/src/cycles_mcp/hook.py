"""``cycles-mcp hook EVENT --policy POLICY.toml``: the proxy's policy enforced from Claude Code hooks,
so built-in tools (Bash, Write, ...) are gated as well as MCP tools (named ``mcp__server__tool``).

Each hook is its own process; the ledger ties them together. The Claude Code session is one core
run (``workflow=cc-<session id>``). The tool-use id is the idempotency key: ``pre`` reserves the
call as a step of the run, ahead of the action; ``post`` and ``failure`` find that reservation by
replaying the same reserve and end the step through the core guard (commit / release).

=============  =====================  ==================================================================
event          Claude Code hook       what it does
=============  =====================  ==================================================================
pre            PreToolUse             reserve; a refusal denies the tool with the reason (nothing printed
                                      when allowed, so Claude Code's own permission rules still apply)
post           PostToolUse            commit the reservation (the tool ran)
failure        PostToolUseFailure     release it (the tool failed)
session-start  SessionStart           set the session budgets
session-end    SessionEnd             end the run: steps no post/failure hook reported never began, so
                                      the core releases them; the session budgets are closed
=============  =====================  ==================================================================
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

import anyio

from cycles import AsyncCycles, AsyncRun, CyclesError, InvalidRequest
from cycles.models import ReservationStatus
from cycles_mcp.gate import Gate
from cycles_mcp.policy import Policy

__all__ = ["HOOK_TTL_MS", "run_hook", "session_run_id"]

HOOK_TTL_MS = 600_000  #: a hook cannot heartbeat: reservations last 10 min unless the policy says otherwise
_EVENTS = {
    "pre": "PreToolUse",
    "post": "PostToolUse",
    "failure": "PostToolUseFailure",
    "session-start": "SessionStart",
    "session-end": "SessionEnd",
}


def session_run_id(session_id: str) -> str:
    """``cc-<session id>``, restricted to the characters a scope id allows."""
    clean = re.sub(r"[^A-Za-z0-9_.-]", "-", session_id)[:120]
    return f"cc-{clean}"


def _field(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"hook input has no {name} (is this command configured as a Claude Code hook?)")
    return value


def _parse(stdin: str) -> dict[str, Any]:
    try:
        data = json.loads(stdin)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"hook input is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("hook input must be a JSON object")
    return data


def run_hook(event: str, policy: Policy, stdin: str, *, ledger: str | None = None) -> tuple[str, int]:
    """Handle one hook event; returns (stdout, exit code)."""
    if event not in _EVENTS:
        raise InvalidRequest(f"unknown hook event {event!r} (known: {', '.join(_EVENTS)})")
    data = _parse(stdin)
    result: tuple[str, int] = ("", 0)

    async def main() -> None:
        nonlocal result
        async with AsyncCycles(ledger or policy.ledger) as cycles:
            gate = Gate(policy, cycles, ttl_ms=HOOK_TTL_MS, heartbeat=False)
            run = gate.new_run(session_run_id(_field(data, "session_id")))
            result = await _handle(event, gate, run, data)

    anyio.run(main)
    return result


async def _handle(event: str, gate: Gate, run: AsyncRun, data: dict[str, Any]) -> tuple[str, int]:
    if event == "session-start":
        await gate.start_run(run)
        return "", 0
    if event == "session-end":
        await _end_session(gate, run)
        return "", 0
    tool = _field(data, "tool_name")
    key = "cc:" + _field(data, "tool_use_id")
    admission = await gate.admit(run, tool, data.get("tool_input"), idempotency_key=key)
    if event == "pre":
        if admission.allowed:
            return "", 0
        output = {
            "hookSpecificOutput": {
                "hookEventName": "PreToolUse",
                "permissionDecision": "deny",
                "permissionDecisionReason": admission.refusal,
            }
        }
        return json.dumps(output), 0
    # post / failure: the replayed reserve returned the reservation pre made; the guard settles it
    error = None if event == "post" else HookReportedFailure(str(data.get("error") or "the tool failed"))
    await gate.settle(admission, ran=event == "post", error=error)
    return "", 0


class HookReportedFailure(Exception):
    """PostToolUseFailure: Claude Code reported that the tool failed."""


async def _end_session(gate: Gate, run: AsyncRun) -> None:
    """End the session's run. Its steps still open were reserved by ``pre`` hooks that no ``post``
    or ``failure`` hook reported (permission refused, session interrupted): each is taken back into
    this process's run by replaying its reserve, and the core's rule releases it (never begun)."""
    await gate.start_run(run)
    levels = run.subject.model_dump(exclude_none=True, exclude={"dimensions"})
    cursor: str | None = None
    while True:
        page = await gate.cycles.list_reservations(status=ReservationStatus.ACTIVE, limit=200, cursor=cursor, **levels)
        for item in page.reservations:
            key = item.idempotency_key or ""
            if not key.endswith(":reserve"):
                continue  # not a step of this gate's (reserved some other way): not ours to settle
            guard = gate.step(run, item.action, item.reserved, key.removesuffix(":reserve"))
            with contextlib.suppress(CyclesError):  # settled or expired meanwhile: nothing is held
                await guard.start(begin=False)
        cursor = page.next_cursor
        if not cursor:
            break
    await gate.end_run(run)
