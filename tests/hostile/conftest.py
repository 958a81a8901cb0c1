"""The hostile-tenant suite: each way one tenant could hurt another (issue 11, "Why"), as a test.

Every test runs on SQLite and on Redis (the backends a server shares between tenants), in
process (``open_ledger``) and through HTTP (the ASGI app over the same ledger). ``mallory`` is the
hostile tenant, ``alice`` the bystander whose service must not change.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from cycles.ledger.base import Ledger, open_ledger
from cycles.models import Amount, Unit
from cycles.server.app import CyclesApp, create_app
from cycles.server.keys import MemoryKeyStore

ADMIN_KEY = "hostile-admin-key-0123456789abcdef"
MALLORY, ALICE = "mallory", "alice"
USD = Unit.USD_MICROCENTS

UrlFactory = Callable[..., str]


@pytest.fixture(params=["sqlite", "redis"])
def make_url(request: pytest.FixtureRequest, tmp_path: Path) -> UrlFactory:
    """``make_url(**query)``: a fresh ledger URL on this test's backend, with query options."""
    if request.param == "sqlite":

        def sqlite_url(**query: object) -> str:
            q = "&".join(f"{k}={v}" for k, v in query.items())
            return f"sqlite:///{tmp_path}/ledger.db" + (f"?{q}" if q else "")

        return sqlite_url
    from tests.redis.backend import fresh_redis_url

    base = fresh_redis_url(request)

    def redis_url(**query: object) -> str:
        return base + "".join(f"&{k}={v}" for k, v in query.items())

    return redis_url


@pytest.fixture
def backend(make_url: UrlFactory) -> str:
    return "redis" if make_url().startswith("redis") else "sqlite"


@pytest.fixture
def ledger(make_url: UrlFactory) -> Iterator[Ledger]:
    opened = open_ledger(make_url())
    try:
        yield opened
    finally:
        opened.close()


def fund(ledger: Ledger, *tenants: str, amount: int = 10**9) -> None:
    for tenant in tenants:
        ledger.set_budget(f"tenant:{tenant}", Amount(unit=USD, amount=amount))


class Http:
    """An HTTP client on a server over one ledger, with a key per tenant."""

    def __init__(self, app: CyclesApp, client: httpx.AsyncClient, keys: dict[str, str]) -> None:
        self.app, self.client, self.keys = app, client, keys

    def as_(self, tenant: str) -> dict[str, str]:
        return {"X-Cycles-API-Key": self.keys[tenant]}

    @property
    def admin(self) -> dict[str, str]:
        return {"X-Admin-API-Key": ADMIN_KEY}


async def open_http(url: str) -> tuple[CyclesApp, dict[str, str]]:
    store = MemoryKeyStore()
    app = create_app(url, admin_key=ADMIN_KEY, keys=store, sweep_interval_s=0)
    keys = {t: (await store.create(t)).api_key for t in (MALLORY, ALICE)}
    for tenant in (MALLORY, ALICE):
        await app.server.ledger.set_budget(f"tenant:{tenant}", Amount(unit=USD, amount=10**9))
    return app, keys


@pytest.fixture
async def http(make_url: UrlFactory) -> AsyncIterator[Http]:
    app, keys = await open_http(make_url())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cycles.test") as client:
        yield Http(app, client, keys)
    await app.server.aclose()
