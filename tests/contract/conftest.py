"""The backend contract suite's fixtures.

Every test in tests/contract/ runs once per backend in ``BACKENDS``. A backend factory returns a
``Backend`` for a fresh, empty ledger (and may register cleanup with ``request.addfinalizer``). A
third party can run the suite against its own backend by adding an entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cycles import AsyncCycles, Cycles
from cycles.testing import assert_ledger_invariant


@dataclass
class Backend:
    """How to open clients on one fresh ledger. ``spec`` is picklable, for child processes."""

    name: str
    url: str
    routed: bool = False  # http: the client needs a key per tenant (see http_backend.py)
    extra: dict[str, Any] = field(default_factory=dict)

    def open(self, **options: Any) -> Cycles:
        return open_backend((self.name, self.url, self.routed), **options)

    def open_async(self, **options: Any) -> AsyncCycles:
        if self.routed:
            from .http_backend import TenantRoutedLedger

            return AsyncCycles(ledger=TenantRoutedLedger(self.url), **options)
        return AsyncCycles(self.url, **options)

    @property
    def spec(self) -> tuple[str, str, bool]:
        return (self.name, self.url, self.routed)


def open_backend(spec: tuple[str, str, bool], **options: Any) -> Cycles:
    _name, url, routed = spec
    if routed:
        from .http_backend import TenantRoutedLedger

        return Cycles(ledger=TenantRoutedLedger(url), **options)
    return Cycles(url, **options)


BackendFactory = Callable[[Path, pytest.FixtureRequest], Backend]


def _memory(tmp: Path, request: pytest.FixtureRequest) -> Backend:
    return Backend("memory", "memory://")


def _sqlite(tmp: Path, request: pytest.FixtureRequest) -> Backend:
    return Backend("sqlite", f"sqlite:///{tmp}/ledger.db")


def _http(tmp: Path, request: pytest.FixtureRequest) -> Backend:
    from .http_backend import start_server

    server = start_server(f"sqlite:///{tmp}/served.db")
    request.addfinalizer(server.stop)
    return Backend("http", server.url, routed=True)


def _redis(tmp: Path, request: pytest.FixtureRequest) -> Backend:
    from tests.redis.backend import fresh_redis_url

    return Backend("redis", fresh_redis_url(request))  # a fresh key prefix; fails (never skips) without Redis


BACKENDS: dict[str, BackendFactory] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "redis": _redis,
    "http": _http,
}

#: Backends whose state is shared between processes (so multi-process tests make sense).
MULTI_PROCESS = {"sqlite", "redis", "http"}


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def ledger(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Backend:
    return BACKENDS[backend](tmp_path, request)


@pytest.fixture
def cy(ledger: Backend) -> Iterator[Cycles]:
    client = ledger.open()
    try:
        yield client
        assert_ledger_invariant(client)
    finally:
        client.close()
