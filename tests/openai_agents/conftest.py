"""Offline fixtures for the OpenAI Agents SDK adapter: the SDK's own ScriptedModel, tracing off.

Every test gets a fresh ledger (memory, SQLite and Redis) and, after it, the ledger invariant is checked
and no reservation may be left ACTIVE.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")

import agents
import pytest
import pytest_asyncio
from agents_fakes import MODEL

from cycles import AsyncCycles
from cycles.pricing import register_price
from cycles.testing import assert_settled_async

agents.set_tracing_disabled(True)


@pytest.fixture(autouse=True)
def _scripted_model_price() -> None:
    register_price(MODEL, input_per_mtok=2.0, output_per_mtok=8.0)


def ledger_url(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if kind == "redis":
        from tests.redis.backend import fresh_redis_url

        return fresh_redis_url(request)  # a fresh key prefix; fails (never skips) without Redis
    return "memory://" if kind == "memory" else f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest_asyncio.fixture(params=["memory", "sqlite", "redis"])
async def cy(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncCycles]:
    client = AsyncCycles(ledger_url(request.param, tmp_path, request))
    yield client
    await assert_settled_async(client, "tenant:acme")  # the shared end-of-test check (spend: in each test)
    await client.aclose()
