"""The response validator the other server tests rely on does catch violations."""

from __future__ import annotations

import json
from typing import Any

import pytest

from .spec import SpecValidator

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
GOOD = {"x-request-id": "req_1", "x-cycles-trace-id": TRACE, "content-type": "application/json"}
OK_BODY = {"decision": "ALLOW", "affected_scopes": ["tenant:acme"]}


def check(
    spec: SpecValidator, status: int, body: Any, headers: dict[str, str] = GOOD, path: str = "/v1/decide"
) -> None:
    spec.check("POST", path, status, headers, json.dumps(body).encode())


def test_a_valid_response_passes(spec: SpecValidator) -> None:
    check(spec, 200, OK_BODY)
    check(spec, 409, {"error": "BUDGET_EXCEEDED", "message": "m", "request_id": "req_1", "trace_id": TRACE})


@pytest.mark.parametrize(
    ("status", "body", "headers", "why"),
    [
        (200, {**OK_BODY, "extra": 1}, GOOD, "violates"),
        (200, {"decision": "MAYBE"}, GOOD, "violates"),
        (404, {"error": "NOT_FOUND", "message": "m", "request_id": "req_1", "trace_id": TRACE}, GOOD, "not declared"),
        (200, OK_BODY, {**GOOD, "x-request-id": ""}, "X-Request-Id"),
        (200, OK_BODY, {**GOOD, "x-cycles-trace-id": "XYZ"}, "X-Cycles-Trace-Id"),
        (
            409,
            {"error": "BUDGET_EXCEEDED", "message": "m", "request_id": "other", "trace_id": TRACE},
            GOOD,
            "request_id",
        ),
        (409, {"error": "NOPE", "message": "m", "request_id": "req_1", "trace_id": TRACE}, GOOD, "violates"),
    ],
)
def test_violations_are_caught(spec: SpecValidator, status: int, body: Any, headers: dict[str, str], why: str) -> None:
    with pytest.raises(AssertionError, match=why):
        check(spec, status, body, headers)


def test_admin_errors_must_be_error_responses(spec: SpecValidator) -> None:
    with pytest.raises(AssertionError, match="ErrorResponse"):
        check(spec, 400, {"detail": "bad"}, path="/admin/keys")
