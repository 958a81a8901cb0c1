"""Connection-level shedding for ``cycles serve``: what uvicorn leaves open.

uvicorn closes a kept-alive connection that stays idle for ``timeout_keep_alive`` seconds, but
a connection that never finishes its request headers -- or sends a byte now and then, which
cancels that timer -- is held forever: 2,000 such sockets cost nothing to a client and a file
descriptor, a buffer and a slot each to the server. These protocol classes add:

- a header timeout: a connection has ``CYCLES_SERVER_HEADER_TIMEOUT_S`` (default 10 s) from its
  opening, or from the end of its previous response, to deliver a complete request head;
- a connection limit: beyond ``CYCLES_SERVER_MAX_CONNECTIONS`` (default 2048) open connections per
  worker a new one is closed at once (clients retry; the ones already in are served).

Request sizes stay bounded as before (``--max-body-bytes``; h11's 16 KiB head limit). Use
``uvicorn_options()`` for the ``uvicorn.Config`` keywords; the classes are module-level so that
``--workers`` processes can import them.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["HEADER_TIMEOUT_S", "KEEP_ALIVE_S", "MAX_CONNECTIONS", "ShedH11Protocol", "uvicorn_options"]

HEADER_TIMEOUT_S = float(os.environ.get("CYCLES_SERVER_HEADER_TIMEOUT_S", "10"))
MAX_CONNECTIONS = int(os.environ.get("CYCLES_SERVER_MAX_CONNECTIONS", "2048"))
#: Idle time allowed between two requests on one connection.
KEEP_ALIVE_S = int(os.environ.get("CYCLES_SERVER_KEEP_ALIVE_S", "5"))


class _Shedding:
    """Mixed into a uvicorn HTTP protocol (which provides the attributes used here)."""

    header_timeout_s = HEADER_TIMEOUT_S
    max_connections = MAX_CONNECTIONS
    _header_timer: asyncio.TimerHandle | None = None
    cycle: Any
    connections: set[Any]
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        if self.max_connections and len(self.connections) > self.max_connections:
            transport.close()
            return
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        if self.header_timeout_s > 0:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_deadline, self.cycle)

    def _header_deadline(self, armed: Any) -> None:
        """No new request began since the timer was armed: the head never arrived in time."""
        self._header_timer = None
        if self.cycle is armed and not self.transport.is_closing():
            self.transport.close()


class ShedH11Protocol(_Shedding, H11Protocol):
    pass


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class ShedHttpToolsProtocol(_Shedding, HttpToolsProtocol):
        pass

    _HTTPTOOLS: type[asyncio.Protocol] | None = ShedHttpToolsProtocol
except ImportError:  # pragma: no cover - httptools is optional
    _HTTPTOOLS = None


def protocol_class(http: str) -> type[asyncio.Protocol]:
    """The shedding protocol for uvicorn's ``--http`` choice (``auto``: httptools when installed)."""
    if http == "httptools" or (http == "auto" and _HTTPTOOLS is not None):
        if _HTTPTOOLS is None:
            raise ImportError("--http httptools needs the httptools package")
        return _HTTPTOOLS
    return ShedH11Protocol


def uvicorn_options(http: str = "auto") -> dict[str, Any]:
    """``uvicorn.Config`` keywords: the shedding protocol, the keep-alive timeout, and uvicorn's own
    concurrency limit (requests beyond it get 503 rather than queueing without bound)."""
    return {
        "http": protocol_class(http),
        "timeout_keep_alive": KEEP_ALIVE_S,
        "limit_concurrency": MAX_CONNECTIONS,
    }
