"""Several ``cycles serve`` processes over one ledger behave as one server: keys, reservations,
idempotency and budget enforcement are shared, because the servers keep no state of their own."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ..conftest import REDIS_URL
from .conftest import ADMIN_KEY, validating_hooks
from .helpers import amount, commit_body, reserve_body
from .spec import SpecValidator

HAS_REDIS_LEDGER = importlib.util.find_spec("cycles.ledger.redis") is not None
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(ledger: str, tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    env = {**os.environ, "CYCLES_ADMIN_KEY": ADMIN_KEY}
    with (tmp / f"server-{port}.log").open("wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cycles.server",
                "serve",
                "--ledger",
                ledger,
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--key-cache-ttl",
                "0",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.05)  # readiness probe interval, bounded by the deadline
    proc.kill()
    proc.wait()
    raise AssertionError(f"server not ready: {(tmp / f'server-{port}.log').read_text()[-2000:]}")


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param(
            "redis",
            marks=[pytest.mark.redis, pytest.mark.skipif(not HAS_REDIS_LEDGER, reason="no redis ledger in this tree")],
        ),
    ]
)
def two_servers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    prefix = f"cycles-test-{uuid.uuid4().hex}"
    sep = "&" if "?" in REDIS_URL else "?"
    ledger = f"sqlite:///{tmp_path}/shared.db" if request.param == "sqlite" else f"{REDIS_URL}{sep}prefix={prefix}"
    procs = []
    try:
        for _ in range(2):
            proc, url = _serve(ledger, tmp_path)
            procs.append((proc, url))
        yield procs[0][1], procs[1][1]
    finally:
        for proc, _ in procs:
            proc.terminate()
        for proc, _ in procs:
            proc.wait(timeout=15)
        if request.param == "redis":  # leave the shared database as we found it
            import redis

            with redis.Redis.from_url(REDIS_URL) as r:
                keys = list(r.scan_iter(match=prefix + ":*"))
                if keys:
                    r.delete(*keys)


async def test_two_servers_behave_as_one(two_servers: tuple[str, str], spec: SpecValidator) -> None:
    url_a, url_b = two_servers
    tenant = "t" + uuid.uuid4().hex[:12]
    hooks = validating_hooks(spec)
    admin = {"X-Admin-API-Key": ADMIN_KEY}
    async with (
        httpx.AsyncClient(base_url=url_a, event_hooks=hooks) as a,
        httpx.AsyncClient(base_url=url_b, event_hooks=hooks) as b,
    ):
        r = await a.post("/admin/budgets", json={"scope": f"tenant:{tenant}", "amount": amount(10_000)}, headers=admin)
        assert r.status_code == 201
        api_key = (await a.post("/admin/keys", json={"tenant": tenant}, headers=admin)).json()["api_key"]
        auth = {"X-Cycles-API-Key": api_key}

        # A key made on A works on B; a reservation made on B is committed on A.
        rid = (await b.post("/v1/reservations", json=reserve_body(tenant, 1000), headers=auth)).json()["reservation_id"]
        r = await a.post(f"/v1/reservations/{rid}/commit", json=commit_body(600), headers=auth)
        assert r.status_code == 200
        assert (await b.get(f"/v1/reservations/{rid}", headers=auth)).json()["status"] == "COMMITTED"

        # Idempotency holds across servers.
        body = reserve_body(tenant, 100)
        first = (await a.post("/v1/reservations", json=body, headers=auth)).json()
        again = (await b.post("/v1/reservations", json=body, headers=auth)).json()
        assert again["reservation_id"] == first["reservation_id"]

        # Concurrent reservations through both servers never oversubscribe: 9,300 left, 40 x 500 asked.
        async def grab(client: httpx.AsyncClient) -> int:
            r = await client.post("/v1/reservations", json=reserve_body(tenant, 500), headers=auth)
            assert r.status_code in (200, 409), r.text
            return r.status_code

        codes = await asyncio.gather(*(grab(a if i % 2 else b) for i in range(40)))
        assert codes.count(200) == 9_300 // 500
        r = await a.get("/v1/balances", params={"tenant": tenant}, headers=auth)
        (bal,) = r.json()["balances"]
        assert bal["spent"]["amount"] == 600
        assert bal["reserved"]["amount"] == 100 + 500 * codes.count(200)
        assert bal["remaining"]["amount"] >= 0

        # A key revoked on B is refused by A (its key cache is off in this test).
        key_id = api_key.split("_")[1]
        assert (await b.delete(f"/admin/keys/{key_id}", headers=admin)).status_code == 200
        assert (await a.get("/v1/reservations", headers=auth)).status_code == 401
