"""A real server (uvicorn in a thread) per backend, with clients whose every response is checked
against the governance admin spec (status declared, body valid, correlation headers)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cycles.server import create_app
from cycles.server.testing import ServerThread
from tests.server.spec import SpecValidator, find_spec

from .spec import action_kinds_spec_path, admin_spec_path

ADMIN_KEY = "gov-admin-key-0123456789"


@pytest.fixture(scope="session")
def admin_spec() -> SpecValidator:
    return SpecValidator(admin_spec_path())


@pytest.fixture(scope="session")
def action_kinds_spec() -> SpecValidator:
    return SpecValidator(action_kinds_spec_path())


@pytest.fixture(scope="session")
def runtime_spec() -> SpecValidator:
    path = find_spec()
    assert path is not None
    return SpecValidator(path)


@pytest.fixture(params=["memory", "sqlite", "redis"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/gov.db"
    from tests.redis.backend import fresh_redis_url

    return fresh_redis_url(request)


@pytest.fixture
def live(ledger_url: str) -> Iterator[ServerThread]:
    app = create_app(ledger_url, admin_key=ADMIN_KEY, sweep_interval_s=0, key_cache_ttl_s=0)
    with ServerThread(app) as thread:
        yield thread


class Api:
    """Calls to the live server; every response validated against the admin spec."""

    def __init__(
        self, url: str, spec: SpecValidator, runtime: SpecValidator, kinds: SpecValidator | None = None
    ) -> None:
        def check(response: httpx.Response) -> None:
            response.read()
            # protocol v0's operations (GET /v1/balances is in both documents, in v0's shape here)
            # are held to the protocol spec, the action-kinds plane to its spec; everything else to
            # the governance spec.
            method, path = response.request.method, response.request.url.path
            chosen = next(
                (v for v in (runtime, kinds) if v is not None and v.operation(method, path) is not None), spec
            )
            chosen.check(
                response.request.method,
                response.request.url.path,
                response.status_code,
                response.headers,
                response.content,
            )

        self.http = httpx.Client(base_url=url, event_hooks={"response": [check]}, timeout=30)
        self.admin = {"X-Admin-API-Key": ADMIN_KEY}

    def a(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """As the operator (admin key)."""
        return self.http.request(method, path, headers=self.admin, **kw)

    def k(self, key: str, method: str, path: str, **kw: Any) -> httpx.Response:
        """As a tenant key."""
        return self.http.request(method, path, headers={"X-Cycles-API-Key": key}, **kw)

    def tenant(self, tenant_id: str) -> dict[str, Any]:
        r = self.a("POST", "/v1/admin/tenants", json={"tenant_id": tenant_id, "name": tenant_id.title()})
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    def key(self, tenant_id: str, **fields: Any) -> str:
        r = self.a("POST", "/v1/admin/api-keys", json={"tenant_id": tenant_id, "name": "k", **fields})
        assert r.status_code == 201, r.text
        return r.json()["key_secret"]  # type: ignore[no-any-return]

    def budget(self, scope: str, amount: int) -> None:
        r = self.a(
            "POST", "/admin/budgets", json={"scope": scope, "amount": {"unit": "USD_MICROCENTS", "amount": amount}}
        )
        assert r.status_code in (200, 201), r.text

    def reserve(
        self, key: str, subject: dict[str, Any], amount: int, action: dict[str, str] | None = None
    ) -> httpx.Response:
        return self.k(
            key,
            "POST",
            "/v1/reservations",
            json={
                "idempotency_key": uuid.uuid4().hex,
                "subject": subject,
                "action": action or {"kind": "llm", "name": "m"},
                "estimate": {"unit": "USD_MICROCENTS", "amount": amount},
            },
        )

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def api(
    live: ServerThread, admin_spec: SpecValidator, runtime_spec: SpecValidator, action_kinds_spec: SpecValidator
) -> Iterator[Api]:
    client = Api(live.url, admin_spec, runtime_spec, action_kinds_spec)
    yield client
    client.close()
