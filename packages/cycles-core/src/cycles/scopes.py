"""Scope derivation, exactly as the spec's SCOPE DERIVATION section says.

A subject ``Subject(tenant="acme", workflow="run-42", agent="writer")`` derives the scopes
``tenant:acme``, ``tenant:acme/workflow:run-42`` and ``tenant:acme/workflow:run-42/agent:writer``:
canonical order tenant -> workspace -> app -> workflow -> agent -> toolset, gaps skipped. A budget
id is one of those paths; ``parse_scope`` checks one written by a person.
"""

from __future__ import annotations

from cycles.errors import InvalidRequest
from cycles.identifiers import is_identifier
from cycles.models import Subject

__all__ = ["LEVELS", "derive_scopes", "parse_scope", "scope_tenant"]

LEVELS: tuple[str, ...] = ("tenant", "workspace", "app", "workflow", "agent", "toolset")
_LEVEL_RANK = {level: rank for rank, level in enumerate(LEVELS)}


_derived: dict[tuple[str | None, ...], tuple[str, ...]] = {}


def derive_scopes(subject: Subject) -> list[str]:
    """Every scope the subject draws from, outermost first (the spec's affected_scopes order).

    Agents reuse a handful of subjects for every call, so derivations are memoised by the six level
    values (read fresh each time: a mutated subject gets its new scopes)."""
    key = (subject.tenant, subject.workspace, subject.app, subject.workflow, subject.agent, subject.toolset)
    found = _derived.get(key)
    if found is None:
        scopes: list[str] = []
        path = ""
        for level, value in zip(LEVELS, key, strict=True):
            if value is not None:
                path = f"{path}/{level}:{value}" if path else f"{level}:{value}"
                scopes.append(path)
        if len(_derived) >= 4096:  # bounded: a service with endless distinct runs must not grow it forever
            _derived.clear()
        found = _derived[key] = tuple(scopes)
    return list(found)


def parse_scope(scope: str) -> list[tuple[str, str]]:
    """Check a budget id like ``tenant:acme/workflow:run-42``; return its (level, value) pairs."""
    if not isinstance(scope, str) or not scope or len(scope) > 1024:
        raise InvalidRequest(f"invalid scope {scope!r}: expected e.g. 'tenant:acme/workflow:run-42'")
    pairs: list[tuple[str, str]] = []
    last_rank = -1
    for part in scope.split("/"):
        level, sep, value = part.partition(":")
        if not sep or level not in _LEVEL_RANK:
            raise InvalidRequest(
                f"invalid scope {scope!r}: {part!r} is not 'level:value' with level one of {', '.join(LEVELS)}"
            )
        if not is_identifier(value):
            raise InvalidRequest(f"invalid scope {scope!r}: value {value!r} must match ^[a-zA-Z0-9_.-]+$")
        rank = _LEVEL_RANK[level]
        if rank <= last_rank:
            raise InvalidRequest(
                f"invalid scope {scope!r}: levels must follow the order {' -> '.join(LEVELS)} once each"
            )
        last_rank = rank
        pairs.append((level, value))
    return pairs


def scope_tenant(scope: str) -> str | None:
    """The tenant a scope belongs to (``None`` for scopes of tenant-less subjects)."""
    if scope.startswith("tenant:"):
        return scope[7:].split("/", 1)[0]
    return None
