"""schemathesis over the governance admin spec's operations against a live server: no 5xx, every
response declared and valid (schema, status, content type), invalid requests refused. Bounded:
a fixed number of examples per operation, derandomized."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import ignored_auth, positive_data_acceptance

from cycles.server import create_app
from cycles.server.testing import ServerThread
from tests.server.spec import with_governance_extensions

from .conftest import ADMIN_KEY
from .spec import admin_spec_path

# Protocol v0's own GET /v1/balances (fuzzed in tests/server).
_NOT_YET = r"^/v1/balances"


def _as_served(doc: dict[str, Any]) -> dict[str, Any]:
    """Narrowings the spec permits and this server makes: tenant ids of API keys and webhook
    owners follow the tenant grammar; webhook URLs must be https (or loopback http)."""
    schemas = doc["components"]["schemas"]
    schemas["WebhookCreateRequest"]["properties"]["url"]["pattern"] = "^https://[a-z]{1,20}\\.example$"
    schemas["WebhookUpdateRequest"]["properties"]["url"]["pattern"] = "^https://[a-z]{1,20}\\.example$"
    schemas["ApiKeyCreateRequest"]["properties"]["tenant_id"]["enum"] = ["acme"]
    schemas["PolicyCreateRequest"]["properties"]["tenant_id"]["enum"] = ["acme"]
    # Policy responses carry the extensions' quota and action-kind fields (their PATH COVERAGE)
    with (admin_spec_path().parent / "cycles-governance-extensions-v0.1.26.yaml").open() as f:
        with_governance_extensions(doc, yaml.safe_load(f))
    # The same server serves protocol v0's POST /v1/events beside listTenantEvents (GET).
    doc["paths"]["/v1/events"]["post"] = {
        "operationId": "createEvent",
        "responses": {
            c: {"description": "protocol v0 (fuzzed in tests/server)"} for c in ("201", "400", "401", "403", "409")
        },
    }
    return doc


schema = schemathesis.openapi.from_dict(_as_served(yaml.safe_load(admin_spec_path().read_text())))


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[str]:
    # auth_failure_limit=0: the admin spec declares no 429, and schemathesis sends far more requests
    # without a key than the limiter lets one address make (it is tested in test_auth_failures.py)
    app = create_app("memory://", admin_key=ADMIN_KEY, sweep_interval_s=0, auth_failure_limit=0)
    with ServerThread(app) as srv:
        with httpx.Client(base_url=srv.url, headers={"X-Admin-API-Key": ADMIN_KEY}) as c:
            c.post("/v1/admin/tenants", json={"tenant_id": "acme", "name": "Acme"})
            c.post(
                "/admin/budgets", json={"scope": "tenant:acme", "amount": {"unit": "USD_MICROCENTS", "amount": 10**9}}
            )
        yield srv.url


@schema.exclude(path_regex=_NOT_YET).parametrize()
@settings(
    max_examples=int(os.environ.get("CYCLES_FUZZ_EXAMPLES", "25")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_admin_operations(case: Any, fuzz_server: str) -> None:
    headers = {"X-Admin-API-Key": ADMIN_KEY}
    if case.meta.generation.mode.is_negative and "X-Admin-API-Key" not in (case.headers or {}):
        headers = {}  # the negative case is "no credentials": send none
    if case.query and "cursor" in case.query:  # a cursor is valid only if this server issued it
        del case.query["cursor"]
    if case.path.startswith("/v1/webhooks") or case.operation.definition.raw.get("security") == [
        {"ApiKeyAuth": []},
        {"AdminKeyAuth": []},
    ]:
        # dual-auth operations: with the admin key they are the operator's; schemathesis would
        # count an ignored (invalid) tenant key beside a valid admin key as a failure
        excluded = [positive_data_acceptance, ignored_auth]
    else:
        excluded = [positive_data_acceptance]
    response = case.call(base_url=fuzz_server, headers=headers)
    # Schema-valid requests may still be refused for what a schema cannot say (the tenant must
    # exist, the scope must parse, a budget must be there): positive-data acceptance is the one
    # check left out. Every response must still be declared and valid, and invalid data refused.
    case.validate_response(response, headers=headers, excluded_checks=excluded)
