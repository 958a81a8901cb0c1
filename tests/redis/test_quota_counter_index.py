"""The Redis name index that quota counter listings read (``qix``, common.lua) tracks the live
counters: every new counter drops up to two lapsed names, so a tenant that runs for ever does not
grow an index of dead runs, and a reset or listing never sees a name whose key is gone."""

from __future__ import annotations

import pytest

from cycles import Action, Cycles, Subject, tokens
from tests.redis.backend import _client, fresh_redis_url

EMAIL = Action("message.email.send", "smtp")
DAY = 86_400_000


def test_lapsed_names_leave_the_index_as_new_counters_arrive(request: pytest.FixtureRequest) -> None:
    now = [1_775_745_130_000]
    url = fresh_redis_url(request)
    with Cycles(url, clock=lambda: now[0]) as cy:
        cy.budgets.set("tenant:acme", tokens(10**6))
        cy.quotas.set("tenant:acme", action_kind="message.email.send", max_calls=5, window="per_run")
        for i in range(40):
            cy.reserve(Subject(tenant="acme", dimensions={"run_id": f"old-{i}"}), EMAIL, tokens(1))
        prefix = cy.ledger.prefix  # type: ignore[attr-defined]
        index = f"{prefix}:{{acme}}:qix"
        redis = _client()
        assert redis.zcard(index) == 40
        now[0] += DAY + 1  # every old run's counter lapses (its key lives an hour longer for cleanup)
        assert cy.quotas.counters("acme", include_zero=True) == []
        for i in range(25):
            cy.reserve(Subject(tenant="acme", dimensions={"run_id": f"new-{i}"}), EMAIL, tokens(1))
            if i == 9:
                assert redis.zcard(index) == 40 + 10 - 2 * 10  # each new counter dropped two dead names
        assert redis.zcard(index) == 25  # and once none are left, only the live ones remain
        names = [n.decode() for n in redis.zrange(index, 0, -1)]
        assert sum(n.endswith(tuple(f"|new-{i}" for i in range(25))) for n in names) == 25
        assert not any(redis.exists(f"{prefix}:{{acme}}:q:{n}") for n in names if "|old-" in n)
        assert [c.window_key for c in cy.quotas.counters("acme")] == sorted(f"new-{i}" for i in range(25))
