"""redis.py caches scope policies by version; two clients of one Redis must still agree at once
when either changes a policy (the script refuses a stale version), and share every counter."""

from __future__ import annotations

import pytest

from cycles import Action, ActionKindDenied, ActionQuotaExceeded, Cycles, InvalidRequest, Subject, tokens

EMAIL = Action("message.email.send", "smtp")


def test_a_policy_change_by_one_client_applies_at_once_to_another(url: str) -> None:
    with Cycles(url) as a, Cycles(url) as b:
        a.budgets.set("tenant:acme", tokens(1000))
        a.quotas.set("tenant:acme", action_kind="message.email.send", max_calls=3, window="per_run")
        run = Subject(tenant="acme", dimensions={"run_id": "r"})
        for cy in (a, b, a):  # both caches warm; one counter between them
            cy.reserve(run, EMAIL, tokens(1))
        for cy in (a, b):
            with pytest.raises(ActionQuotaExceeded):
                cy.reserve(run, EMAIL, tokens(1))
        with pytest.raises(InvalidRequest):  # a's cache says a per_run quota applies
            a.reserve(Subject(tenant="acme"), EMAIL, tokens(1))
        b.quotas.delete("tenant:acme", action_kind="message.email.send", window="per_run")
        a.reserve(Subject(tenant="acme"), EMAIL, tokens(1))  # not a stale 400: the version moved on
        a.reserve(run, EMAIL, tokens(1))
        b.quotas.deny_kinds("tenant:acme", ["message.email.send"])
        with pytest.raises(ActionKindDenied):
            a.reserve(run, EMAIL, tokens(1))
        a.quotas.deny_kinds("tenant:acme", [])
        b.reserve(run, EMAIL, tokens(1))
