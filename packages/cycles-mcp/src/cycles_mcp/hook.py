"""``cycles-mcp hook EVENT --policy POLICY.toml``: the proxy's policy enforced from Claude Code hooks,
so built-in tools (Bash, Write, ...) are gated as well as MCP tools (named ``mcp__server__tool``).

Each hook is its own process; the ledger ties them together. The tool-use id is the idempotency
key, so ``post`` and ``failure`` find the reservation ``pre`` made by replaying the same reserve,
then the core guard settles it. The Claude Code session is the run (``workflow=cc-<session id>``).

=============  =====================  ==================================================================
event          Claude Code hook       what it does
=============  =====================  ==================================================================
pre            PreToolUse             reserve; a refusal denies the tool with the reason (nothing printed
                                      when allowed, so Claude Code's own permission rules still apply)
post           PostToolUse            commit the reservation (the tool ran)
failure        PostToolUseFailure     release it (the tool failed)
session-start  SessionStart           set the session budgets
session-end    SessionEnd             release what no post/failure hook reported, close the session budgets
=============  =====================  ==================================================================
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

import anyio

from cycles import AsyncCycles, CyclesError, InvalidRequest
from cycles.models import ReservationStatus
from cycles_mcp.gate import Gate
from cycles_mcp.policy import Policy
from cycles_mcp.session import SessionRun

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


async def _handle(event: str, gate: Gate, run: SessionRun, data: dict[str, Any]) -> tuple[str, int]:
    if event == "session-start":
        await run.start()
        return "", 0
    if event == "session-end":
        await _release_unreported(gate.cycles, run)
        run.started = True  # the budgets exist from earlier hooks: close them
        await run.end()
        return "", 0
    tool = _field(data, "tool_name")
    key = "cc:" + _field(data, "tool_use_id")
    admission = await gate.admit(run, tool, idempotency_key=key)
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
    await gate.settle(admission, ran=event == "post")
    return "", 0


async def _release_unreported(cycles: AsyncCycles, run: SessionRun) -> None:
    """Reservations of this session that no post/failure hook reported: the tool never completed
    (permission refused, session interrupted), so they are released."""
    levels = run.subject.model_dump(exclude_none=True, exclude={"dimensions"})
    cursor: str | None = None
    while True:
        page = await cycles.list_reservations(status=ReservationStatus.ACTIVE, limit=200, cursor=cursor, **levels)
        for item in page.reservations:
            with contextlib.suppress(CyclesError):  # settled or expired meanwhile: nothing is held
                await cycles.release(
                    item.reservation_id,
                    reason="Claude Code session ended before the tool reported back",
                    idempotency_key=f"{item.reservation_id}:session-end",
                )
        cursor = page.next_cursor
        if not cursor:
            return
