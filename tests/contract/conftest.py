"""The backend contract suite's fixtures.

Every test in tests/contract/ runs once per backend in ``BACKENDS``. A backend is a factory that
returns a ledger URL for a fresh, empty ledger (and may register cleanup). A third party can run
the suite against its own backend by adding an entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cycles import AsyncCycles, Cycles
from cycles.testing import assert_ledger_invariant

BackendFactory = Callable[[Path, pytest.FixtureRequest], str]


def _memory(tmp: Path, request: pytest.FixtureRequest) -> str:
    return "memory://"


def _sqlite(tmp: Path, request: pytest.FixtureRequest) -> str:
    return f"sqlite:///{tmp}/ledger.db"


BACKENDS: dict[str, BackendFactory] = {
    "memory": _memory,
    "sqlite": _sqlite,
}

#: Backends whose state is shared between processes (so multi-process tests make sense).
MULTI_PROCESS = {"sqlite", "redis", "http"}


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def ledger_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    return BACKENDS[backend](tmp_path, request)


@pytest.fixture
def cy(ledger_url: str) -> Iterator[Cycles]:
    client = Cycles(ledger_url)
    try:
        yield client
        assert_ledger_invariant(client)
    finally:
        client.close()


@pytest.fixture
def acy(ledger_url: str) -> Iterator[AsyncCycles]:
    client = AsyncCycles(ledger_url)
    yield client
