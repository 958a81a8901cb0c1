"""Fixtures for the server tests: the app over a fresh ledger, clients whose every response is
validated against the protocol spec, and a real uvicorn server in a thread."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cycles.models import Amount, Unit
from cycles.server import create_app
from cycles.server.app import CyclesApp, CyclesServer
from cycles.server.testing import ServerThread

from .spec import SpecValidator, find_spec

ADMIN_KEY = "test-admin-key-0123456789"
TENANT = "acme"
OTHER = "globex"


@pytest.fixture(scope="session")
def spec() -> SpecValidator:
    path = find_spec()
    if path is None:
        pytest.fail("cycles-protocol-v0.yaml not found: set CYCLES_PROTOCOL_SPEC or put shared/spec beside the repo")
    return SpecValidator(path)


def validating_hooks(spec: SpecValidator) -> dict[str, list[Any]]:
    async def check(response: httpx.Response) -> None:
        await response.aread()
        spec.check(
            response.request.method, response.request.url.path, response.status_code, response.headers, response.content
        )

    return {"response": [check]}


def sync_validating_hook(spec: SpecValidator) -> Any:
    def check(response: httpx.Response) -> None:
        response.read()
        spec.check(
            response.request.method, response.request.url.path, response.status_code, response.headers, response.content
        )

    return check


@pytest.fixture(params=["memory", "sqlite"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/ledger.db"


@pytest.fixture
async def app(ledger_url: str) -> AsyncIterator[CyclesApp]:
    application = create_app(ledger_url, admin_key=ADMIN_KEY, sweep_interval_s=0)
    try:
        yield application
    finally:
        await application.server.aclose()


@pytest.fixture
def server(app: CyclesApp) -> CyclesServer:
    return app.server


@pytest.fixture
async def client(app: CyclesApp, spec: SpecValidator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://cycles.test", event_hooks=validating_hooks(spec)
    ) as c:
        yield c


@pytest.fixture
async def api_key(server: CyclesServer) -> str:
    return (await server.keys.create(TENANT)).api_key


@pytest.fixture
async def other_key(server: CyclesServer) -> str:
    return (await server.keys.create(OTHER)).api_key


@pytest.fixture
def auth(api_key: str) -> dict[str, str]:
    return {"X-Cycles-API-Key": api_key}


@pytest.fixture
def admin() -> dict[str, str]:
    return {"X-Admin-API-Key": ADMIN_KEY}


@pytest.fixture
async def funded(server: CyclesServer) -> None:
    """acme has $10 (1e9 USD_MICROCENTS) at the tenant scope; globex has the same."""
    await server.ledger.set_budget(f"tenant:{TENANT}", Amount(unit=Unit.USD_MICROCENTS, amount=10**9))
    await server.ledger.set_budget(f"tenant:{OTHER}", Amount(unit=Unit.USD_MICROCENTS, amount=10**9))


@pytest.fixture
def live(tmp_path: Path) -> Iterator[ServerThread]:
    """A real uvicorn server in a thread over an SQLite ledger (ready before the test starts)."""
    application = create_app(f"sqlite:///{tmp_path}/live.db", admin_key=ADMIN_KEY, sweep_interval_s=0)
    with ServerThread(application) as thread:
        yield thread


def run(coro: Any) -> Any:
    return asyncio.run(coro)
