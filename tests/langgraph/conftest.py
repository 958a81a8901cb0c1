"""Fixtures for the LangChain / LangGraph adapter tests: a Cycles client on every backend.

Prices are registered for the fake models' ``fake-model`` so a reply of 1,000 input and 500
output tokens costs exactly $0.30, and an estimate at the default 1,024 max output tokens is a
little over $0.41: a $1 budget pays for two calls, never three.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cycles import Cycles, Subject
from cycles.pricing import register_price
from cycles.testing import assert_settled

REDIS_URL = os.environ.get("CYCLES_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
HAS_REDIS_BACKEND = importlib.util.find_spec("cycles.ledger.redis") is not None


@pytest.fixture(autouse=True)
def _fake_model_price() -> None:
    register_price("fake-model", input_per_mtok=100, output_per_mtok=400)


BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("sqlite", id="sqlite"),
    pytest.param(
        "redis",
        id="redis",
        marks=[
            pytest.mark.redis,
            pytest.mark.skipif(not HAS_REDIS_BACKEND, reason="cycles.ledger.redis has not landed yet"),
        ],
    ),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL for a fresh, empty ledger; on Redis, under a key prefix of its own, deleted after."""
    if request.param != "redis":
        yield "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/l.db"
        return
    import redis

    prefix = f"cycles-lg-{uuid.uuid4().hex[:12]}"
    yield f"{REDIS_URL}{'&' if '?' in REDIS_URL else '?'}prefix={prefix}"
    with redis.Redis.from_url(REDIS_URL) as client:
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.delete(key)


@pytest.fixture
def tenant() -> str:
    """A tenant of its own per test, for the budgets and the end-of-test checks."""
    return f"t{uuid.uuid4().hex[:10]}"


def _checked(client: Cycles, tenant: str) -> Iterator[Cycles]:
    yield client
    assert_settled(client, f"tenant:{tenant}")  # the shared end-of-test check (spend: in each test)
    client.close()


@pytest.fixture
def cy(backend: str, tenant: str) -> Iterator[Cycles]:
    """A client per test; after it the ledger invariant holds and no reservation is left open."""
    yield from _checked(Cycles(backend), tenant)


@pytest.fixture
def shadow_cy(backend: str, tenant: str) -> Iterator[Cycles]:
    """The same, in shadow mode: nothing is blocked, would-deny decisions land in ``shadow_log``."""
    yield from _checked(Cycles(backend, mode="shadow"), tenant)


@pytest.fixture
def subject(tenant: str) -> Subject:
    return Subject(tenant=tenant)
