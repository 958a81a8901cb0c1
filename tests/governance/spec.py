"""Validation against the governance admin spec (``cycles-governance-admin-v0.1.25.yaml``)."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tests.server.spec import find_spec, with_governance_extensions

_URI = "urn:cycles:governance-admin"


def admin_spec_path() -> Path:
    protocol = find_spec()
    assert protocol is not None, "the shared spec directory is missing (set CYCLES_PROTOCOL_SPEC)"
    return protocol.parent / "cycles-governance-admin-v0.1.25.yaml"


@cache
def admin_doc() -> dict[str, Any]:
    with admin_spec_path().open() as f:
        loaded: dict[str, Any] = yaml.safe_load(f)
    with (admin_spec_path().parent / "cycles-governance-extensions-v0.1.26.yaml").open() as f:
        with_governance_extensions(loaded, yaml.safe_load(f))
    return loaded


@cache
def admin_validator(schema: str) -> Draft202012Validator:
    """A validator for ``components/schemas/<schema>`` (its ``$ref`` s resolved in the document)."""
    registry: Registry[Any] = Registry().with_resource(
        _URI, Resource.from_contents(admin_doc(), default_specification=DRAFT202012)
    )
    return Draft202012Validator(
        {"$ref": f"{_URI}#/components/schemas/{schema}"},
        registry=registry,
        format_checker=Draft202012Validator.FORMAT_CHECKER,
    )


# ---- the action-kinds spec and the protocol extensions (v0.1.26) ---------------------------------


def action_kinds_spec_path() -> Path:
    return admin_spec_path().parent / "cycles-action-kinds-v0.1.26.yaml"


@cache
def spec_doc(name: str) -> dict[str, Any]:
    """One document of the shared spec directory, by file name."""
    with (admin_spec_path().parent / name).open() as f:
        loaded: dict[str, Any] = yaml.safe_load(f)
    return loaded


@cache
def schema_validator(document: str, schema: str) -> Draft202012Validator:
    """A validator for ``components/schemas/<schema>`` of ``document`` (e.g.
    ``cycles-protocol-extensions-v0.1.26.yaml``, ``EventDataQuotaCounterReset``)."""
    uri = f"urn:cycles:{document}"
    registry: Registry[Any] = Registry().with_resource(
        uri, Resource.from_contents(spec_doc(document), default_specification=DRAFT202012)
    )
    return Draft202012Validator(
        {"$ref": f"{uri}#/components/schemas/{schema}"},
        registry=registry,
        format_checker=Draft202012Validator.FORMAT_CHECKER,
    )
