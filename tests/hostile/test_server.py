"""Why 5: a server that sheds abuse -- connections that never finish their headers, more
connections than it should hold, a ledger outage, odd query strings."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest

from cycles.errors import LedgerUnavailable
from cycles.ledger.base import open_ledger
from cycles.server.app import create_app
from cycles.server.keys import MemoryKeyStore
from cycles.server.shedding import ShedH11Protocol, protocol_class, uvicorn_options
from cycles.server.testing import ServerThread

from .conftest import ADMIN_KEY, MALLORY, Http, UrlFactory
from .requests import reserve, reserve_body

DOWN = "redis://127.0.0.1:1/0?retries=0&socket_connect_timeout=0.5&socket_timeout=0.5"
GUARD_S = 30  # a hang guard, never a measurement: every wait below ends on an event long before


class QuickHeaders(ShedH11Protocol):
    header_timeout_s = 0.3
    max_connections = 50


class FewConnections(ShedH11Protocol):
    header_timeout_s = 60.0
    max_connections = 3


@pytest.fixture
def shedding_server(make_url: UrlFactory, request: pytest.FixtureRequest) -> Iterator[ServerThread]:
    protocol = request.param if hasattr(request, "param") else QuickHeaders
    app = create_app(make_url(), admin_key=ADMIN_KEY, keys=MemoryKeyStore(), sweep_interval_s=0)
    with ServerThread(app, http=protocol) as thread:
        yield thread


def _connect(server: ServerThread) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=GUARD_S)
    return sock


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_a_connection_that_never_finishes_its_headers_is_closed(shedding_server: ServerThread) -> None:
    sock = _connect(shedding_server)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # ... and never the blank line
    assert _closed_by_server(sock)
    sock.close()


def test_an_idle_kept_alive_connection_that_trickles_is_closed(shedding_server: ServerThread) -> None:
    sock = _connect(shedding_server)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"200 OK" in sock.recv(4096)
    sock.sendall(b"GET /hea")  # a byte of the next request cancels uvicorn's keep-alive timer
    assert _closed_by_server(sock)
    sock.close()


def test_a_complete_request_is_served(shedding_server: ServerThread) -> None:
    r = httpx.get(shedding_server.url + "/healthz", timeout=GUARD_S)
    assert r.status_code == 200


@pytest.mark.parametrize("shedding_server", [FewConnections], indirect=True)
def test_connections_beyond_the_limit_are_shed(shedding_server: ServerThread) -> None:
    held = [_connect(shedding_server) for _ in range(3)]
    for sock in held:  # make sure the server has accepted them
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200 OK" in sock.recv(4096)
    extra = _connect(shedding_server)
    assert _closed_by_server(extra)
    extra.close()
    held[0].close()
    for sock in held[1:]:
        sock.close()


def test_serve_uses_the_shedding_protocol() -> None:
    options = uvicorn_options("h11")
    assert options["http"] is ShedH11Protocol and options["limit_concurrency"] > 0
    assert options["timeout_keep_alive"] > 0
    assert issubclass(protocol_class("auto"), ShedH11Protocol.__mro__[1])  # the shedding mixin, either parser


async def test_a_ledger_outage_is_503_with_retry_after() -> None:
    app = create_app(DOWN, keys=MemoryKeyStore(), sweep_interval_s=0)
    key = (await app.server.keys.create(MALLORY)).api_key
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post("/v1/reservations", json=reserve_body(MALLORY), headers={"X-Cycles-API-Key": key})
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"] == "INTERNAL_ERROR" and "retry" in r.json()["message"]
        assert "127.0.0.1" not in r.text
        r = await c.get("/v1/reservations", headers={"X-Cycles-API-Key": key})
        assert r.status_code == 503
    await app.server.aclose()


def test_a_ledger_outage_is_typed_in_process() -> None:
    ledger = open_ledger(DOWN)
    try:
        with pytest.raises(LedgerUnavailable):
            ledger.reserve(reserve(MALLORY))
    finally:
        ledger.close()


@pytest.mark.parametrize("limit", ["١٢", "²", "1e3", "-1", "0", "100001", " 12 x", "1" * 40])
async def test_sweep_limit_takes_ascii_digits_only(http: Http, limit: str) -> None:
    r = await http.client.post("/admin/sweep", params={"limit": limit}, headers=http.admin)
    assert r.status_code == 400 and r.json()["error"] == "INVALID_REQUEST"


async def test_sweep_limit_accepts_a_number(http: Http) -> None:
    r = await http.client.post("/admin/sweep", params={"limit": "12"}, headers=http.admin)
    assert r.status_code == 200 and r.json() == {"expired": 0}
