"""The gating proxy against a real upstream MCP server, over stdio and streamable HTTP."""

from __future__ import annotations

import sys
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp.shared.exceptions import MCPError
from mcp_types import ToolListChangedNotification

from cycles import Amount, Cycles, NotFound, ReservationStatus, Unit, risk_points, usd
from cycles.testing import assert_settled
from tests.mcp.conftest import UPSTREAM, Env

POLICY = """
tenant = "acme"
deny = ["drop_*"]
default_cost = { risk_points = 1 }
session_budget = [{ risk_points = 60 }, { usd = 0.50 }]

[tools."deploy*"]
cost = { risk_points = 50 }

[tools."search"]
cost = { usd = 0.01 }
"""


def _text(result: Any) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


def _session_scopes(cy: Cycles) -> set[str]:
    """The scopes of the sessions that reserved anything. A session's budget rows are deleted when
    it ends: none may be left behind."""
    assert not {b.scope for b in cy.budgets.list(tenant="acme") if "/workflow:" in b.scope}
    return {f"tenant:acme/workflow:{r.subject.workflow}" for r in _reservations(cy) if r.subject.workflow}


def _reservations(cy: Cycles) -> list[Any]:
    page = cy.list_reservations(tenant="acme", limit=200)
    assert not page.has_more
    return list(page.reservations)


def _balance(cy: Cycles, scope: str, unit: Unit) -> tuple[int, int]:
    """(spent, reserved): a budget's, or for an ended session's scope, summed from its reservations."""
    if "/workflow:" not in scope:
        b = cy.budgets.get(scope, unit=unit)
        assert b.spent is not None and b.reserved is not None
        return b.spent.amount, b.reserved.amount
    with pytest.raises(NotFound):  # the session ended: its budget row is gone
        cy.budgets.get(scope, unit=unit)
    mine = [r for r in _reservations(cy) if r.subject.workflow == scope.rsplit(":", 1)[1] and r.reserved.unit is unit]
    spent = sum(r.committed.amount for r in mine if r.status is ReservationStatus.COMMITTED and r.committed)
    return spent, sum(r.reserved.amount for r in mine if r.status is ReservationStatus.ACTIVE)


def _settled(cy: Cycles, session: str, spent: list[Amount] | Amount) -> None:
    assert_settled(cy, "tenant:acme")  # nothing left ACTIVE, every balance keeps the invariant
    for amount in spent if isinstance(spent, list) else [spent]:
        assert _balance(cy, session, amount.unit)[0] == amount.amount


async def test_the_client_sees_the_upstream_unchanged(env: Env) -> None:
    policy = env.policy(POLICY)
    direct = StdioServerParameters(
        command=env.upstream_command()[0], args=env.upstream_command()[1:], env=env.environ()
    )
    async with Client(direct, mode="legacy") as upstream, env.stdio_client(env.proxy_args(policy)) as proxied:
        assert (await proxied.list_tools()).model_dump() == (await upstream.list_tools()).model_dump()
        assert (await proxied.list_resources()).model_dump() == (await upstream.list_resources()).model_dump()
        assert (await proxied.list_prompts()).model_dump() == (await upstream.list_prompts()).model_dump()
        prompt = await proxied.get_prompt("deploy_prompt", {"service": "api"})
        assert prompt.model_dump() == (await upstream.get_prompt("deploy_prompt", {"service": "api"})).model_dump()
        resource = await proxied.read_resource("docs://readme")
        assert resource.model_dump() == (await upstream.read_resource("docs://readme")).model_dump()
        assert proxied.server_info is not None and upstream.server_info is not None
        assert (proxied.server_info.name, proxied.server_info.version) == ("upstream-demo", "1.2.3")
        assert proxied.instructions == upstream.instructions
        assert proxied.server_capabilities.tools is not None
        allowed = await proxied.call_tool("deploy", {"service": "api"})
        assert not allowed.is_error and _text(allowed) == "deployed api"


async def test_deny_list_never_reaches_the_upstream(env: Env) -> None:
    async with env.stdio_client(env.proxy_args(env.policy(POLICY))) as client:
        refused = await client.call_tool("drop_table", {"table": "users"})
        ok = await client.call_tool("deploy", {"service": "web"})
    assert refused.is_error
    assert "drop_table" in _text(refused) and "drop_*" in _text(refused) and "not run" in _text(refused)
    assert not ok.is_error
    assert [c["tool"] for c in env.upstream_calls()] == ["deploy"]


async def test_cost_per_glob_is_charged_to_the_session_and_the_tenant(env: Env) -> None:
    with Cycles(env.ledger) as cy:
        cy.budgets.set("tenant:acme", usd(1))
        cy.budgets.set("tenant:acme", risk_points(1000))
    async with env.stdio_client(env.proxy_args(env.policy(POLICY))) as client:
        for _ in range(3):
            assert not (await client.call_tool("search", {"query": "q"})).is_error
        assert not (await client.call_tool("deploy", {"service": "web"})).is_error
        assert (await client.call_tool("fail", {"reason": "x"})).is_error  # default cost, released: it failed
    with Cycles(env.ledger) as cy:
        (session,) = _session_scopes(cy)
        assert _balance(cy, "tenant:acme", Unit.USD_MICROCENTS) == (usd(0.03).amount, 0)
        assert _balance(cy, session, Unit.USD_MICROCENTS) == (usd(0.03).amount, 0)
        assert _balance(cy, "tenant:acme", Unit.RISK_POINTS) == (50, 0)  # fail's 1 point was released
        assert _balance(cy, session, Unit.RISK_POINTS) == (50, 0)
        _settled(cy, session, [usd(0.03), risk_points(50)])


async def test_session_budget_exhausted_mid_session(env: Env) -> None:
    async with env.stdio_client(env.proxy_args(env.policy(POLICY))) as client:
        first = await client.call_tool("deploy", {"service": "api"})
        second = await client.call_tool("deploy", {"service": "api"})
        still = await client.call_tool("search", {"query": "status"})  # usd budget untouched: still allowed
    assert not first.is_error
    assert second.is_error
    text = _text(second)
    assert "session's budget" in text and "10 risk points left" in text and "deploy" in text
    assert "Do not retry" in text
    assert not still.is_error
    assert [c["tool"] for c in env.upstream_calls()] == ["deploy", "search"]
    with Cycles(env.ledger) as cy:
        (session,) = _session_scopes(cy)
        assert _balance(cy, session, Unit.RISK_POINTS) == (50, 0)
        run_id = session.rsplit(":", 1)[1]  # the session is one core run: its id is the workflow level
        for reservation in cy.list_reservations(tenant="acme").reservations:
            assert reservation.subject.workflow == run_id
            assert reservation.subject.dimensions == {"run_id": run_id}
        _settled(cy, session, [risk_points(50), usd(0.01)])


async def test_upstream_tool_error_is_passed_through_and_released(env: Env) -> None:
    async with env.stdio_client(env.proxy_args(env.policy(POLICY))) as client:
        result = await client.call_tool("fail", {"reason": "disk full"})
    assert result.is_error and "upstream failure: disk full" in _text(result)
    assert [c["tool"] for c in env.upstream_calls()] == ["fail"]
    with Cycles(env.ledger) as cy:
        (session,) = _session_scopes(cy)
        assert _balance(cy, session, Unit.RISK_POINTS) == (0, 0)
        (reservation,) = cy.list_reservations(workflow=session.rsplit(":", 1)[1], tenant="acme").reservations
        assert reservation.status is ReservationStatus.RELEASED


async def test_upstream_crash_mid_call_releases_and_reports_an_error(env: Env) -> None:
    async with env.stdio_client(env.proxy_args(env.policy(POLICY))) as client:
        with pytest.raises(MCPError):
            await client.call_tool("crash", {})
    with Cycles(env.ledger) as cy:
        (session,) = _session_scopes(cy)
        assert _balance(cy, session, Unit.RISK_POINTS) == (0, 0)
        assert all(r.status is ReservationStatus.RELEASED for r in cy.list_reservations(tenant="acme").reservations)
        _settled(cy, session, risk_points(0))


async def test_concurrent_http_sessions_have_their_own_budgets_and_share_the_tenant(env: Env) -> None:
    """Three sessions fire two deploys each at once. Each session may afford one (60 per session),
    the tenant only two in all (120): exactly two run, never two in one session."""
    with Cycles(env.ledger) as cy:
        cy.budgets.set("tenant:acme", risk_points(120))
    policy = env.policy(POLICY)
    outcomes: dict[int, list[bool]] = {0: [], 1: [], 2: []}
    texts: list[str] = []
    with env.http_server(env.proxy_args(policy)) as url:

        async def session(n: int) -> None:
            async with Client(url, mode="legacy") as client, anyio.create_task_group() as tg:

                async def deploy() -> None:
                    result = await client.call_tool("deploy", {"service": f"s{n}"})
                    outcomes[n].append(not result.is_error)
                    if result.is_error:
                        texts.append(_text(result))

                tg.start_soon(deploy)
                tg.start_soon(deploy)

        async with anyio.create_task_group() as tg:
            for n in range(3):
                tg.start_soon(session, n)
    ran = [sum(v) for v in outcomes.values()]
    assert sum(ran) == 2 and max(ran) == 1
    assert len(env.upstream_calls()) == 2
    assert any("tenant:acme has" in t for t in texts)  # the shared tenant budget refused at least one
    with Cycles(env.ledger) as cy:
        assert _balance(cy, "tenant:acme", Unit.RISK_POINTS) == (100, 0)
        sessions = _session_scopes(cy)  # no session left its budget rows behind
        assert len(sessions) == 2  # two deploys ran, from two sessions
        for scope in sessions:  # each session spent at most one deploy
            assert _balance(cy, scope, Unit.RISK_POINTS)[0] in (0, 50)
        assert_settled(cy, "tenant:acme", risk_points(100))


async def test_shadow_mode_forwards_everything_and_records_would_deny(env: Env) -> None:
    policy = env.policy(POLICY)
    with env.http_server(env.proxy_args(policy, "--shadow")) as url:
        async with Client(url, mode="legacy") as client:
            results = [
                await client.call_tool("drop_table", {"table": "t"}),
                await client.call_tool("deploy", {"service": "a"}),
                await client.call_tool("deploy", {"service": "b"}),
            ]
    assert not any(r.is_error for r in results)
    assert [c["tool"] for c in env.upstream_calls()] == ["drop_table", "deploy", "deploy"]
    logged = "".join(env.server_stderr)
    assert "would deny drop_table" in logged
    assert "would deny unknown.call deploy" in logged  # no spec prefix: unknown.call


async def test_ledger_errors_fail_closed_unless_fail_open(env: Env) -> None:
    env.ledger = "redis://127.0.0.1:1/0"  # nothing listens there
    policy = env.policy(POLICY)
    async with env.stdio_client(env.proxy_args(policy)) as client:
        refused = await client.call_tool("deploy", {"service": "a"})
    assert refused.is_error and "could not check the budget" in _text(refused) and "fails closed" in _text(refused)
    assert env.upstream_calls() == []
    async with env.stdio_client(env.proxy_args(policy, "--fail-open")) as client:
        forwarded = await client.call_tool("deploy", {"service": "a"})
    assert not forwarded.is_error
    assert [c["tool"] for c in env.upstream_calls()] == ["deploy"]


async def test_a_call_cancelled_in_flight_is_committed_not_released(env: Env) -> None:
    """The client gives up on a call the upstream already started: it may have had its effect, so
    the core's rule commits it (a begun step is never released)."""
    async with env.stdio_client(env.proxy_args(env.policy(POLICY))) as client:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:

                async def cancel_once_started() -> None:
                    while not env.upstream_calls():  # readiness probe: the upstream logged the call
                        await anyio.sleep(0.05)
                    scope.cancel()

                tg.start_soon(cancel_once_started)
                await client.call_tool("slow", {"seconds": 60})
        assert scope.cancelled_caught
        ok = await client.call_tool("deploy", {"service": "after"})  # the session goes on
        assert not ok.is_error
    with Cycles(env.ledger) as cy:
        statuses = {r.action.name: r.status for r in cy.list_reservations(tenant="acme").reservations}
        assert statuses == {"slow": ReservationStatus.COMMITTED, "deploy": ReservationStatus.COMMITTED}
        (session,) = _session_scopes(cy)
        assert _balance(cy, session, Unit.RISK_POINTS) == (51, 0)
        _settled(cy, session, risk_points(51))


async def test_streamable_http_upstream(env: Env) -> None:
    """--upstream-url: the upstream is a streamable-HTTP server; the client still talks stdio."""
    policy = env.policy(POLICY)
    with env.http_server([str(UPSTREAM)]) as upstream_url:
        args = ["-m", "cycles_mcp.cli", "proxy", "--policy", str(policy), "--upstream-url", upstream_url]
        async with env.stdio_client(args) as client:
            names = [t.name for t in (await client.list_tools()).tools]
            first = await client.call_tool("deploy", {"service": "api"})
            second = await client.call_tool("deploy", {"service": "api"})
    assert "deploy" in names and "drop_table" in names
    assert not first.is_error and second.is_error and "10 risk points left" in _text(second)
    assert [c["tool"] for c in env.upstream_calls()] == ["deploy"]


async def test_a_2026_protocol_client_is_gated_too(env: Env) -> None:
    """A client that opens with the 2026-07-28 protocol (no handshake, no session): its stdio
    connection to the proxy is one run, and its per-request envelope is not passed upstream."""
    async with env.stdio_client(env.proxy_args(env.policy(POLICY)), mode="auto") as client:
        assert client.protocol_version == "2026-07-28"
        names = [t.name for t in (await client.list_tools()).tools]
        first = await client.call_tool("deploy", {"service": "api"})
        second = await client.call_tool("deploy", {"service": "api"})
    assert "deploy" in names
    assert not first.is_error and second.is_error and "10 risk points left" in _text(second)
    assert [c["tool"] for c in env.upstream_calls()] == ["deploy"]


async def test_upstream_list_changed_notifications_reach_the_client(env: Env) -> None:
    changed = anyio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, ToolListChangedNotification):
            changed.set()

    params = StdioServerParameters(command=sys.executable, args=env.proxy_args(env.policy(POLICY)), env=env.environ())
    async with Client(params, mode="legacy", message_handler=on_message) as client:
        before = {t.name for t in (await client.list_tools()).tools}
        grown = await client.call_tool("grow", {"name": "brand_new"})
        with anyio.fail_after(30):  # a bound on a hang, not a timing assertion
            await changed.wait()
        after = {t.name for t in (await client.list_tools(cache_mode="refresh")).tools}
        used = await client.call_tool("brand_new", {"text": "hi"})  # gated by default_cost like any tool
    assert not grown.is_error and "brand_new" not in before and after == before | {"brand_new"}
    assert not used.is_error and _text(used) == "brand_new: hi"


async def test_upstream_progress_reaches_the_client_that_asked(env: Env) -> None:
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with env.stdio_client(env.proxy_args(env.policy(POLICY))) as client:
        result = await client.call_tool("steps", {"n": 3}, progress_callback=on_progress)
    assert not result.is_error and _text(result) == "3 steps"
    assert seen == [(1, 3, "step 1"), (2, 3, "step 2"), (3, 3, "step 3")]
