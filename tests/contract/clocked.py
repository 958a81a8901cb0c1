"""A ledger on every backend with a clock the test moves (periods, quota windows).

memory, SQLite and Redis take the clock directly; over HTTP the served ledger (SQLite) runs in
this process with the clock, so the client sees the same time through the wire.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from cycles import Cycles
from cycles.testing import assert_ledger_invariant

from .conftest import Backend


class Clock:
    """Milliseconds since the epoch, moved by the test."""

    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms

    def at(self, *parts: int, tz: str = "UTC") -> None:
        self.ms = at(*parts, tz=tz)

    def advance(self, ms: int) -> None:
        self.ms += ms


def at(*parts: int, tz: str = "UTC") -> int:
    """The instant of a wall time in ``tz``, in ms."""
    return int(datetime(*parts, tzinfo=ZoneInfo(tz)).timestamp() * 1000)  # type: ignore[misc]


@contextmanager
def clocked_client(
    backend: str, ledger: Backend, tmp: Path, request: pytest.FixtureRequest, clock: Clock
) -> Iterator[Cycles]:
    """A client of a fresh ledger on ``clock``; the ledger invariant is checked when the test ends."""
    client = open_clocked(backend, ledger, tmp, request, clock)
    try:
        yield client
        assert_ledger_invariant(client)
    finally:
        client.close()


def open_clocked(backend: str, ledger: Backend, tmp: Path, request: pytest.FixtureRequest, clock: Clock) -> Cycles:
    if backend == "http":
        from .http_backend import TenantRoutedLedger, start_server

        server = start_server(f"sqlite:///{tmp}/clocked.db", clock=clock)
        request.addfinalizer(server.stop)
        return Cycles(ledger=TenantRoutedLedger(server.url))
    return Cycles(ledger.url, clock=clock)
