"""Fixtures for the HTTP client tests: a scripted fake protocol server and both ledger shells.

The fake server is a Starlette app in a real uvicorn thread on a free port (ready once its
``/healthz`` answers, no fixed sleeps). It knows nothing of Cycles accounting: each test scripts
the replies it needs per route (an error body, a 5xx then a success, a reply slower than the
client's timeout, a 429 with Retry-After, ...) and every request is recorded, so the client is
checked against the protocol text, not against our own server. Request bodies the client sends
are validated against the spec's request schemas, and the canned replies against its response
schemas (``test_fake_server_replies_conform``).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cycles.ledger.http import AsyncHttpLedger, HttpLedger

API_KEY = "test-api-key"
ADMIN_KEY = "test-admin-key"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"

# ---- the protocol spec, as data -------------------------------------------------------------

_URI = "urn:cycles:protocol-v0"


def _spec_path() -> Path:
    env = os.environ.get("CYCLES_PROTOCOL_SPEC")
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[2]
    for candidate in (root / "spec", root.parent / "shared" / "spec"):
        if (candidate / "cycles-protocol-v0.yaml").exists():
            return candidate / "cycles-protocol-v0.yaml"
    pytest.fail("cycles-protocol-v0.yaml not found: set CYCLES_PROTOCOL_SPEC or put shared/spec beside the repo")


@cache
def _spec() -> dict[str, Any]:
    with _spec_path().open() as f:
        data: dict[str, Any] = yaml.safe_load(f)
    return data


@cache
def _validator(schema_name: str) -> Draft202012Validator:
    registry: Registry[Any] = Registry().with_resource(
        _URI, Resource.from_contents(_spec(), default_specification=DRAFT202012)
    )
    return Draft202012Validator({"$ref": f"{_URI}#/components/schemas/{schema_name}"}, registry=registry)


def assert_schema(schema_name: str, instance: Any) -> None:
    """Raise AssertionError with every violation when ``instance`` is not a valid ``schema_name``."""
    errors = sorted(_validator(schema_name).iter_errors(instance), key=lambda e: list(e.path))
    assert not errors, f"not a valid {schema_name}: " + "; ".join(
        f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors
    )


# ---- canned protocol replies ----------------------------------------------------------------

USD = "USD_MICROCENTS"


def amount(value: int) -> dict[str, Any]:
    return {"unit": USD, "amount": value}


def reservation_reply(reservation_id: str = "rsv_1", **extra: Any) -> dict[str, Any]:
    return {
        "decision": "ALLOW",
        "reservation_id": reservation_id,
        "reserved": amount(500),
        "expires_at_ms": 1_900_000_000_000,
        "remaining_ttl_ms": 60_000,
        "scope_path": "tenant:acme",
        "affected_scopes": ["tenant:acme"],
        **extra,
    }


def commit_reply() -> dict[str, Any]:
    return {"status": "COMMITTED", "charged": amount(300), "released": amount(200)}


def release_reply() -> dict[str, Any]:
    return {"status": "RELEASED", "released": amount(500)}


def extend_reply() -> dict[str, Any]:
    return {"status": "ACTIVE", "expires_at_ms": 1_900_000_030_000, "remaining_ttl_ms": 90_000}


def decision_reply() -> dict[str, Any]:
    return {"decision": "DENY", "reason_code": "BUDGET_EXCEEDED", "affected_scopes": ["tenant:acme"]}


def event_reply() -> dict[str, Any]:
    return {"status": "APPLIED", "event_id": "evt_1", "charged": amount(300)}


def balance(scope: str = "tenant:acme") -> dict[str, Any]:
    return {
        "scope": scope,
        "scope_path": scope,
        "remaining": amount(700),
        "reserved": amount(0),
        "spent": amount(300),
        "debt": amount(0),
        "allocated": amount(1000),
    }


def balances_reply() -> dict[str, Any]:
    return {"balances": [balance()], "has_more": False}


def detail_reply(reservation_id: str = "rsv_1") -> dict[str, Any]:
    return {
        "reservation_id": reservation_id,
        "status": "ACTIVE",
        "subject": {"tenant": "acme"},
        "action": {"kind": "llm.completion", "name": "gpt"},
        "reserved": amount(500),
        "created_at_ms": 1_800_000_000_000,
        "expires_at_ms": 1_900_000_000_000,
        "scope_path": "tenant:acme",
        "affected_scopes": ["tenant:acme"],
    }


def list_reply() -> dict[str, Any]:
    return {"reservations": [detail_reply()], "next_cursor": "c2", "has_more": True}


def error_body(code: str, message: str = "no", **extra: Any) -> dict[str, Any]:
    return {"error": code, "message": message, "request_id": "req_1", "trace_id": TRACE_ID, **extra}


# ---- the fake server ------------------------------------------------------------------------


@dataclass
class Seen:
    """One request as the server received it."""

    method: str
    raw_path: str  # as sent, percent-encoding kept
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: bytes
    at: float  # time.monotonic() on arrival

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    json: Any = None
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    delay_s: float = 0.0  # answer this late (the client may have given up by then)

    async def respond(self, seen: Seen) -> Response:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        content = self.body if self.body is not None else json.dumps(self.json).encode()
        return Response(content, status_code=self.status, headers=self.headers, media_type=self.content_type)


Handler = Callable[[Seen], Awaitable[Response]] | Reply


class FakeProtocolServer:
    """Scripted replies per ``(method, path)``; the last scripted reply repeats."""

    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self._script: dict[tuple[str, str], list[Handler]] = {}
        self._lock = threading.Lock()
        self.url = ""

    def reset(self) -> None:
        with self._lock:
            self.requests = []
            self._script = {}

    def script(self, method: str, path: str, *replies: Handler) -> None:
        with self._lock:
            self._script[(method, path)] = list(replies)

    def seen(self, method: str | None = None, path: str | None = None) -> list[Seen]:
        with self._lock:
            return [
                s
                for s in self.requests
                if (method is None or s.method == method) and (path is None or s.raw_path == path)
            ]

    async def app(self, request: Request) -> Response:
        scope = request.scope
        raw_path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        query: dict[str, list[str]] = {}
        for k, v in request.query_params.multi_items():
            query.setdefault(k, []).append(v)
        seen = Seen(
            request.method,
            raw_path,
            query,
            {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]},
            await request.body(),
            time.monotonic(),
        )
        with self._lock:
            self.requests.append(seen)
            queue = self._script.get((request.method, scope["path"]))
            handler = None if not queue else (queue.pop(0) if len(queue) > 1 else queue[0])
        if handler is None:
            body = error_body("NOT_FOUND", f"fake server: nothing scripted for {request.method} {scope['path']}")
            return Response(json.dumps(body).encode(), status_code=404, media_type="application/json")
        if isinstance(handler, Reply):
            return await handler.respond(seen)
        return await handler(seen)


async def _healthz(request: Request) -> Response:
    return Response(b"{}", media_type="application/json")


class ServerThread:
    """uvicorn in a daemon thread on a socket bound before it starts; ``start`` returns once ready."""

    def __init__(self, app: Any, **config: Any) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, **config))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                if time.monotonic() > deadline or not self._thread.is_alive():
                    raise
            time.sleep(0.01)  # probe interval, bounded by the deadline

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()


def start_fake_server(**config: Any) -> tuple[FakeProtocolServer, ServerThread]:
    fake = FakeProtocolServer()
    app = Starlette(
        routes=[
            Route("/healthz", _healthz, methods=["GET"]),
            Route("/{path:path}", fake.app, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
        ]
    )
    thread = ServerThread(app, **config)
    thread.start()
    fake.url = thread.url
    return fake, thread


@pytest.fixture(scope="session")
def _fake_session() -> Iterator[FakeProtocolServer]:
    fake, thread = start_fake_server()
    try:
        yield fake
    finally:
        thread.stop()


@pytest.fixture
def fake(_fake_session: FakeProtocolServer) -> FakeProtocolServer:
    _fake_session.reset()
    return _fake_session


# ---- the two shells behind one awaitable face -----------------------------------------------


class Client:
    """``await client("reserve", req)`` calls the sync or the async ledger the same way."""

    def __init__(self, kind: str, ledger: HttpLedger | AsyncHttpLedger) -> None:
        self.kind = kind
        self.ledger = ledger

    async def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self.ledger, method)(*args, **kwargs)
        if self.kind == "async":
            result = await result
        return result


#: Fast retries for tests: the policy is the same, only the pauses are short.
FAST = {"backoff_s": 0.001, "max_backoff_s": 0.005}

ClientFactory = Callable[..., Client]


@pytest.fixture(params=["sync", "async"])
async def make_client(request: pytest.FixtureRequest, fake: FakeProtocolServer) -> AsyncIterator[ClientFactory]:
    """``make_client(**options)``: a sync or an async HTTP ledger on the fake server (closed after)."""
    kind: str = request.param
    made: list[Client] = []

    def make(url: str | None = None, **options: Any) -> Client:
        options = {"api_key": API_KEY, **FAST, **options}
        ledger = (HttpLedger if kind == "sync" else AsyncHttpLedger)(url or fake.url, **options)
        client = Client(kind, ledger)
        made.append(client)
        return client

    yield make
    for client in made:
        if isinstance(client.ledger, AsyncHttpLedger):
            await client.ledger.aclose()
        else:
            client.ledger.close()
