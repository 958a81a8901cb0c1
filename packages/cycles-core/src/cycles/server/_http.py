"""The HTTP edge of the server, free of routing: correlation ids, bodies, errors, JSON.

Everything here runs on every request, so it is written to do little: ids come from
``os.urandom``, JSON is parsed and emitted by pydantic's Rust core straight from and to bytes,
and error messages are built only when there is an error.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from cycles.errors import ADMIN_ERROR_CODES, PROTOCOL_ERROR_CODES, CyclesError, InvalidRequest, LedgerUnavailable

__all__ = [
    "JSON_HEADERS",
    "MAX_BODY_BYTES",
    "error_body",
    "model_json",
    "new_request_id",
    "parse_body",
    "parse_ms",
    "read_body",
    "trace_id_from",
    "validation_message",
]

#: The largest request body accepted. Protocol requests are well under 4 KiB; metadata maps make
#: them grow, and 64 KiB leaves room for those while bounding what one request can make us parse.
MAX_BODY_BYTES = 64 * 1024

_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_ERROR_CODES = frozenset(PROTOCOL_ERROR_CODES) | frozenset(ADMIN_ERROR_CODES)  # governance routes

JSON_HEADERS = {"content-type": "application/json"}

M = TypeVar("M", bound=BaseModel)


def new_request_id() -> str:
    return "req_" + os.urandom(10).hex()


def trace_id_from(headers: Mapping[str, str]) -> str:
    """The spec's CORRELATION AND TRACING precedence: a valid ``traceparent``, else a valid
    ``X-Cycles-Trace-Id``, else a fresh id. Malformed headers are ignored, never rejected."""
    parent = headers.get("traceparent")
    if parent:
        m = _TRACEPARENT.fullmatch(parent.strip())
        if m and m.group(1) != _ZERO_TRACE and m.group(2) != _ZERO_SPAN:
            return m.group(1)
    flat = headers.get("x-cycles-trace-id")
    if flat:
        flat = flat.strip()
        if _TRACE_ID.fullmatch(flat) and flat != _ZERO_TRACE:
            return flat
    while True:
        fresh = os.urandom(16).hex()
        if fresh != _ZERO_TRACE:  # all-zero is invalid in W3C Trace Context: re-roll
            return fresh


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refusing one over ``limit`` bytes before reading it when the length is
    declared and as soon as it passes the limit when it is streamed (chunked)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InvalidRequest("Content-Length is not a number") from None
        if size > limit:
            raise InvalidRequest(f"request body is {size} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    total = 0
    receive = request.receive
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidRequest("the client disconnected before sending the whole body")
        chunk: bytes = message.get("body", b"")
        if chunk:
            total += len(chunk)
            if total > limit:
                raise InvalidRequest(f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse_body(model: type[M], body: bytes) -> M:
    """Validate a JSON body against a wire model, strictly: ``"5"`` is not an integer here, as it
    is not in the spec's schema. Any failure is a 400 INVALID_REQUEST naming the fields."""
    if not body:
        raise InvalidRequest("request body is required (a JSON object)")
    try:
        parsed = model.model_validate_json(body, strict=True)
    except ValidationError as exc:
        integral = None
        if any(e["type"] == "int_type" and isinstance(e.get("input"), float) for e in exc.errors()):
            integral = _with_integral_floats(model, body)
        if integral is None:
            raise InvalidRequest(validation_message(exc), details={"errors": _error_list(exc)}) from None
        parsed = integral
    if b"null" in body:  # cheap pre-check: only a body that mentions null can carry an explicit one
        _reject_explicit_nulls(parsed, "")
    return parsed


def _reject_explicit_nulls(model: BaseModel, where: str) -> None:
    """No field of the spec's request schemas is nullable: ``"ttl_ms": null`` is not "default",
    it is a wrong type. Free-form maps (metadata, custom metrics) may hold nulls; they are skipped
    because only models are walked."""
    for name in model.model_fields_set:
        value = getattr(model, name)
        path = f"{where}.{name}" if where else name
        if value is None:
            raise InvalidRequest(f"invalid request: {path}: null is not allowed (omit the field instead)")
        if isinstance(value, BaseModel):
            _reject_explicit_nulls(value, path)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    _reject_explicit_nulls(item, f"{path}[{i}]")


def _integral_float(text: str) -> int | float:
    value = float(text)
    if value.is_integer() and abs(value) < 2**63:
        return int(Decimal(text))
    return value


def _with_integral_floats(model: type[M], body: bytes) -> M | None:
    """JSON Schema counts ``1.0`` as an integer, so we do too -- only on this slow path, taken when a
    strict parse met a float where an integer belongs. Strings stay strings: ``"1"`` is still 400."""
    try:
        data = json.loads(body, parse_float=_integral_float)
        return model.model_validate_json(json.dumps(data), strict=True)
    except (ValueError, RecursionError, ValidationError):
        return None


_MAX_ERRORS = 10
_MAX_MESSAGE = 600


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = part if len(part) <= 64 else part[:61] + "..."
            out += f".{text}" if out else text
    return out or "body"


def _error_list(exc: ValidationError) -> list[dict[str, str]]:
    # Never echo the input: it may be 60 KiB, or a secret pasted into the wrong field.
    return [
        {"field": _loc(e["loc"]), "problem": e["msg"][:200]}
        for e in exc.errors(include_url=False, include_input=False, include_context=False)[:_MAX_ERRORS]
    ]


def validation_message(exc: ValidationError) -> str:
    errors = _error_list(exc)
    parts = [f"{e['field']}: {e['problem']}" for e in errors]
    more = exc.error_count() - len(errors)
    text = "invalid request: " + "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def model_json(model: BaseModel) -> bytes:
    """A response model as JSON bytes, optional fields that are unset left out (the spec's MUST
    be absent), straight from pydantic's serializer with no dict in between."""
    return model.__pydantic_serializer__.to_json(model, exclude_none=True)


def error_body(
    code: str, message: str, request_id: str, trace_id: str, details: Mapping[str, Any] | None = None
) -> bytes:
    body: dict[str, Any] = {"error": code, "message": message, "request_id": request_id, "trace_id": trace_id}
    if details:
        body["details"] = dict(details)
    return json.dumps(body, separators=(",", ":"), default=str).encode()


def error_status(exc: CyclesError) -> tuple[str, int]:
    """The wire (code, status) of a Cycles error. Codes outside the protocol's ErrorCode enum become
    500 INTERNAL_ERROR, which every operation declares and every client treats as retryable. A
    ledger that cannot be reached (Redis down, SQLite locked) is 503 with ``Retry-After``: the same
    retryable INTERNAL_ERROR code, but a status that says "unavailable, come back", which load
    balancers and HTTP clients act on, rather than "this server is broken"."""
    if isinstance(exc, LedgerUnavailable):
        return "INTERNAL_ERROR", 503
    if exc.code not in _ERROR_CODES or exc.http_status >= 500:
        return "INTERNAL_ERROR", 500
    return exc.code, exc.http_status


#: Retry-After (seconds) on a 503 for an unavailable ledger.
UNAVAILABLE_RETRY_AFTER_S = 1


def retry_headers(exc: CyclesError, status: int, now_s: float) -> list[tuple[bytes, bytes]]:
    """``Retry-After`` (delta-seconds, as the spec allows) on 429 and 503, and on 429 the spec's
    ``X-RateLimit-Reset`` (Unix seconds)."""
    if status == 429:
        wait = max(1, math.ceil(exc.retry_after_s or 1))
        return [(b"retry-after", str(wait).encode()), (b"x-ratelimit-reset", str(math.ceil(now_s + wait)).encode())]
    if status == 503:
        wait = max(1, math.ceil(exc.retry_after_s or UNAVAILABLE_RETRY_AFTER_S))
        return [(b"retry-after", str(wait).encode())]
    return []


def parse_ms(value: str | None, name: str) -> int | None:
    """An ISO 8601 date-time query bound as epoch ms; blank means unset (the spec's NORMATIVE rule).

    A ``+`` in an offset that reached us unencoded arrives as a space; we put it back rather than
    fail on the client's encoding. A value without an offset is taken as UTC.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if len(text) > 64:
        raise InvalidRequest(f"{name} is not an ISO 8601 date-time")
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(text.replace(" ", "+"))
        except ValueError:
            raise InvalidRequest(f"{name} is not an ISO 8601 date-time: {text!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)
