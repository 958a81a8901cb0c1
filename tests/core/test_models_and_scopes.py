"""Amounts, wire models and scope derivation."""

from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import ValidationError

from cycles import Action, Amount, Caps, Subject, Unit, credits, risk_points, tokens, usd
from cycles.errors import InvalidRequest
from cycles.models import ReservationCreateRequest, format_amount, trusted
from cycles.scopes import derive_scopes, parse_scope, scope_tenant


@pytest.mark.parametrize(
    ("dollars", "microcents"),
    [(1, 100_000_000), (0.05, 5_000_000), ("0.1", 10_000_000), (Decimal("0.031"), 3_100_000), (0.000000004, 0),
     (0.000000005, 1), (50, 5_000_000_000)],
)  # fmt: skip
def test_usd_is_integer_microcents(dollars: object, microcents: int) -> None:
    assert usd(dollars) == Amount(unit=Unit.USD_MICROCENTS, amount=microcents)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), True, "abc"])
def test_usd_rejects_bad_values(bad: object) -> None:
    with pytest.raises((ValueError, TypeError, ArithmeticError)):
        usd(bad)  # type: ignore[arg-type]


def test_amounts_are_non_negative_integers_in_one_unit() -> None:
    assert (
        tokens(5).unit is Unit.TOKENS and credits(2).unit is Unit.CREDITS and risk_points(50).unit is Unit.RISK_POINTS
    )
    for bad in (-1, 1.5, "3", True, 2**63):
        with pytest.raises(ValidationError):
            Amount(unit=Unit.TOKENS, amount=bad)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        Amount.model_validate({"unit": "DOLLARS", "amount": 1})
    assert tokens(3) + tokens(4) == tokens(7)
    with pytest.raises(ValueError):
        _ = tokens(3) + usd(1)
    assert format_amount(Unit.USD_MICROCENTS, 3_100_000) == "$0.0310"
    assert str(risk_points(1200)) == "1,200 risk points"


def test_subject_needs_a_standard_level_and_a_portable_charset() -> None:
    with pytest.raises(ValidationError):
        Subject()
    with pytest.raises(ValidationError):
        Subject(dimensions={"cost_center": "x"})
    for bad in ("a b", "a/b", "a:b", "", "x" * 129):
        with pytest.raises(ValidationError):
            Subject(tenant=bad)
    with pytest.raises(ValidationError):
        Subject(tenant="a", unknown="x")  # type: ignore[call-arg]


def test_action_is_positional_and_knows_tools() -> None:
    a = Action("tool.call", "search")
    assert (a.kind, a.name, a.is_tool) == ("tool.call", "search", True)
    assert not Action("llm.completion", "openai:gpt-4o").is_tool
    with pytest.raises(ValidationError):
        Action("x" * 65, "n")


def test_caps_allowlist_wins_over_denylist() -> None:
    assert Caps(tool_allowlist=["a"], tool_denylist=["a"]).allows_tool("a")
    assert not Caps(tool_allowlist=["a"]).allows_tool("b")
    assert not Caps(tool_denylist=["b"]).allows_tool("b")
    assert Caps().allows_tool("anything") and Caps().is_empty()


def test_request_defaults_and_bounds_follow_the_spec() -> None:
    req = ReservationCreateRequest(
        idempotency_key="k", subject=Subject(tenant="a"), action=Action("a", "b"), estimate=tokens(1)
    )
    assert (req.ttl_ms, req.grace_period_ms, req.overage_policy.value, req.dry_run) == (
        60_000,
        5_000,
        "ALLOW_IF_AVAILABLE",
        False,
    )
    for field, value in (("ttl_ms", 999), ("ttl_ms", 86_400_001), ("grace_period_ms", 60_001), ("idempotency_key", "")):
        with pytest.raises(ValidationError):
            ReservationCreateRequest.model_validate({**req.model_dump(), field: value})


def test_trusted_construction_matches_validation() -> None:
    built = trusted(ReservationCreateRequest, idempotency_key="k", subject=Subject(tenant="a"), action=Action("a", "b"),
                    estimate=tokens(1))  # fmt: skip
    checked = ReservationCreateRequest(
        idempotency_key="k", subject=Subject(tenant="a"), action=Action("a", "b"), estimate=tokens(1)
    )
    assert built == checked and built.model_dump() == checked.model_dump()


def test_scope_derivation_follows_canonical_order_and_skips_gaps() -> None:
    s = Subject(toolset="web", tenant="acme", agent="bot", workspace="prod")
    assert derive_scopes(s) == [
        "tenant:acme",
        "tenant:acme/workspace:prod",
        "tenant:acme/workspace:prod/agent:bot",
        "tenant:acme/workspace:prod/agent:bot/toolset:web",
    ]
    assert derive_scopes(Subject(workflow="w")) == ["workflow:w"]
    assert parse_scope("tenant:a/app:b") == [("tenant", "a"), ("app", "b")]
    assert scope_tenant("tenant:a/app:b") == "a" and scope_tenant("app:b") is None
    for bad in ("app:b/tenant:a", "tenant:a/tenant:b", "tenant", "galaxy:x", "tenant:a b"):
        with pytest.raises(InvalidRequest):
            parse_scope(bad)
