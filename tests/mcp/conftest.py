"""Fixtures for cycles-mcp: a real upstream MCP server, the real proxy as a subprocess, real clients.

Every test talks MCP over a real transport: stdio pipes to a ``cycles-mcp`` process, or streamable
HTTP to one listening on 127.0.0.1 (port 0). The upstream logs each call it receives to a file, so a
test can prove a refused call never reached it. The ledger is a SQLite file (or a Redis prefix)
that the test reads directly.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import IO, Any

import pytest
from mcp import Client, StdioServerParameters

UPSTREAM = Path(__file__).with_name("upstream_server.py")
ASKING = Path(__file__).with_name("asking_server.py")  #: asks its client things; tools that declare their kind


class Env:
    """One test's world: its ledger URL, the upstream's call log, policy files."""

    def __init__(self, tmp: Path, ledger: str) -> None:
        self.tmp = tmp
        self.ledger = ledger
        self.log = tmp / "upstream-calls.jsonl"
        self.server_stderr: list[str] = []  #: what an HTTP server process wrote to stderr after it listened
        self.upstream = UPSTREAM  #: the upstream server script the proxy runs

    def upstream_command(self) -> list[str]:
        return [sys.executable, str(self.upstream)]

    def environ(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ, UPSTREAM_LOG=str(self.log), PYTHONUNBUFFERED="1", **extra)
        env.pop("CYCLES_URL", None)
        return env

    def policy(self, body: str, name: str = "policy.toml") -> Path:
        path = self.tmp / name
        path.write_text(f'ledger = "{self.ledger}"\n{body}', encoding="utf-8")
        return path

    def upstream_calls(self) -> list[dict[str, object]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text(encoding="utf-8").splitlines()]

    def proxy_args(self, policy: Path, *extra: str) -> list[str]:
        return ["-m", "cycles_mcp.cli", "proxy", "--policy", str(policy), *extra, "--", *self.upstream_command()]

    @asynccontextmanager
    async def stdio_client(
        self, args: Sequence[str], mode: str = "legacy", callbacks: dict[str, Any] | None = None, **env: str
    ) -> AsyncIterator[Client]:
        """A client over stdio; ``mode="legacy"`` is the handshake era Claude Desktop, Claude Code and
        Cursor speak, ``"auto"`` lets the SDK pick the 2026-07-28 protocol. ``callbacks`` answer what
        the server asks (``sampling_callback``, ...)."""
        params = StdioServerParameters(command=sys.executable, args=list(args), env=self.environ(**env))
        async with Client(params, mode=mode, read_timeout_seconds=60, **(callbacks or {})) as client:
            yield client

    @contextmanager
    def http_server(self, args: Sequence[str], **env: str) -> Iterator[str]:
        """Start ``python ARGS --transport http --port 0``; yield its URL once it listens."""
        cmd = [sys.executable, *args]
        if "--" in cmd:
            at = cmd.index("--")
            cmd[at:at] = ["--transport", "http", "--port", "0"]
        else:
            cmd += ["--transport", "http", "--port", "0"]
        proc = subprocess.Popen(cmd, env=self.environ(**env), stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        drain: threading.Thread | None = None
        try:
            url = _wait_for_url(proc)
            drain = threading.Thread(target=self._drain, args=(proc.stderr,), daemon=True)
            drain.start()
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if drain is not None:
                drain.join(timeout=10)
            proc.stderr.close()

    def _drain(self, stream: IO[str]) -> None:
        for line in stream:
            self.server_stderr.append(line)


def _wait_for_url(proc: subprocess.Popen[str]) -> str:
    assert proc.stderr is not None
    seen: list[str] = []
    for line in proc.stderr:  # readiness probe: the server prints its URL once its socket listens
        seen.append(line)
        found = re.search(r"listening on (http://\S+)", line)
        if found:
            return found.group(1)
    raise AssertionError(f"the server exited ({proc.wait()}) before listening:\n{''.join(seen)}")


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path, f"sqlite:///{tmp_path / 'ledger.db'}")


@pytest.fixture(params=["sqlite", "redis"])
def any_env(request: pytest.FixtureRequest, tmp_path: Path) -> Env:
    if request.param == "redis":
        from tests.redis.backend import fresh_redis_url

        return Env(tmp_path, fresh_redis_url(request))
    return Env(tmp_path, f"sqlite:///{tmp_path / 'ledger.db'}")
