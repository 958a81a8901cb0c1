"""The built-in action kind registry shipped as package data is the spec's, and the risk classes
the quota rules use are the registry's."""

from __future__ import annotations

from cycles import action_kinds
from cycles.ledger.quotas import KIND_RISK
from tests.governance.spec import schema_validator, spec_doc

SPEC = "cycles-action-kinds-v0.1.26.yaml"


def test_the_shipped_registry_is_the_specs_seed_data() -> None:
    seed = spec_doc(SPEC)["x-action-kind-registry"]
    assert action_kinds.version() == seed["version"]
    shipped = [action_kinds.wire(k) for k in action_kinds.kinds(deprecated=True)]
    expected = [{**k, "description": " ".join(k["description"].split())} for k in seed["kinds"]]
    assert [{**k, "description": " ".join(k["description"].split())} for k in shipped] == expected
    assert shipped[-1]["kind"] == "unknown.call"  # catch-all ordering preserved


def test_the_quota_rules_use_the_registrys_risk_classes() -> None:
    assert {k.kind: k.risk_class for k in action_kinds.kinds(deprecated=True)} == KIND_RISK


def test_every_page_and_entry_is_valid_against_the_spec() -> None:
    entry, registry = schema_validator(SPEC, "ActionKind"), schema_validator(SPEC, "ActionKindRegistry")
    cursor = None
    seen = 0
    while True:
        page = action_kinds.page(risk_class=None, deprecated=False, cursor=cursor, limit=7)
        assert not list(registry.iter_errors(page))
        for k in page["kinds"]:
            assert not list(entry.iter_errors(k)), k
        seen += len(page["kinds"])
        cursor = page.get("next_cursor")
        if not page["has_more"]:
            break
    assert seen == len(action_kinds.kinds())
    assert action_kinds.get("message.email") is None and action_kinds.get("llm.completion") is not None
