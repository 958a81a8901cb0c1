"""custom.* action kinds (the action-kinds spec's CUSTOM.* NAMESPACE RULES) on every backend: an
undeclared one is refused with 400 INVALID_REQUEST on reserve, decide and event, before anything is
held or counted; a declared one runs, and risk-class quotas count it under its declared class.
Declarations are per process, so the in-process server of the http backend sees them too."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from cycles import ActionQuotaExceeded, Cycles, InvalidRequest, Subject, tokens
from cycles.ledger import custom_kinds
from cycles.models import Action

from .helpers import amounts, bal

ACME = Subject(tenant="acme")
ERP = Action("custom.acme.erp.invoice_post", "post")


@pytest.fixture(autouse=True)
def no_declarations() -> Iterator[None]:
    custom_kinds.clear()
    yield
    custom_kinds.clear()


def test_an_undeclared_custom_kind_is_refused_before_anything_is_held(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(100))
    for call in (
        lambda: cy.reserve(ACME, ERP, tokens(10)),
        lambda: cy.decide(ACME, ERP, tokens(10)),
        lambda: cy.event(ACME, ERP, tokens(10)),
    ):
        with pytest.raises(InvalidRequest, match=re.escape(ERP.kind)):
            call()
    assert amounts(bal(cy, "tenant:acme")) == (100, 0, 0, 0, 100)
    cy.reserve(ACME, Action("proprietary.action", "x"), tokens(1))  # other unregistered kinds: accepted


def test_a_declared_custom_kind_runs_and_counts_under_its_declared_class(cy: Cycles) -> None:
    custom_kinds.declare({"kind": ERP.kind, "risk_class": "external_side_effect", "description": "ERP invoice"})
    cy.budgets.set("tenant:acme", tokens(100))
    cy.quotas.set("tenant:acme", risk_class="external_side_effect", max_calls=2, window="per_hour_tumbling")
    first = cy.reserve(ACME, ERP, tokens(10))
    assert first.reservation_id
    cy.commit(first.reservation_id, tokens(4))
    cy.reserve(ACME, Action("message.email.send", "mail"), tokens(1))  # the same class: the second call
    with pytest.raises(ActionQuotaExceeded):
        cy.reserve(ACME, ERP, tokens(1))
    cy.reserve(ACME, Action("web.search", "q"), tokens(1))  # read_only: another class


def test_declarations_are_validated_whole(tmp_path: Path) -> None:
    bad = [
        {"kind": "custom.acme", "risk_class": "side_effect"},  # no operation
        {"kind": "acme.erp.post", "risk_class": "side_effect"},  # not custom.*
        {"kind": "custom.acme.erp", "risk_class": "dangerous"},  # not a risk class
        {"kind": "custom.acme.erp"},  # risk_class is required
    ]
    for declaration in bad:
        with pytest.raises(InvalidRequest, match="custom kind declaration"):
            custom_kinds.declare({"kind": "custom.acme.ok", "risk_class": "read_only"}, declaration)
        assert custom_kinds.declared("custom.acme.ok") is None  # nothing of a refused batch is kept
    good = tmp_path / "kinds.json"
    good.write_text(json.dumps({"kinds": [{"kind": "custom.acme.sap.query", "risk_class": "read_only"}]}))
    assert [k.kind for k in custom_kinds.load_file(good)] == ["custom.acme.sap.query"]
    assert custom_kinds.declared("custom.acme.sap.query") is not None
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(InvalidRequest, match=re.escape("broken.json")):
        custom_kinds.load_file(broken)


def test_the_environment_declares_at_first_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "kinds.json"
    path.write_text(json.dumps([{"kind": "custom.acme.erp.invoice_post", "risk_class": "high_risk"}]))
    monkeypatch.setenv(custom_kinds.ENV, str(path))
    custom_kinds.clear()
    assert custom_kinds.declared(ERP.kind) is not None
    custom_kinds.check(ERP.kind)  # no error
