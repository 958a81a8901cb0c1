"""Offline fixtures for the CrewAI adapter: real crews driven by a scripted ``BaseLLM``.

CrewAI phones home (telemetry, tracing, a version check) and writes under ``$HOME`` unless told
otherwise, so the environment is set here, before anything imports crewai. Every test gets a fresh
ledger (memory, SQLite and Redis); after it the ledger invariant must hold, no reservation may be left
ACTIVE, and no Cycles hook may be left installed in CrewAI's global registries.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

_HOME = tempfile.mkdtemp(prefix="cycles-crewai-tests-")
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
os.environ.update(
    {
        "CREWAI_DISABLE_TELEMETRY": "true",
        "CREWAI_DISABLE_TRACKING": "true",
        "OTEL_SDK_DISABLED": "true",
        "CREWAI_TRACING_ENABLED": "false",
        "CREWAI_DISABLE_VERSION_CHECK": "true",
        "HOME": _HOME,
        "CREWAI_STORAGE_DIR": os.path.join(_HOME, "crewai-storage"),
    }
)

import pytest  # noqa: E402

from cycles import Cycles, Subject  # noqa: E402
from cycles.pricing import register_price  # noqa: E402
from cycles.testing import assert_settled  # noqa: E402

HERE = Path(__file__).parent
HAS_CREWAI = all(importlib.util.find_spec(name) is not None for name in ("crewai", "cycles_crewai"))

if HAS_CREWAI:
    # Import CrewAI once per session, quietly: its import alone raises ImportWarning/DeprecationWarning,
    # which the repo's filterwarnings=error would turn into collection errors.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import crewai  # noqa: F401

        import cycles_crewai  # noqa: F401
else:
    # Not the crewai environment (crewai pins openai<3 and lives in .venvs/crewai): nothing to run.
    collect_ignore_glob = ["test_*.py"]

# Warnings CrewAI raises from its own code while a crew runs; ours still fail the test.
CREWAI_WARNINGS = (
    "ignore::DeprecationWarning:crewai",
    "ignore::PendingDeprecationWarning:crewai",
    "ignore:Pydantic serializer warnings:UserWarning",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            for spec in CREWAI_WARNINGS:
                item.add_marker(pytest.mark.filterwarnings(spec))


MODEL = "canned-model"
TENANT = "acme"


@pytest.fixture(autouse=True)
def _canned_model_price() -> None:
    # 1,000 input + 500 output tokens cost exactly $0.30; an estimate at 1,024 max output tokens is
    # a little over $0.41 (plus the prompt).
    register_price(MODEL, input_per_mtok=100, output_per_mtok=400)


def ledger_url(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if kind == "redis":
        from tests.redis.backend import fresh_redis_url

        return fresh_redis_url(request)  # a fresh key prefix; fails (never skips) without Redis
    return "memory://" if kind == "memory" else f"sqlite:///{tmp_path}/l.db"


@pytest.fixture(params=["memory", "sqlite", "redis"])
def cy(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cycles]:
    client = Cycles(ledger_url(request.param, tmp_path, request))
    yield client
    assert_settled(client, f"tenant:{TENANT}")  # the shared end-of-test check (spend: in each test)
    client.close()


@pytest.fixture
def subject() -> Subject:
    return Subject(tenant=TENANT)


@pytest.fixture(autouse=True)
def _no_hooks_left_behind() -> Iterator[None]:
    yield
    if importlib.util.find_spec("crewai") is None:
        return
    from crewai.hooks import InterceptionPoint, get_hooks

    from cycles_crewai import CyclesHooks

    hooks = [hook for point in InterceptionPoint for hook in get_hooks(point)]
    left = [hook for hook in hooks if isinstance(getattr(hook, "__self__", None), CyclesHooks)]
    assert left == [], f"Cycles hooks left installed: {left}"
