"""What the upstream asks of the client (sampling, elicitation, roots), through the real proxy over
stdio and streamable HTTP; a sampling request is gated by the policy's ``[sampling]`` cost."""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio
import mcp_types as types
from mcp import Client
from mcp.client.session import ClientRequestContext

from cycles import Cycles, ReservationStatus, tokens
from cycles.testing import assert_settled
from cycles_mcp.proxy import connect_upstream
from tests.mcp.conftest import ASKING, Env

POLICY = """
tenant = "acme"
default_cost = { risk_points = 1 }
session_budget = [{ risk_points = 60 }, { tokens = 1000 }]

[sampling]
cost = { tokens = 500 }
"""

EVERYTHING = {"sampling": {}, "elicitation": {"form": {}, "url": {}}, "roots": {"listChanged": True}}


def _text(result: Any) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


class FakeClient:
    """What a real MCP client answers when the server asks: its model, its user, its roots."""

    def __init__(self, usage: dict[str, int] | None = None, refuse_sampling: bool = False) -> None:
        self.prompts: list[str] = []
        self.usage = usage
        self.refuse_sampling = refuse_sampling

    async def sampling(
        self, context: ClientRequestContext, params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResult | types.ErrorData:
        content = params.messages[0].content
        prompt = content.text if isinstance(content, types.TextContent) else ""
        self.prompts.append(prompt)
        if self.refuse_sampling:
            return types.ErrorData(code=-1, message="the user declined the sampling request")
        meta = {"usage": self.usage} if self.usage is not None else None
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(text=f"echo {prompt}"), model="test-model", _meta=meta
        )

    async def elicitation(
        self, context: ClientRequestContext, params: types.ElicitRequestParams
    ) -> types.ElicitResult | types.ErrorData:
        return types.ElicitResult(action="accept", content={"approve": True, "reason": params.message})

    async def roots(self, context: ClientRequestContext) -> types.ListRootsResult | types.ErrorData:
        return types.ListRootsResult(roots=[types.Root(uri="file:///work/repo", name="repo")])

    def callbacks(self, *which: str) -> dict[str, Any]:
        every = {
            "sampling": ("sampling_callback", self.sampling),
            "elicitation": ("elicitation_callback", self.elicitation),
            "roots": ("list_roots_callback", self.roots),
        }
        return dict(every[w] for w in (which or every))


def _sampling_reservations(cy: Cycles) -> list[Any]:
    page = cy.list_reservations(tenant="acme", limit=200)
    return [r for r in page.reservations if r.action.name == "sampling/createMessage"]


async def test_sampling_elicitation_and_roots_reach_the_client_and_sampling_is_charged(env: Env) -> None:
    env.upstream = ASKING
    client = FakeClient(usage={"inputTokens": 120, "outputTokens": 30})
    async with env.stdio_client(env.proxy_args(env.policy(POLICY)), callbacks=client.callbacks()) as session:
        caps = json.loads(_text(await session.call_tool("client_caps", {})))
        sampled = await session.call_tool("ask_model", {"prompt": "summarize the logs"})
        elicited = await session.call_tool("ask_user", {"action": "deploy"})
        roots = await session.call_tool("my_roots", {})
    assert caps == EVERYTHING  # exactly what this client declared
    assert not sampled.is_error and _text(sampled) == "test-model says: echo summarize the logs"
    assert client.prompts == ["summarize the logs"]
    assert json.loads(_text(elicited)) == {"action": "accept", "data": {"approve": True, "reason": "Approve deploy?"}}
    assert json.loads(_text(roots)) == ["file:///work/repo"]
    with Cycles(env.ledger) as cy:
        (step,) = _sampling_reservations(cy)
        assert step.status is ReservationStatus.COMMITTED and step.action.kind == "llm.completion"
        assert step.committed == tokens(150)  # the actual the client reported, not the 500 reserved
        assert_settled(cy, "tenant:acme")
        workflow = step.subject.workflow
        charged = [r for r in cy.list_reservations(tenant="acme").reservations if r.subject.workflow == workflow]
        assert len(charged) == 5  # the session's run: four tool calls and the sampling request


async def test_a_refused_sampling_request_never_reaches_the_client(env: Env) -> None:
    """The session's 600 tokens hold one 500-token sampling request; after it commits 150, the
    second does not fit: the upstream gets an MCP error saying so and the client's model is not asked."""
    env.upstream = ASKING
    client = FakeClient(usage={"inputTokens": 100, "outputTokens": 50})
    policy = env.policy(POLICY.replace("{ tokens = 1000 }", "{ tokens = 600 }"))
    async with env.stdio_client(env.proxy_args(policy), callbacks=client.callbacks("sampling")) as session:
        first = await session.call_tool("ask_model", {"prompt": "one"})
        second = await session.call_tool("ask_model", {"prompt": "two"})
    assert _text(first) == "test-model says: echo one"
    assert _text(second).startswith("sampling failed: -1: Cycles refused the tool call 'sampling/createMessage'")
    assert "450 tokens left" in _text(second)
    assert client.prompts == ["one"]
    with Cycles(env.ledger) as cy:
        (step,) = _sampling_reservations(cy)
        assert step.committed == tokens(150)
        assert_settled(cy, "tenant:acme")


async def test_the_clients_error_comes_back_to_the_upstream_and_the_sampling_step_is_released(env: Env) -> None:
    env.upstream = ASKING
    client = FakeClient(refuse_sampling=True)
    async with env.stdio_client(env.proxy_args(env.policy(POLICY)), callbacks=client.callbacks()) as session:
        result = await session.call_tool("ask_model", {"prompt": "please"})
    assert _text(result) == "sampling failed: -1: the user declined the sampling request"
    with Cycles(env.ledger) as cy:
        (step,) = _sampling_reservations(cy)
        assert step.status is ReservationStatus.RELEASED
        assert_settled(cy, "tenant:acme")


async def test_the_upstream_is_told_only_what_the_client_can_do(env: Env) -> None:
    """A client without sampling: the upstream sees no sampling capability, its sampling request
    fails cleanly and nothing is reserved for it. A client that declares nothing to relay shares
    the proxy's upstream session, which declares nothing either."""
    env.upstream = ASKING
    client = FakeClient()
    policy = env.policy(POLICY)
    async with env.stdio_client(env.proxy_args(policy), callbacks=client.callbacks("elicitation")) as session:
        caps = json.loads(_text(await session.call_tool("client_caps", {})))
        sampled = await session.call_tool("ask_model", {"prompt": "hi"})
        roots = await session.call_tool("my_roots", {})
    assert caps == {"elicitation": EVERYTHING["elicitation"]}
    assert _text(sampled).startswith("sampling failed: ") and "not supported" in _text(sampled).lower()
    assert _text(roots).startswith("roots failed: ")
    assert client.prompts == []
    async with env.stdio_client(env.proxy_args(policy)) as bare:
        assert json.loads(_text(await bare.call_tool("client_caps", {}))) == {}
    with Cycles(env.ledger) as cy:
        assert _sampling_reservations(cy) == []
        assert_settled(cy, "tenant:acme")


async def test_relayed_over_streamable_http_per_session_with_roots_changes(env: Env) -> None:
    """Two HTTP sessions at once, each with its own client: each one's requests come back to it
    (on its own request's stream), and a client's roots/list_changed reaches the upstream, whose
    roots/list in answer reaches that client on its session's own channel."""
    env.upstream = ASKING
    clients = [FakeClient(usage={"inputTokens": 10, "outputTokens": 5}) for _ in range(2)]
    texts: dict[int, list[str]] = {}
    with env.http_server(env.proxy_args(env.policy(POLICY))) as url:

        async def session(n: int) -> None:
            async with Client(url, mode="legacy", **clients[n].callbacks()) as s:
                texts[n] = [
                    _text(await s.call_tool("ask_model", {"prompt": f"from {n}"})),
                    _text(await s.call_tool("ask_user", {"action": f"job {n}"})),
                ]
                if n == 0:
                    await s.session.send_notification(types.RootsListChangedNotification())
                    with anyio.fail_after(30):  # a bound on a hang, not a timing assertion
                        while not any(c["tool"] == "roots_now" for c in env.upstream_calls()):
                            await anyio.sleep(0.05)

        async with anyio.create_task_group() as tg:
            for n in range(2):
                tg.start_soon(session, n)
    for n in range(2):
        assert clients[n].prompts == [f"from {n}"]
        assert texts[n][0] == f"test-model says: echo from {n}"
        assert json.loads(texts[n][1])["data"]["reason"] == f"Approve job {n}?"
    assert [c["tool"] for c in env.upstream_calls()].count("roots_list_changed") == 1
    # asked outside any request of the client's: relayed on the session's own channel
    assert [c["args"] for c in env.upstream_calls() if c["tool"] == "roots_now"] == [{"uris": ["file:///work/repo"]}]
    with Cycles(env.ledger) as cy:
        steps = _sampling_reservations(cy)
        assert sorted(s.committed.amount for s in steps if s.committed) == [15, 15]
        assert len({s.subject.workflow for s in steps}) == 2  # each charged to its own session's run
        assert_settled(cy, "tenant:acme")


async def test_a_client_that_gives_up_while_its_model_is_asked_leaves_nothing_hanging(env: Env) -> None:
    """The client cancels its call while the upstream waits for the client's model: the cancel
    travels up (the upstream's tool and its sampling request are cancelled), the sampling step,
    begun, is committed by the core's rule (never released once begun), and the proxy serves on."""
    env.upstream = ASKING
    asked = anyio.Event()

    async def sampling(context: ClientRequestContext, params: types.CreateMessageRequestParams) -> Any:
        asked.set()
        await anyio.sleep_forever()

    with env.http_server(env.proxy_args(env.policy(POLICY))) as url:
        async with Client(url, mode="legacy", sampling_callback=sampling) as leaving, anyio.create_task_group() as tg:

            async def call() -> None:
                await leaving.call_tool("ask_model", {"prompt": "never answered"})

            tg.start_soon(call)
            await asked.wait()
            tg.cancel_scope.cancel()
        with Cycles(env.ledger) as cy, anyio.fail_after(60):  # a bound on a hang, not a timing assertion
            while any(r.status is ReservationStatus.ACTIVE for r in cy.list_reservations(tenant="acme").reservations):
                await anyio.sleep(0.1)
        async with Client(url, mode="legacy") as staying:
            assert _text(await staying.call_tool("client_caps", {})) == "{}"
    assert [c["tool"] for c in env.upstream_calls()] == ["ask_model", "client_caps"]  # never answered
    with Cycles(env.ledger) as cy:
        assert_settled(cy, "tenant:acme")
        assert not [b for b in cy.budgets.list(tenant="acme") if "/workflow:" in b.scope]  # both runs ended
        (step,) = _sampling_reservations(cy)
        assert step.status is ReservationStatus.COMMITTED and step.committed == tokens(500)


async def test_the_ad_is_the_clients_own_down_to_sub_capabilities(env: Env) -> None:
    """A client that can do form elicitation only, and roots without change notifications: the
    upstream is told exactly that (the SDK alone would claim URL elicitation and roots changes too)."""
    env.upstream = ASKING
    declared = types.ClientCapabilities(
        elicitation=types.ElicitationCapability(form=types.FormElicitationCapability()), roots=types.RootsCapability()
    )
    client = FakeClient()
    command = [sys.executable, *env.proxy_args(env.policy(POLICY))]
    async with connect_upstream(
        command, env=env.environ(), advertise=declared, **client.callbacks("elicitation", "roots")
    ) as session:
        caps = json.loads(_text(await session.call_tool("client_caps", {})))
        elicited = json.loads(_text(await session.call_tool("ask_user", {"action": "x"})))
    assert caps == {"elicitation": {"form": {}}, "roots": {}}
    assert elicited["action"] == "accept"
