"""Action kinds (a policy's per-tool ``kind``, a tool's ``x-cycles-action-kind``, the spec's MCP
prefixes), per-kind quotas per session and the loop guard, through the real proxy over real
transports and through the Claude Code hooks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from mcp import Client
from mcp_types import Tool

from cycles import Cycles, ReservationStatus, risk_points
from cycles.testing import assert_ledger_invariant
from cycles_mcp.kinds import FALLBACK_KIND, MCP_TOOL_PREFIXES, annotated_kind, kind_for_tool
from cycles_mcp.policy import parse_policy
from tests.mcp.conftest import ASKING, Env
from tests.mcp.test_hook import hook

SPEC = Path(__file__).resolve().parents[2] / ".." / "shared" / "spec" / "cycles-action-kinds-v0.1.26.yaml"

POLICY = """
tenant = "acme"
default_cost = { risk_points = 1 }
session_budget = { risk_points = 100 }

[tools."deploy"]
kind = "code.deploy"
cost = { risk_points = 5 }
"""


def _text(result: Any) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


def test_the_prefix_table_is_the_specs_and_the_longest_prefix_wins() -> None:
    registry = yaml.safe_load(SPEC.read_text(encoding="utf-8"))["x-action-kind-registry"]["kinds"]
    expected = {k["kind"]: tuple(k["mcp_tool_prefixes"]) for k in registry if k.get("mcp_tool_prefixes")}
    assert dict(MCP_TOOL_PREFIXES) == expected
    assert kind_for_tool("send_email_to_customer") == "message.email.send"
    assert kind_for_tool("Search") == "web.search"  # matched case-insensitively
    assert kind_for_tool("chat_send_update") == "message.chat.post"  # not llm.completion's "chat_"
    assert kind_for_tool("chat_summarize") == "llm.completion"
    assert kind_for_tool("deploy") == FALLBACK_KIND == "unknown.call"  # "deploy_" needs the underscore


def test_the_policy_kind_beats_the_convention() -> None:
    policy = parse_policy(POLICY)
    assert policy.match("deploy").kind == "code.deploy"  # [tools."deploy"] kind
    assert policy.match("send_email").kind == "message.email.send"  # the spec's prefix
    assert policy.match("frobnicate").kind == "unknown.call"
    fixed = parse_policy('action_kind = "payment.charge"\n' + POLICY)  # one kind for every tool ...
    assert fixed.match("send_email").kind == "payment.charge"
    assert fixed.match("deploy").kind == "code.deploy"  # ... but a tool's own kind still comes first


async def test_a_per_run_kind_quota_lets_exactly_two_calls_through_per_session(env: Env) -> None:
    """max_calls=2 per_run on web.search (the kind "search" maps to) and on code.deploy (the policy's
    kind for "deploy"): each MCP session is one run, so each gets exactly two of each through."""
    with Cycles(env.ledger) as cy:
        cy.quotas.set("tenant:acme", action_kind="web.search", max_calls=2, window="per_run")
        cy.quotas.set("tenant:acme", action_kind="code.deploy", max_calls=2, window="per_run")
    outcomes: list[list[bool]] = []
    refusals: list[str] = []
    with env.http_server(env.proxy_args(env.policy(POLICY))) as url:
        for _ in range(2):  # two sessions, one after the other
            async with Client(url, mode="legacy") as client:
                ran = []
                for n in range(4):
                    result = await client.call_tool("search", {"query": f"q{n}"})
                    ran.append(not result.is_error)
                    if result.is_error:
                        refusals.append(_text(result))
                for n in range(3):
                    result = await client.call_tool("deploy", {"service": f"s{n}"})
                    ran.append(not result.is_error)
                outcomes.append(ran)
    assert outcomes == [[True, True, False, False, True, True, False]] * 2
    assert [c["tool"] for c in env.upstream_calls()] == ["search", "search", "deploy", "deploy"] * 2
    assert all("ACTION_QUOTA_EXCEEDED" in t and "web.search" in t and "not run" in t for t in refusals)
    with Cycles(env.ledger) as cy:
        assert not [b for b in cy.budgets.list(tenant="acme") if "/workflow:" in b.scope]  # deleted at session end
        reservations = cy.list_reservations(tenant="acme", limit=200).reservations
        sessions = {r.subject.workflow for r in reservations}
        assert len(sessions) == 2
        for session in sessions:  # the refused calls reserved nothing: 2 searches (1) + 2 deploys (5)
            mine = [r for r in reservations if r.subject.workflow == session]
            assert all(r.status is ReservationStatus.COMMITTED and r.committed for r in mine)
            assert sum(r.committed.amount for r in mine if r.committed) == risk_points(12).amount
        assert_ledger_invariant(cy)


async def test_the_loop_guard_stops_a_repeated_identical_call_and_not_other_arguments(env: Env) -> None:
    with Cycles(env.ledger) as cy:
        cy.quotas.set_loop_guard("tenant:acme", 2)
    async with env.stdio_client(env.proxy_args(env.policy(POLICY))) as client:
        same = [await client.call_tool("search", {"query": "refund policy", "lang": "en"}) for _ in range(2)]
        reordered = await client.call_tool("search", {"lang": "en", "query": "refund policy"})  # same call
        other = await client.call_tool("search", {"query": "shipping", "lang": "en"})
    assert not any(r.is_error for r in same) and not other.is_error
    assert reordered.is_error
    text = _text(reordered)
    assert "LOOP_DETECTED" in text and "not run" in text and "change the arguments" in text
    assert [c["tool"] for c in env.upstream_calls()] == ["search"] * 3


def test_the_hooks_carry_the_fingerprint_of_the_tool_input(env: Env) -> None:
    env.policy('tenant = "acme"\ndefault_cost = { risk_points = 1 }\nsession_budget = { risk_points = 60 }\n')
    with Cycles(env.ledger) as cy:
        cy.quotas.set_loop_guard("tenant:acme", 2)

    def pre(tool_use_id: str, command: str) -> dict[str, Any] | None:
        payload = {"tool_name": "Bash", "tool_input": {"command": command}, "tool_use_id": tool_use_id}
        done = hook(env, "pre", hook_event_name="PreToolUse", **payload)
        assert done.returncode == 0, done.stderr
        post = hook(env, "post", hook_event_name="PostToolUse", tool_response={"stdout": "ok"}, **payload)
        assert post.returncode == 0, post.stderr  # replays pre's reservation (same key, same fingerprint)
        return json.loads(done.stdout) if done.stdout.strip() else None

    assert pre("toolu_1", "ls") is None
    assert pre("toolu_2", "ls") is None
    refused = pre("toolu_3", "ls")
    assert refused is not None
    reason = refused["hookSpecificOutput"]["permissionDecisionReason"]
    assert refused["hookSpecificOutput"]["permissionDecision"] == "deny" and "LOOP_DETECTED" in reason
    assert pre("toolu_4", "ls -la") is None  # other arguments


def test_a_tools_annotation_is_read_from_its_schema_then_its_meta() -> None:
    def tool(schema: dict[str, Any], meta: dict[str, Any] | None = None) -> Tool:
        return Tool(name="t", input_schema={"type": "object", **schema}, _meta=meta)

    assert (
        annotated_kind(tool({"x-cycles-action-kind": "db.write"}, {"x-cycles-action-kind": "db.query"})) == "db.write"
    )
    assert annotated_kind(tool({}, {"x-cycles-action-kind": "db.query"})) == "db.query"
    assert annotated_kind(tool({})) is None
    assert annotated_kind(tool({"x-cycles-action-kind": 7}, {"x-cycles-action-kind": "db.query"})) == "db.query"
    assert annotated_kind(tool({"x-cycles-action-kind": "x" * 65})) is None  # not a kind string: as if absent


def test_the_annotation_sits_between_the_policys_kinds_and_the_prefixes() -> None:
    policy = parse_policy(POLICY)
    assert policy.match("send_email", "db.query").kind == "db.query"  # the annotation beats the prefix
    assert policy.match("deploy", "code.exec").kind == "code.deploy"  # the policy's tool kind beats it
    assert parse_policy('action_kind = "payment.charge"\n' + POLICY).match("x", "db.query").kind == "payment.charge"
    assert policy.match("frob", "proprietary.action").kind == "proprietary.action"  # unregistered: accepted
    refused = policy.match("erp_post", "custom.acme.erp.post")  # an undeclared custom.* kind: refused
    assert refused.denied and "INVALID_REQUEST" in refused.rule
    named = parse_policy(POLICY + '[tools."erp_post"]\nkind = "db.write"\ncost = { risk_points = 2 }\n')
    assert named.match("erp_post", "custom.acme.erp.post").kind == "db.write"  # the operator's kind: allowed
    assert not named.match("erp_post", "custom.acme.erp.post").denied


async def test_annotated_kinds_through_the_proxy(env: Env) -> None:
    """Tools whose definitions declare x-cycles-action-kind, called without listing them first:
    each call is reserved under the kind the precedence gives; an undeclared custom.* kind is
    refused before the upstream sees the call. The client sees the definitions unchanged."""
    env.upstream = ASKING
    policy = env.policy(POLICY.replace('[tools."deploy"]', '[tools."deploy_now"]'))
    async with env.stdio_client(env.proxy_args(policy)) as client:
        results = {name: await client.call_tool(name, {"item": "a"}) for name in CALLED}
        listed = {t.name: t for t in (await client.list_tools()).tools}
    assert listed["send_email_digest"].input_schema["x-cycles-action-kind"] == "db.query"
    assert not any(results[n].is_error for n in CALLED if n != "erp_post")
    refusal = _text(results["erp_post"])
    assert results["erp_post"].is_error and "INVALID_REQUEST" in refusal and "custom.acme.erp.post" in refusal
    assert [c["tool"] for c in env.upstream_calls()] == [n for n in CALLED if n != "erp_post"]
    with Cycles(env.ledger) as cy:
        kinds = {r.action.name: r.action.kind for r in cy.list_reservations(tenant="acme").reservations}
        assert kinds == {
            "send_email_digest": "db.query",  # annotation over the send_email prefix
            "deploy_now": "code.deploy",  # the policy's kind over the annotation (code.exec)
            "frob": "proprietary.action",  # unregistered, accepted as given
            "sync_items": "storage.upload",  # from _meta
        }
        assert_ledger_invariant(cy)


CALLED = ("send_email_digest", "deploy_now", "erp_post", "frob", "sync_items")
