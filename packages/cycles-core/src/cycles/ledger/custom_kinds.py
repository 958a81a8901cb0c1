"""``custom.*`` action kinds, declared by the operator (the action-kinds spec's CUSTOM.* NAMESPACE
RULES): a reservation, decision or event whose kind is ``custom.*`` and undeclared is refused with
400 INVALID_REQUEST on every backend, before anything is read or counted. There is no implicit
default, as the spec says: a fallback risk class would bypass governance.

    from cycles.ledger import custom_kinds
    custom_kinds.declare({"kind": "custom.acme.erp.invoice.post", "risk_class": "external_side_effect"})

or ``CYCLES_CUSTOM_KINDS=/etc/cycles/kinds.json`` (a JSON list of declarations, or ``{"kinds": [...]}``),
read at first use; ``cycles serve --custom-kinds FILE`` sets it. Declarations are per process: every
process that writes to a ledger directly (an embedded SQLite or Redis client) declares the same kinds;
clients of a server need none, the server checks. A declared kind's ``risk_class`` is the one
risk-class quotas count it under. Declarations are validated when made: the name format, a risk class
of the spec's enum, and MCP tool prefixes that overlap a built-in kind's are logged (the built-in wins).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError, field_validator

from cycles.errors import InvalidRequest, describe_validation_error
from cycles.ledger.quotas import RiskClass

__all__ = ["ENV", "CustomKind", "check", "clear", "declare", "declared", "load_file"]

logger = logging.getLogger("cycles.kinds")

ENV = "CYCLES_CUSTOM_KINDS"
#: custom.<org>.<operation>[.<qualifier>...]
_FORMAT = re.compile(r"^custom\.[a-z0-9][a-z0-9_-]*\.[a-z0-9][a-z0-9_-]*(\.[a-z0-9][a-z0-9_-]*)*$")


class CustomKind(BaseModel):
    """One declaration: the spec's required ``kind`` and ``risk_class``, and its optional fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Annotated[str, StringConstraints(max_length=64)]
    risk_class: RiskClass
    description: Annotated[str, StringConstraints(max_length=512)] | None = None
    policy_key_spec: dict[str, Any] | None = None
    mcp_tool_prefixes: list[Annotated[str, StringConstraints(min_length=1, max_length=128)]] | None = None

    @field_validator("kind")
    @classmethod
    def _custom_format(cls, kind: str) -> str:
        if not _FORMAT.match(kind):
            raise ValueError("a custom kind is custom.<org>.<operation>[.<qualifier>] (lowercase, digits, _ and -)")
        return kind


_lock = threading.Lock()
_declared: dict[str, CustomKind] = {}
_env_read = False


def declare(*kinds: CustomKind | Mapping[str, Any]) -> list[CustomKind]:
    """Declare (or re-declare) custom kinds for this process; all are validated before any is kept."""
    parsed: list[CustomKind] = []
    for k in kinds:
        try:
            parsed.append(k if isinstance(k, CustomKind) else CustomKind.model_validate(dict(k)))
        except ValidationError as exc:
            raise InvalidRequest(f"custom kind declaration: {describe_validation_error(exc)}") from None
    _warn_on_builtin_prefixes(parsed)
    with _lock:
        _declared.update((k.kind, k) for k in parsed)
    return parsed


def load_file(path: str | Path) -> list[CustomKind]:
    """Declare the kinds in a JSON file: a list of declarations, or ``{"kinds": [...]}``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"custom kinds file {str(path)!r}: {exc}") from None
    items = data.get("kinds") if isinstance(data, dict) else data
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise InvalidRequest(f'custom kinds file {str(path)!r}: expected a list of declarations or {{"kinds": [...]}}')
    return declare(*items)


def declared(kind: str) -> CustomKind | None:
    _read_env_once()
    return _declared.get(kind)


def check(kind: str) -> None:
    """Refuse an undeclared ``custom.*`` kind (400 INVALID_REQUEST); any other kind passes."""
    if kind.startswith("custom.") and declared(kind) is None:
        raise InvalidRequest(
            f"action kind {kind!r} is not registered: custom.* kinds must be declared by the operator",
            details={"action_kind": kind},
        )


def clear() -> None:
    """Forget every declaration (tests); the environment variable is read again at next use."""
    global _env_read
    with _lock:
        _declared.clear()
        _env_read = False


def _read_env_once() -> None:
    global _env_read
    if _env_read:
        return
    with _lock:
        if _env_read:
            return
        _env_read = True
    path = os.environ.get(ENV)
    if path:
        load_file(path)


def _warn_on_builtin_prefixes(kinds: Iterable[CustomKind]) -> None:
    from cycles import action_kinds  # the built-in registry imports quotas: imported when needed

    builtin = {p: k.kind for k in action_kinds.kinds() for p in (k.mcp_tool_prefixes or ())}
    for kind in kinds:
        for prefix in kind.mcp_tool_prefixes or ():
            if prefix in builtin:
                logger.warning(
                    "custom kind %s: MCP tool prefix %r is the built-in %s's; the built-in kind takes it",
                    kind.kind,
                    prefix,
                    builtin[prefix],
                )
