"""The one place identifiers and free-form values are checked before they reach a header, a
storage key, a Lua argument or a stored row.

Identifiers (tenants, subject levels, scope values) are 1-128 characters of ``[a-zA-Z0-9_.-]``,
matched against the *whole* string: Python's ``re`` ``$`` also matches before a final ``\\n``, so
every check here uses ``fullmatch``. A tenant ``"alpha\\n"`` accepted once would be refused later
by the HTTP stack (header values cannot hold a newline) after its writes were made.

Free-form JSON (metadata, custom metrics) must be finite: ``NaN`` and ``Infinity`` are not JSON,
and pydantic's serializer would store them as ``null``, silently changing what was sent.
"""

from __future__ import annotations

import math
import re
from typing import Any

from cycles.errors import InvalidRequest

__all__ = [
    "IDENTIFIER_CHARS",
    "IDENTIFIER_MAX",
    "IDENTIFIER_PATTERN",
    "check_finite_json",
    "check_identifier",
    "is_identifier",
]

IDENTIFIER_CHARS = "a-zA-Z0-9_.-"
IDENTIFIER_MAX = 128
#: For pydantic (Rust regex: ``$`` is the end of the text there); Python code uses ``is_identifier``.
IDENTIFIER_PATTERN = rf"^[{IDENTIFIER_CHARS}]+$"
_IDENTIFIER = re.compile(rf"[{IDENTIFIER_CHARS}]{{1,{IDENTIFIER_MAX}}}")
#: Nesting deeper than this in metadata is refused (a recursion bomb is not metadata).
MAX_JSON_DEPTH = 32


def is_identifier(value: object) -> bool:
    """Whether ``value`` is a whole identifier: 1-128 of ``[a-zA-Z0-9_.-]``, nothing before or after."""
    return isinstance(value, str) and _IDENTIFIER.fullmatch(value) is not None


def check_identifier(value: object, what: str) -> str:
    """``value`` if it is an identifier, else ``InvalidRequest`` naming ``what``."""
    if not is_identifier(value):
        shown = value[:140] if isinstance(value, str) else value
        raise InvalidRequest(f"{what} must be 1-{IDENTIFIER_MAX} characters of [{IDENTIFIER_CHARS}], got {shown!r}")
    assert isinstance(value, str)
    return value


def check_finite_json(value: Any, what: str = "metadata") -> Any:
    """Refuse NaN / Infinity (and absurd nesting) anywhere in a JSON-like value; return it unchanged.

    Raises ``ValueError`` so that inside a pydantic validator it becomes a validation error (400
    INVALID_REQUEST on the wire)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                raise ValueError(f"{what} must not contain NaN or Infinity (not JSON)")
        elif isinstance(item, dict | list | tuple):
            if depth >= MAX_JSON_DEPTH:
                raise ValueError(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return value
