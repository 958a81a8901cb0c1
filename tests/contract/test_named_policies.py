"""Named policies (governance admin v0.1.25 Policy + the extensions' quota fields) enforced by the
ledger on every backend: caps, the TTL ceiling and the commit overage policy, reservation rate
limits, action-kind lists and quotas, precedence (priority, then specificity), tenant isolation,
effective windows and DISABLED. Policies are managed through ``cy.policies`` (in process on a local
ledger, over the server's /v1/admin/policies on HTTP)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from cycles import (
    Action,
    ActionKindDenied,
    ActionKindNotAllowed,
    ActionQuotaExceeded,
    BudgetExceeded,
    Cycles,
    Decision,
    InvalidRequest,
    Subject,
    tokens,
)
from cycles.errors import DuplicateResource, LimitExceeded, NotFound

from .clocked import Clock, at, clocked_client
from .conftest import MULTI_PROCESS, Backend
from .helpers import amounts, bal

LLM = Action("llm.completion", "m")
POST = Action("http.post", "hook")
EXEC = Action("code.exec", "sh")
A1 = Subject(tenant="acme", workspace="eng", agent="a1")
A2 = Subject(tenant="acme", workspace="ops", agent="a2")


@pytest.fixture
def clock() -> Clock:
    return Clock(at(2026, 4, 9, 14, 32, 10))


@pytest.fixture
def pcy(
    backend: str, ledger: Backend, tmp_path: Path, request: pytest.FixtureRequest, clock: Clock
) -> Iterator[Cycles]:
    with clocked_client(backend, ledger, tmp_path, request, clock) as client:
        client.budgets.set("tenant:acme", tokens(1_000_000))
        client.budgets.set("tenant:rival", tokens(1_000_000))
        yield client


def policy(cy: Cycles, pattern: str, name: str | None = None, tenant: str = "acme", **fields: Any) -> str:
    created = cy.policies.create(tenant, name or f"{pattern} {sorted(fields)}", pattern, **fields)
    assert created["scope_pattern"] == pattern and created["status"] == "ACTIVE"
    return str(created["policy_id"])


def caps_of(cy: Cycles, subject: Subject, action: Action = LLM) -> int | None:
    r = cy.reserve(subject, action, tokens(1))
    assert r.reservation_id
    cy.release(r.reservation_id)
    return r.caps.max_tokens if r.caps is not None else None


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


def test_a_policy_caps_the_scopes_its_pattern_matches_and_no_others(pcy: Cycles) -> None:
    policy(pcy, "tenant:acme/workspace:eng/*", caps={"max_tokens": 256, "tool_denylist": ["rm"]})
    r = pcy.reserve(A1, LLM, tokens(1))
    assert r.decision is Decision.ALLOW_WITH_CAPS
    assert r.caps is not None and (r.caps.max_tokens, r.caps.tool_denylist) == (256, ["rm"])
    assert caps_of(pcy, A2) is None  # another workspace
    assert caps_of(pcy, Subject(tenant="acme", workspace="eng")) is None  # "/*": below it, not the scope itself
    d = pcy.decide(A1, LLM, tokens(1))
    assert d.decision is Decision.ALLOW_WITH_CAPS and d.caps is not None and d.caps.max_tokens == 256


def test_policy_caps_and_budget_caps_combine_tightest(pcy: Cycles) -> None:
    from cycles import Caps

    pcy.budgets.set("tenant:acme/workspace:eng", tokens(1000), caps=Caps(max_tokens=100))
    policy(pcy, "agent:*", caps={"max_tokens": 500, "max_steps_remaining": 3})
    r = pcy.reserve(A1, LLM, tokens(1))
    assert r.caps is not None and (r.caps.max_tokens, r.caps.max_steps_remaining) == (100, 3)


def test_higher_priority_wins_then_the_more_specific_pattern(pcy: Cycles) -> None:
    broad = policy(pcy, "*", caps={"max_tokens": 500})
    assert caps_of(pcy, A1) == 500
    policy(pcy, "tenant:acme/workspace:eng/agent:a1", caps={"max_tokens": 50})
    assert caps_of(pcy, A1) == 50  # equal priority: the exact, deeper pattern
    assert caps_of(pcy, A2) == 500
    policy(pcy, "*/agent:a1", caps={"max_tokens": 70})
    assert caps_of(pcy, A1) == 50  # same anchor, the literal pattern beats "*/agent:a1"
    pcy.policies.update(broad, priority=10)
    assert caps_of(pcy, A1) == 500  # priority first
    pcy.policies.update(broad, priority=0)
    assert caps_of(pcy, A1) == 50


def test_aspects_are_decided_one_by_one_not_merged(pcy: Cycles) -> None:
    """The highest-ranked policy that sets an aspect decides it; one that says nothing about it
    leaves it to the next."""
    policy(pcy, "agent:*", priority=5, caps={"max_tokens": 10})
    policy(pcy, "*", priority=1, caps={"max_tokens": 999}, denied_action_kinds=["code.exec"])
    assert caps_of(pcy, A1) == 10
    with pytest.raises(ActionKindDenied):
        pcy.reserve(A1, EXEC, tokens(1))


def test_allow_and_deny_lists_gate_before_the_budget(pcy: Cycles) -> None:
    pcy.budgets.set("tenant:acme/workspace:eng", tokens(0))  # the budget would refuse anything
    policy(pcy, "tenant:acme/workspace:eng", denied_action_kinds=["code.exec"])
    with pytest.raises(ActionKindDenied) as err:
        pcy.reserve(A1, EXEC, tokens(1))
    assert err.value.deny_detail["reason_code"] == "ACTION_KIND_DENIED"
    with pytest.raises(BudgetExceeded):
        pcy.reserve(A1, LLM, tokens(1))
    policy(pcy, "*/agent:a2", allowed_action_kinds=["web.search"])
    with pytest.raises(ActionKindNotAllowed):
        pcy.reserve(A2, LLM, tokens(1))
    assert pcy.reserve(A2, Action("web.search", "q"), tokens(1)).reservation_id
    d = pcy.decide(A2, LLM, tokens(1))
    assert d.decision is Decision.DENY and d.reason_code == "ACTION_KIND_NOT_ALLOWED"


def test_a_tenants_policy_never_touches_another_tenant(pcy: Cycles) -> None:
    policy(pcy, "*", denied_action_kinds=["code.exec"], caps={"max_tokens": 5})
    policy(pcy, "agent:*", name="agents", rate_limits={"max_reservations_per_minute": 1})
    rival = Subject(tenant="rival", agent="a1")
    for _ in range(3):
        r = pcy.reserve(rival, EXEC, tokens(1))
        assert r.decision is Decision.ALLOW and r.caps is None
    with pytest.raises(InvalidRequest):
        pcy.policies.create("acme", "steal", "tenant:rival/*", caps={"max_tokens": 1})
    with pytest.raises(InvalidRequest):
        pcy.policies.create("acme", "steal2", "*/tenant:rival", caps={"max_tokens": 1})
    assert [p["name"] for p in pcy.policies.list(tenant_id="rival")] == []


def test_action_quotas_count_at_the_patterns_anchor(pcy: Cycles) -> None:
    policy(pcy, "agent:*", action_quotas=[{"action_kind": "http.post", "max_calls": 2, "window": "per_hour_tumbling"}])
    for _ in range(2):
        pcy.reserve(A1, POST, tokens(1))
    with pytest.raises(ActionQuotaExceeded) as err:
        pcy.reserve(A1, POST, tokens(1))
    qv = err.value.deny_detail["quota_violation"]
    assert (qv["used"], qv["limit"], qv["scope"]) == (2, 2, "tenant:acme/workspace:eng/agent:a1")
    assert pcy.reserve(A2, POST, tokens(1)).reservation_id  # each agent is its own anchor
    policy(
        pcy,
        "tenant:acme/*",
        name="tenant-wide",
        priority=1,
        action_quotas=[{"action_kind": "http.post", "max_calls": 4, "window": "per_hour_tumbling"}],
    )
    pcy.reserve(A1, POST, tokens(1))  # the tenant-wide rule now decides, counted at tenant:acme: 1
    pcy.reserve(A2, POST, tokens(1))
    pcy.reserve(A2, POST, tokens(1))
    pcy.reserve(A1, POST, tokens(1))
    with pytest.raises(ActionQuotaExceeded) as err:
        pcy.reserve(A2, POST, tokens(1))
    assert err.value.deny_detail["quota_violation"]["scope"] == "tenant:acme"


def test_a_named_policy_outranks_a_scope_quota_only_with_a_higher_priority(pcy: Cycles) -> None:
    pcy.quotas.set("tenant:acme/workspace:eng", action_kind="http.post", max_calls=1, window="per_hour_tumbling")
    pid = policy(pcy, "*", action_quotas=[{"action_kind": "http.post", "max_calls": 3, "window": "per_hour_tumbling"}])
    pcy.reserve(A1, POST, tokens(1))
    with pytest.raises(ActionQuotaExceeded):  # cy.quotas: a priority-0 exact pattern, deeper than "*"
        pcy.reserve(A1, POST, tokens(1))
    pcy.policies.update(pid, priority=1)
    pcy.reserve(A1, POST, tokens(1))
    pcy.reserve(A1, POST, tokens(1))  # 2 of 3 at tenant:acme (the named counter is its own)
    pcy.reserve(A1, POST, tokens(1))
    with pytest.raises(ActionQuotaExceeded):
        pcy.reserve(A1, POST, tokens(1))


def test_rate_limit_refuses_with_429_until_the_next_minute(pcy: Cycles, clock: Clock) -> None:
    policy(pcy, "tenant:acme/workspace:eng", rate_limits={"max_reservations_per_minute": 3})
    pcy.reserve(A1, LLM, tokens(1), dry_run=True)  # dry runs and decisions create nothing: not counted
    pcy.decide(A1, LLM, tokens(1))
    for _ in range(3):
        pcy.reserve(A1, LLM, tokens(1))
    before = amounts(bal(pcy, "tenant:acme"))
    with pytest.raises(LimitExceeded) as err:
        pcy.reserve(A1, LLM, tokens(1))
    assert err.value.http_status == 429 and err.value.code == "LIMIT_EXCEEDED"
    assert amounts(bal(pcy, "tenant:acme")) == before  # refused: nothing held
    assert pcy.reserve(A2, LLM, tokens(1)).reservation_id  # another workspace: not limited
    clock.advance(60_000)
    assert pcy.reserve(A1, LLM, tokens(1)).reservation_id


def test_ttl_ceiling_and_overage_policy_apply_to_the_reservation(pcy: Cycles, clock: Clock) -> None:
    policy(
        pcy,
        "agent:*",
        reservation_ttl_override={"max_ttl_ms": 5_000},
        commit_overage_policy="REJECT",
    )
    r = pcy.reserve(A1, LLM, tokens(10), ttl_ms=60_000, overage_policy="ALLOW_IF_AVAILABLE")
    assert r.reservation_id and r.expires_at_ms == clock() + 5_000
    with pytest.raises(BudgetExceeded, match="REJECT"):  # the policy's overage policy, not the request's
        pcy.commit(r.reservation_id, tokens(11))
    pcy.commit(r.reservation_id, tokens(10))
    other = pcy.reserve(Subject(tenant="acme", workspace="eng"), LLM, tokens(10), ttl_ms=60_000)
    assert other.reservation_id and other.expires_at_ms == clock() + 60_000
    pcy.commit(other.reservation_id, tokens(11))  # no policy there: ALLOW_IF_AVAILABLE charges it


def test_effective_window_and_status_decide_when_a_policy_is_in_force(pcy: Cycles, clock: Clock) -> None:
    now = clock()
    pid = policy(
        pcy,
        "agent:*",
        caps={"max_tokens": 42},
        effective_from=iso(now + 60_000),
        effective_until=iso(now + 120_000),
    )
    assert caps_of(pcy, A1) is None
    clock.advance(60_000)
    assert caps_of(pcy, A1) == 42
    pcy.policies.disable(pid)
    assert caps_of(pcy, A1) is None
    assert pcy.policies.get(pid)["status"] == "DISABLED"
    pcy.policies.enable(pid)
    assert caps_of(pcy, A1) == 42
    clock.advance(60_000)
    assert caps_of(pcy, A1) is None  # effective_until is exclusive


def test_policies_are_listed_read_and_updated_as_stored(pcy: Cycles) -> None:
    pid = policy(
        pcy,
        "tenant:acme/*",
        name="base",
        priority=3,
        denied_action_kinds=["code.exec"],
        risk_class_quotas=[{"risk_class": "high_risk", "max_calls": 5, "window": "per_day_tumbling"}],
    )
    policy(
        pcy,
        "agent:*",
        name="agents",
        action_quotas=[{"action_kind": "http.post", "max_calls": 5, "window": "per_hour_tumbling"}],
    )
    got = pcy.policies.get(pid)
    assert got["priority"] == 3 and got["denied_action_kinds"] == ["code.exec"] and got["action_quotas"] == []
    assert got["risk_class_quotas"] == [{"risk_class": "high_risk", "max_calls": 5, "window": "per_day_tumbling"}]
    names = lambda **f: sorted(p["name"] for p in pcy.policies.list(tenant_id="acme", **f))  # noqa: E731
    assert names() == ["agents", "base"]
    assert names(has_action_quotas=True) == ["agents", "base"]
    assert names(references_action_kind="code.exec") == ["base"]
    assert names(scope_pattern="agent:*") == ["agents"]
    updated = pcy.policies.update(pid, denied_action_kinds=[], allowed_action_kinds=["web.search"])
    assert updated["allowed_action_kinds"] == ["web.search"] and updated["denied_action_kinds"] == []
    assert "updated_at" in updated
    with pytest.raises(DuplicateResource):
        pcy.policies.create("acme", "base", "*")
    with pytest.raises(DuplicateResource):
        pcy.policies.update(pid, name="agents")
    with pytest.raises(InvalidRequest):
        pcy.policies.update(pid, denied_action_kinds=["code.exec"])  # both lists non-empty
    with pytest.raises(NotFound):
        pcy.policies.get("pol_missing")
    assert pcy.policies.get(pid)["name"] == "base"  # refused changes wrote nothing


def test_a_policy_written_by_another_client_applies_at_once(backend: str, ledger: Backend) -> None:
    """Clients that cache policies (Redis: by version) see another client's change on their next
    reservation; a shared ledger only (memory:// is one process's)."""
    if backend not in MULTI_PROCESS:
        pytest.skip("memory:// is not shared between clients")
    with ledger.open() as a, ledger.open() as b:
        a.budgets.set("tenant:acme", tokens(1000))
        assert caps_of(a, A1) is None  # a has read (and cached) the policies of this path: none
        pid = policy(b, "agent:*", caps={"max_tokens": 9})
        assert caps_of(a, A1) == 9
        b.policies.update(pid, denied_action_kinds=["llm.completion"])
        with pytest.raises(ActionKindDenied):
            a.reserve(A1, LLM, tokens(1))
        b.policies.disable(pid)
        assert caps_of(a, A1) is None


def test_creates_racing_for_one_name_leave_exactly_one(pcy: Cycles) -> None:
    """A name is unique in its tenant even when creates under different patterns race (Redis:
    checked against every policy of the tenant at one version, written only at that version)."""
    patterns = [f"tenant:acme/workspace:w{i}" for i in range(6)]
    for race in range(4):
        name = f"race-{race}"

        def create(pattern: str, name: str = name) -> str:
            try:
                pcy.policies.create("acme", name, pattern, caps={"max_tokens": 5})
            except DuplicateResource:
                return "duplicate"
            return "created"

        with ThreadPoolExecutor(len(patterns)) as pool:
            outcomes = list(pool.map(create, patterns))
        assert sorted(outcomes) == ["created"] + ["duplicate"] * (len(patterns) - 1)
        assert [p["name"] for p in pcy.policies.list(tenant_id="acme")].count(name) == 1
