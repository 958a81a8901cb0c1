"""Fixtures of the Redis backend tests: a fresh key prefix on the shared server per test, and a
private redis-server for the tests that disrupt the server (SCRIPT FLUSH, BUSY, restarts)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import REDIS_URL
from tests.redis.backend import drop_prefix, new_prefix, redis_url, require_redis


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.redis)


@pytest.fixture
def prefix() -> Iterator[str]:
    require_redis()
    p = new_prefix()
    yield p
    drop_prefix(p)


@pytest.fixture
def url(prefix: str) -> str:
    return redis_url(prefix)


@pytest.fixture
def raw() -> Iterator[redis.Redis]:
    """A plain client of the shared test server, to look at keys directly."""
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PrivateRedis:
    """A redis-server of our own, which tests may flush, block, stop and restart."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._clients: list[redis.Redis] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A client for the test's own use; closed when the server stops."""
        client = redis.Redis(port=self.port, socket_timeout=10)
        self._clients.append(client)
        return client

    def start(self, *args: str) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.workdir),
                "--save",
                "",
                "--appendonly",
                "no",
                *args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:  # readiness probe, not a fixed sleep
            try:
                with redis.Redis(port=self.port, socket_timeout=10) as probe:
                    probe.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def stop(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server binary not installed (needed for tests that disrupt the server)")
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
