"""schemathesis fuzzes every runtime endpoint from the spec against a live server: no 5xx, no
response that breaks the spec (schema, status code, content type, headers), and invalid requests
rejected. Bounded: a fixed number of examples per operation, derandomized."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, settings

from cycles.errors import InvalidRequest
from cycles.server import create_app
from cycles.server._http import parse_ms
from cycles.server.testing import ServerThread

from .conftest import ADMIN_KEY
from .spec import find_spec

SPEC = find_spec()
pytestmark = pytest.mark.skipif(SPEC is None, reason="protocol spec not found")


def _as_served(doc: dict[str, Any]) -> dict[str, Any]:
    """The spec with the narrowings it explicitly permits and this server makes, so the fuzzer's
    "schema-valid data must be accepted" check holds us to exactly what we accept:
    Subject CHARSET -- standard fields SHOULD match ^[a-zA-Z0-9_.-]+$ and "Servers MAY reject
    [others] with 400 INVALID_REQUEST" (we do, as the reference implementation does); and an action
    kind / name is never empty (a scope or price lookup on "" means nothing)."""
    schemas = doc["components"]["schemas"]
    for level in ("tenant", "workspace", "app", "workflow", "agent", "toolset"):
        schemas["Subject"]["properties"][level].update(minLength=1, pattern="^[a-zA-Z0-9_.-]+$")
    for name in ("kind", "name"):
        schemas["Action"]["properties"][name]["minLength"] = 1
    # listReservations TIME-RANGE FILTERS: "Blank-string values for any window bound MUST be treated
    # as unset (NORMATIVE) ... Servers MUST NOT 400 on empty-string values despite the format".
    windows = ("from", "to", "expires_from", "expires_to", "finalized_from", "finalized_to")
    for param in doc["paths"]["/v1/reservations"]["get"]["parameters"]:
        if param.get("name") in windows:
            param["schema"] = {"type": "string", "anyOf": [{"format": "date-time"}, {"maxLength": 0}]}
    # The same server serves the governance spec's listTenantEvents on GET /v1/events (its shapes are
    # fuzzed against that spec in tests/governance): here only its presence in Allow is declared.
    doc["paths"]["/v1/events"]["get"] = {
        "operationId": "listTenantEvents",
        "responses": {code: {"description": "see cycles-governance-admin"} for code in ("200", "400", "401", "403")},
    }
    return doc


schema = schemathesis.openapi.from_dict(_as_served(yaml.safe_load(SPEC.read_text()))) if SPEC is not None else None


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[tuple[str, str]]:
    # auth_failure_limit=0: schemathesis sends far more requests without a key than the refusal limiter
    # lets one address make, and most operations declare no 429 (tests/governance/test_auth_failures.py)
    app = create_app("memory://", admin_key=ADMIN_KEY, sweep_interval_s=0, auth_failure_limit=0)
    with ServerThread(app) as srv:
        admin = {"X-Admin-API-Key": ADMIN_KEY}
        with httpx.Client(base_url=srv.url, headers=admin) as c:
            for unit in ("USD_MICROCENTS", "TOKENS", "CREDITS", "RISK_POINTS"):  # no UNIT_MISMATCH by chance
                c.post("/admin/budgets", json={"scope": "tenant:acme", "amount": {"unit": unit, "amount": 10**15}})
            api_key = c.post("/admin/keys", json={"tenant": "acme"}).json()["api_key"]
            # A few reservations, so ids the fuzzer may reuse exist.
            for _ in range(3):
                c.post(
                    "/v1/reservations",
                    headers={"X-Cycles-API-Key": api_key},
                    json={
                        "idempotency_key": uuid.uuid4().hex,
                        "subject": {"tenant": "acme"},
                        "action": {"kind": "llm", "name": "m"},
                        "estimate": {"unit": "USD_MICROCENTS", "amount": 1},
                    },
                )
        yield srv.url, api_key


def _steer(case: Any) -> None:
    """Cross-field rules a schema cannot state, each tested on its own elsewhere, would turn most
    schema-valid cases into 400/403 before they reach the ledger: the idempotency header must equal
    the body's key, a subject must be the key's tenant, and a balance query needs a subject filter.
    Valid cases are steered past them (invalid cases are left as generated: they must be refused)."""
    body = case.body if isinstance(case.body, dict) else None
    if body is not None:
        if case.headers and "X-Idempotency-Key" in case.headers:
            body_key = str(body.get("idempotency_key"))
            if body_key.isascii() and body_key.isprintable() and body_key.strip() == body_key:
                case.headers["X-Idempotency-Key"] = body_key
            else:  # not sendable as an HTTP header value; the header is optional
                del case.headers["X-Idempotency-Key"]
        subject = body.get("subject")
        if isinstance(subject, dict):
            subject["tenant"] = "acme"
    if case.query and "cursor" in case.query:  # a cursor is valid only if this server issued it
        del case.query["cursor"]
    if case.path == "/v1/balances":
        query = case.query if case.query is not None else {}
        levels = ("tenant", "workspace", "app", "workflow", "agent", "toolset")
        if not any(str(query.get(level) or "").strip() for level in levels):
            query["tenant"] = "acme"
        if "tenant" in query:
            query["tenant"] = "acme"
        case.query = query
    if case.path == "/v1/reservations" and case.method == "GET" and case.query:
        if "tenant" in case.query:
            case.query["tenant"] = "acme"
        for lo, hi in (("from", "to"), ("expires_from", "expires_to"), ("finalized_from", "finalized_to")):
            a, b = _ms(case.query.get(lo)), _ms(case.query.get(hi))
            if a is not None and b is not None and a > b:  # from > to is a 400 by the spec's own rule
                case.query[lo], case.query[hi] = case.query[hi], case.query[lo]


def _ms(value: Any) -> int | None:
    try:
        return parse_ms(value, "bound") if isinstance(value, str) else None
    except InvalidRequest:
        return None


if schema is not None:

    @schema.include(path_regex=r"^/v1/(decide|reservations|balances|events)").parametrize()
    @settings(
        max_examples=int(os.environ.get("CYCLES_FUZZ_EXAMPLES", "40")),
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def test_runtime_endpoints(case: Any, fuzz_server: tuple[str, str]) -> None:
        url, api_key = fuzz_server
        headers = {"X-Cycles-API-Key": api_key}
        if not case.meta.generation.mode.is_negative:
            _steer(case)
        response = case.call(base_url=url, headers=headers)
        case.validate_response(response, headers=headers)
