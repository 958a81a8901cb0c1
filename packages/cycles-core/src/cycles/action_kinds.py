"""The action kind registry (cycles-action-kinds v0.1.26): the spec's built-in kinds with their risk
classes, descriptions, policy key specs and MCP tool prefixes, as every server seeds them.

    from cycles import action_kinds
    action_kinds.get("message.email.send").risk_class        # "external_side_effect"
    action_kinds.kinds(risk_class="high_risk")               # [ActionKind, ...] in registry order

``action_kinds.json`` is the spec's ``x-action-kind-registry``, shipped as package data (a test holds
it equal to the spec, and ``quotas.KIND_RISK`` to it). Risk classes are the spec's; default risk
point weights are not part of it (they are server configuration), so the registry has none.
``GET /v1/action-kinds`` and ``GET /v1/action-kinds/{kind}`` serve this module.
"""

from __future__ import annotations

import functools
import hashlib
import json
from importlib import resources
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, StringConstraints

from cycles.errors import InvalidRequest
from cycles.ledger import paging
from cycles.ledger.quotas import RISK_CLASSES, RiskClass

__all__ = ["ActionKind", "ActionPolicyKeySpec", "etag", "get", "kinds", "page", "version", "wire"]


class ActionPolicyKeySpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: bool | None = None
    recipient_domain: bool | None = None
    resource_type: str | None = None
    path_prefix: bool | None = None


class ActionKind(BaseModel):
    """One registry entry (the spec's ActionKind)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Annotated[str, StringConstraints(max_length=64)]
    risk_class: RiskClass
    policy_key_spec: ActionPolicyKeySpec | None = None
    description: Annotated[str, StringConstraints(max_length=512)] | None = None
    mcp_tool_prefixes: list[Annotated[str, StringConstraints(max_length=128)]] | None = None
    deprecated: bool = False
    replacement_kind: Annotated[str, StringConstraints(max_length=64)] | None = None


@functools.cache
def _registry() -> tuple[str, tuple[ActionKind, ...], dict[str, ActionKind]]:
    text = resources.files("cycles").joinpath("action_kinds.json").read_text(encoding="utf-8")
    data = json.loads(text)
    entries = tuple(ActionKind.model_validate(k) for k in data["kinds"])
    return str(data["version"]), entries, {k.kind: k for k in entries}


def version() -> str:
    """The registry's version (semver)."""
    return _registry()[0]


def get(kind: str) -> ActionKind | None:
    """The built-in kind, exact match only (no prefix or fuzzy matching, as the spec says)."""
    return _registry()[2].get(kind)


def kinds(*, risk_class: str | None = None, deprecated: bool = False) -> list[ActionKind]:
    """The built-in kinds in registry order (``unknown.call`` last); deprecated ones only when
    ``deprecated`` is true."""
    if risk_class is not None and risk_class not in RISK_CLASSES:
        raise InvalidRequest(f"risk_class must be one of {', '.join(RISK_CLASSES)}")
    return [
        k
        for k in _registry()[1]
        if (risk_class is None or k.risk_class == risk_class) and (deprecated or not k.deprecated)
    ]


@functools.cache
def etag() -> str:
    """A strong validator of the whole registry: it changes only with the registry's content."""
    body = json.dumps([version(), [k.model_dump(exclude_none=True) for k in _registry()[1]]], sort_keys=True)
    return '"' + hashlib.sha256(body.encode()).hexdigest()[:32] + '"'


def page(*, risk_class: str | None, deprecated: bool, cursor: str | None, limit: int) -> dict[str, Any]:
    """ActionKindRegistry: one page in registry order; the cursor names the last kind returned."""
    selected = kinds(risk_class=risk_class, deprecated=deprecated)
    binding = f"{risk_class}|{deprecated}"
    after = paging.decode_position(cursor, binding, (str,))
    start = 0
    if after is not None:
        names = [k.kind for k in selected]
        if after[0] not in names:
            raise InvalidRequest("cursor is not one this server issued")
        start = names.index(after[0]) + 1
    chunk = selected[start : start + limit]
    out: dict[str, Any] = {
        "version": version(),
        "kinds": [wire(k) for k in chunk],
        "has_more": start + limit < len(selected),
    }
    if out["has_more"]:
        out["next_cursor"] = paging.encode_position((chunk[-1].kind,), binding)
    return out


def wire(kind: ActionKind) -> dict[str, Any]:
    """One kind as the spec's JSON (defaults left out, the required fields always in)."""
    return kind.model_dump(mode="json", exclude_none=True, exclude_defaults=True) | {
        "kind": kind.kind,
        "risk_class": kind.risk_class,
    }
