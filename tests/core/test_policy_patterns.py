"""Scope patterns of named policies (cycles.ledger.policies): the candidate index a reservation looks
up agrees with the reference matcher on every pattern and path, patterns are tenant-bound, the
lookup is O(depth), and the ranking follows priority, then specificity."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cycles import InvalidRequest
from cycles.ledger import policies
from cycles.ledger.policies import NamedPolicy, anchor_candidates, check_pattern, matches, resolve
from cycles.models import Subject
from cycles.scopes import LEVELS, derive_scopes

VALUES = st.sampled_from(["a", "b", "eng"])
NOW = datetime(2026, 1, 1, tzinfo=UTC)


@st.composite
def paths(draw: st.DrawFn, tenant: str = "acme") -> list[str]:
    levels = {lvl: draw(st.one_of(st.none(), VALUES)) for lvl in LEVELS[1:]}
    return derive_scopes(Subject(tenant=tenant, **{k: v for k, v in levels.items() if v is not None}))


@st.composite
def patterns(draw: st.DrawFn) -> str:
    """Any of the five shapes, over the same small alphabet as the paths (so they often match)."""
    shape = draw(st.sampled_from(["exact", "prefix", "level", "suffix", "any"]))
    if shape == "any":
        return "*"
    if shape == "level":
        return draw(st.sampled_from(LEVELS)) + ":*"
    if shape == "suffix":
        return f"*/{draw(st.sampled_from(LEVELS[1:]))}:{draw(VALUES)}"
    path = draw(paths())
    scope = path[draw(st.integers(0, len(path) - 1))]
    return scope + "/*" if shape == "prefix" else scope


@settings(max_examples=400, deadline=None)
@given(patterns(), paths())
def test_the_candidate_index_agrees_with_the_reference_matcher(pattern: str, path: list[str]) -> None:
    check_pattern(pattern, "acme")
    candidates = anchor_candidates(path)
    expected = matches(pattern, "acme", path)
    assert (candidates[pattern][0] if pattern in candidates else None) == expected


@settings(max_examples=100, deadline=None)
@given(patterns(), paths(tenant="rival"))
def test_a_pattern_never_matches_another_tenants_scopes(pattern: str, path: list[str]) -> None:
    assert matches(pattern, "acme", path) is None


@given(paths())
def test_the_lookup_is_linear_in_the_depth(path: list[str]) -> None:
    assert len(anchor_candidates(path)) <= 4 * len(path) + 1


@pytest.mark.parametrize(
    ("pattern", "path", "anchor"),
    [
        ("tenant:acme", ["tenant:acme"], "tenant:acme"),
        ("tenant:acme", ["tenant:acme", "tenant:acme/agent:x"], "tenant:acme"),  # and below it
        ("tenant:acme/*", ["tenant:acme"], None),  # below only
        ("tenant:acme/*", ["tenant:acme", "tenant:acme/agent:x"], "tenant:acme"),
        (
            "agent:*",
            ["tenant:acme", "tenant:acme/workspace:w", "tenant:acme/workspace:w/agent:x"],
            "tenant:acme/workspace:w/agent:x",
        ),
        ("agent:*", ["tenant:acme", "tenant:acme/workspace:w"], None),
        ("*/agent:x", ["tenant:acme", "tenant:acme/agent:x", "tenant:acme/agent:x/toolset:t"], "tenant:acme/agent:x"),
        ("*/agent:y", ["tenant:acme", "tenant:acme/agent:x"], None),
        ("*", ["tenant:acme", "tenant:acme/agent:x"], "tenant:acme"),
    ],
)
def test_what_each_shape_matches(pattern: str, path: list[str], anchor: str | None) -> None:
    assert matches(pattern, "acme", path) == anchor


@pytest.mark.parametrize(
    "pattern",
    [
        "",
        "tenant:rival",
        "tenant:rival/*",
        "*/tenant:rival",
        "planet:*",
        "tenant:acme/**",
        "*/agent:x/tool:y",
        "workspace:w",
        "tenant:acme/agent:x/workspace:w",
        "tenant:acme/*/agent:x",
        "tenant:ac me",
    ],
)
def test_bad_or_foreign_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(InvalidRequest):
        check_pattern(pattern, "acme")


def _stored(*items: NamedPolicy) -> dict[str, str | None]:
    by: dict[str, list[NamedPolicy]] = {}
    for p in items:
        by.setdefault(p.scope_pattern, []).append(p)
    return {pattern: policies.dump_list(ps) for pattern, ps in by.items()}


def _policy(pattern: str, tokens: int, priority: int = 0, **extra: object) -> NamedPolicy:
    body = {
        "name": f"{pattern}-{tokens}",
        "scope_pattern": pattern,
        "priority": priority,
        "caps": {"max_tokens": tokens},
        **extra,
    }
    return NamedPolicy.create("acme", body, NOW)


PATH = ["tenant:acme", "tenant:acme/workspace:w", "tenant:acme/workspace:w/agent:x"]
NOW_MS = int(NOW.timestamp() * 1000)


def test_ranking_is_priority_then_anchor_depth_then_literalness() -> None:
    shapes = [
        _policy("*", 1),
        _policy("tenant:acme/*", 2),
        _policy("agent:*", 3),
        _policy("*/agent:x", 4),
        _policy("tenant:acme/workspace:w/agent:x", 5),
    ]
    assert resolve(_stored(*shapes), {}, PATH, NOW_MS).caps.max_tokens == 5  # type: ignore[union-attr]
    assert resolve(_stored(*shapes[:4]), {}, PATH, NOW_MS).caps.max_tokens == 4  # type: ignore[union-attr]
    assert resolve(_stored(*shapes[:3]), {}, PATH, NOW_MS).caps.max_tokens == 3  # type: ignore[union-attr]
    assert resolve(_stored(*shapes[:2]), {}, PATH, NOW_MS).caps.max_tokens == 2  # type: ignore[union-attr]
    boosted = [*shapes, _policy("*", 9, priority=1)]
    assert resolve(_stored(*boosted), {}, PATH, NOW_MS).caps.max_tokens == 9  # type: ignore[union-attr]


def test_only_policies_in_force_count() -> None:
    later = _policy("*", 7, effective_from="2026-01-02T00:00:00Z")
    ended = _policy("agent:*", 8, effective_until="2026-01-01T00:00:00Z")
    off = _policy("*/agent:x", 9).model_copy(update={"status": "DISABLED"})
    assert resolve(_stored(later, ended, off), {}, PATH, NOW_MS).caps is None
    assert resolve(_stored(later), {}, PATH, NOW_MS + 86_400_000).caps.max_tokens == 7  # type: ignore[union-attr]


def test_a_patch_reports_exactly_what_changed() -> None:
    p = _policy("*", 1)
    same, changed = p.patched(policies.PolicyPatch(caps={"max_tokens": 1}), NOW)
    assert same is p and changed == []
    new, changed = p.patched(policies.PolicyPatch(priority=3, denied_action_kinds=["x"]), NOW)
    assert changed == ["priority", "denied_action_kinds"] and new.priority == 3 and new.updated_at == NOW


def test_a_rate_limit_beyond_any_quota_bound_still_plans() -> None:
    p = _policy("agent:*", 1, rate_limits={"max_reservations_per_minute": 10**9})
    resolved = resolve(_stored(p), {}, PATH, NOW_MS)
    counter = policies.rate_counter(resolved, "llm.completion", NOW_MS)
    assert counter is not None and counter.limit == 10**9 and counter.scope == PATH[-1] and counter.rate


@pytest.mark.parametrize("tenant", ["a|b", "a}b", "", "a b"])
def test_a_tenant_id_that_cannot_be_a_storage_key_is_refused(tenant: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        NamedPolicy.create(tenant, {"name": "n", "scope_pattern": "*"}, NOW)
