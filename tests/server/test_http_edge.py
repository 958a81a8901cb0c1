"""The edge of the wire: correlation headers, malformed input, unknown routes, failures.

Bad input must be a 400 INVALID_REQUEST with a message that names the problem -- never a 500 and
never a state change."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from cycles.errors import LedgerUnavailable
from cycles.ledger.base import ThreadedAsyncLedger
from cycles.ledger.memory import MemoryLedger
from cycles.models import Amount, Unit
from cycles.server import create_app
from cycles.server.keys import MemoryKeyStore

from .conftest import validating_hooks
from .helpers import amount, commit_body, key, release_body, reserve_body

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
OTHER_TRACE = "0af7651916cd43dd8448eb211c80319c"


@pytest.mark.usefixtures("funded")
@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01"}, TRACE),
        ({"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01", "X-Cycles-Trace-Id": OTHER_TRACE}, TRACE),
        ({"traceparent": "garbage", "X-Cycles-Trace-Id": OTHER_TRACE}, OTHER_TRACE),
        ({"traceparent": f"00-{'0' * 32}-00f067aa0ba902b7-01", "X-Cycles-Trace-Id": OTHER_TRACE}, OTHER_TRACE),
        ({"traceparent": f"00-{TRACE}-{'0' * 16}-01", "X-Cycles-Trace-Id": OTHER_TRACE}, OTHER_TRACE),
        ({"traceparent": f"01-{TRACE}-00f067aa0ba902b7-01", "X-Cycles-Trace-Id": OTHER_TRACE}, OTHER_TRACE),
        ({"traceparent": f"00-{TRACE.upper()}-00f067aa0ba902b7-01", "X-Cycles-Trace-Id": OTHER_TRACE}, OTHER_TRACE),
        ({"X-Cycles-Trace-Id": OTHER_TRACE.upper()}, None),
        ({"X-Cycles-Trace-Id": "0" * 32}, None),
        ({}, None),
    ],
)
async def test_trace_id_precedence(
    client: httpx.AsyncClient, auth: dict[str, str], headers: dict[str, str], expected: str | None
) -> None:
    for r in (
        await client.post("/v1/reservations", json=reserve_body(), headers={**auth, **headers}),
        await client.post("/v1/reservations", json={"bad": 1}, headers={**auth, **headers}),
        await client.get("/v1/reservations/nope", headers=headers),  # 401: still traced
    ):
        trace = r.headers["x-cycles-trace-id"]
        if expected is not None:
            assert trace == expected
        else:
            assert trace not in (OTHER_TRACE.upper(), "0" * 32)
        if r.status_code >= 400:
            assert r.json()["trace_id"] == trace


async def test_request_ids_are_unique(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    ids = {(await client.get("/v1/reservations", headers=auth)).headers["x-request-id"] for _ in range(20)}
    assert len(ids) == 20


def _reserve(**changes: Any) -> bytes:
    body = reserve_body()
    for path, value in changes.items():
        node = body
        *parents, leaf = path.split("__")
        for p in parents:
            node = node[p]
        if value is _DROP:
            del node[leaf]
        else:
            node[leaf] = value
    return json.dumps(body).encode()


_DROP = object()
BAD_BODIES: dict[str, bytes] = {
    "malformed JSON": b'{"idempotency_key": "k", "subject": ',
    "not JSON at all": b"hello",
    "empty body": b"",
    "JSON array": b"[1, 2, 3]",
    "JSON null": b"null",
    "deeply nested": b'{"metadata":' + b"[" * 5000 + b"]" * 5000 + b"}",
    "missing idempotency_key": _reserve(idempotency_key=_DROP),
    "missing subject": _reserve(subject=_DROP),
    "missing estimate": _reserve(estimate=_DROP),
    "empty subject": _reserve(subject={}),
    "subject with only dimensions": _reserve(subject={"dimensions": {"team": "x"}}),
    "amount as string": _reserve(estimate__amount="1000"),
    "amount as float": _reserve(estimate__amount=10.5),
    "amount as bool": _reserve(estimate__amount=True),
    "negative amount": _reserve(estimate__amount=-1),
    "amount beyond int64": _reserve(estimate__amount=2**63),
    "unknown unit": _reserve(estimate__unit="EUR"),
    "ttl too short": _reserve(ttl_ms=10),
    "ttl as string": _reserve(ttl_ms="60000"),
    "grace too long": _reserve(grace_period_ms=60_001),
    "unknown overage policy": _reserve(overage_policy="YOLO"),
    "dry_run as string": _reserve(dry_run="true"),
    "unknown field": _reserve(surprise=1),
    "10k-char idempotency key": _reserve(idempotency_key="k" * 10_000),
    "10k-char tenant": _reserve(subject__tenant="a" * 10_000),
    "10k-char action kind": _reserve(action__kind="k" * 10_000),
    "10k-char action name": _reserve(action__name="n" * 10_000),
    "10k-char dimension": _reserve(subject__dimensions={"d": "v" * 10_000}),
    "tenant with a delimiter": _reserve(subject__tenant="acme/evil"),
    "subject as list": _reserve(subject=["acme"]),
    "metadata as string": _reserve(metadata="x"),
    "oversize body": _reserve(metadata={"blob": "x" * 70_000}),
    "invalid UTF-8": b'{"idempotency_key": "\xff\xfe"}',
}


@pytest.mark.usefixtures("funded")
@pytest.mark.parametrize("case", list(BAD_BODIES))
async def test_bad_input_is_400_and_changes_nothing(client: httpx.AsyncClient, auth: dict[str, str], case: str) -> None:
    r = await client.post(
        "/v1/reservations", content=BAD_BODIES[case], headers={**auth, "content-type": "application/json"}
    )
    assert r.status_code == 400, (case, r.text[:300])
    body = r.json()
    assert body["error"] == "INVALID_REQUEST"
    assert 10 < len(body["message"]) <= 600
    assert len(r.content) < 8192  # the input is never echoed back
    listing = await client.get("/v1/reservations", headers=auth)
    assert listing.json()["reservations"] == []
    balances = await client.get("/v1/balances", params={"tenant": "acme"}, headers=auth)
    assert balances.json()["balances"][0]["reserved"]["amount"] == 0


@pytest.mark.usefixtures("funded")
async def test_messages_name_the_fields(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    r = await client.post("/v1/reservations", content=BAD_BODIES["negative amount"], headers=auth)
    assert "estimate.amount" in r.json()["message"]
    r = await client.post("/v1/reservations", content=BAD_BODIES["unknown unit"], headers=auth)
    assert "estimate.unit" in r.json()["message"]
    assert r.json()["details"]["errors"][0]["field"] == "estimate.unit"
    r = await client.post("/v1/reservations", content=BAD_BODIES["missing subject"], headers=auth)
    assert "subject" in r.json()["message"]


@pytest.mark.usefixtures("funded")
async def test_bad_input_on_every_post(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    rid = (await client.post("/v1/reservations", json=reserve_body(), headers=auth)).json()["reservation_id"]
    for path in (
        "/v1/decide",
        "/v1/events",
        f"/v1/reservations/{rid}/commit",
        f"/v1/reservations/{rid}/release",
        f"/v1/reservations/{rid}/extend",
    ):
        for bad in (
            b"{",
            b"{}",
            b'{"idempotency_key": 5}',
            json.dumps({"idempotency_key": "k", "x": "y" * 10_000}).encode(),
        ):
            r = await client.post(path, content=bad, headers=auth)
            assert r.status_code == 400, (path, bad[:30], r.text[:200])
    r = await client.post(f"/v1/reservations/{rid}/commit", json=commit_body(-5), headers=auth)
    assert r.status_code == 400
    r = await client.get(f"/v1/reservations/{rid}", headers=auth)
    assert r.json()["status"] == "ACTIVE"


@pytest.mark.usefixtures("funded")
async def test_chunked_oversize_body_is_400(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"x" * 1024

    r = await client.post("/v1/reservations", content=chunks(), headers=auth)
    assert r.status_code == 400
    assert "limit" in r.json()["message"]


async def test_unknown_route_and_method(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    r = await client.get("/v2/reservations", headers=auth)
    assert r.status_code == 404
    assert r.json()["error"] == "NOT_FOUND"
    r = await client.delete("/v1/reservations", headers=auth)
    assert r.status_code == 405
    assert "GET" in r.headers["allow"] and "POST" in r.headers["allow"]
    assert r.json()["error"] == "INVALID_REQUEST"
    r = await client.get("/v1/reservations/a/b/c", headers=auth)
    assert r.status_code == 404
    for path in ("/v1/reservations/", "/v1/balances/", "/v1/reservations//commit"):
        r = await client.get(path, headers=auth)
        assert r.status_code == 404, path
    r = await client.get("/v1/evidence/" + "a" * 64)
    assert r.status_code == 404
    r = await client.get("/v1/evidence/nothex")
    assert r.status_code == 400
    r = await client.get("/v1/.well-known/cycles-jwks.json")
    assert r.status_code == 404


class Exploding(ThreadedAsyncLedger):
    def __init__(self, exc: Exception) -> None:
        super().__init__(MemoryLedger())
        self.exc = exc

    async def reserve(self, req: Any, *, tenant: str | None = None) -> Any:
        raise self.exc


@pytest.mark.parametrize(
    ("exc", "hint", "status"),
    [
        (RuntimeError("secret internal detail at /srv/db"), "internal error", 500),
        (LedgerUnavailable("connection refused to 10.0.0.7:6379"), "retry with the same idempotency key", 503),
    ],
)
async def test_failures_are_5xx_without_internals(spec: Any, exc: Exception, hint: str, status: int) -> None:
    """An unexpected failure is 500; an unreachable ledger is 503 with Retry-After (retryable)."""
    keys = MemoryKeyStore()
    app = create_app(ledger=Exploding(exc), keys=keys, sweep_interval_s=0)
    api_key = (await keys.create("acme")).api_key
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t", event_hooks=validating_hooks(spec)
    ) as c:
        r = await c.post("/v1/reservations", json=reserve_body(), headers={"X-Cycles-API-Key": api_key})
    assert r.status_code == status
    assert r.json()["error"] == "INTERNAL_ERROR"
    assert hint in r.json()["message"]
    assert ("retry-after" in r.headers) is (status == 503)
    assert "10.0.0.7" not in r.text and "/srv/db" not in r.text and "Traceback" not in r.text
    assert r.json()["request_id"] == r.headers["x-request-id"]


async def test_expiry_is_410(spec: Any) -> None:
    now = [1_700_000_000_000]
    keys = MemoryKeyStore()
    ledger = ThreadedAsyncLedger(MemoryLedger(clock=lambda: now[0]))
    app = create_app(ledger=ledger, keys=keys, sweep_interval_s=0)
    await ledger.set_budget("tenant:acme", Amount(unit=Unit.USD_MICROCENTS, amount=10_000))
    auth = {"X-Cycles-API-Key": (await keys.create("acme")).api_key}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t", event_hooks=validating_hooks(spec)
    ) as c:
        rid = (
            await c.post("/v1/reservations", json=reserve_body(ttl_ms=1000, grace_period_ms=0), headers=auth)
        ).json()["reservation_id"]
        other = (await c.post("/v1/reservations", json=reserve_body(ttl_ms=1000), headers=auth)).json()[
            "reservation_id"
        ]
        now[0] += 1001
        r = await c.post(
            f"/v1/reservations/{other}/extend", json={"idempotency_key": key(), "extend_by_ms": 1000}, headers=auth
        )
        assert r.status_code == 410  # extend: beyond expires_at_ms
        r = await c.post(f"/v1/reservations/{other}/commit", json=commit_body(500), headers=auth)
        assert r.status_code == 200  # commit: still within the grace period
        now[0] += 5000
        r = await c.post(f"/v1/reservations/{rid}/release", json=release_body(), headers=auth)
        assert r.status_code == 410
        assert r.json()["error"] == "RESERVATION_EXPIRED"
        r = await c.get(f"/v1/reservations/{rid}", headers=auth)
        assert r.status_code == 410
        r = await c.get("/v1/reservations", params={"status": "EXPIRED"}, headers=auth)
        assert [x["reservation_id"] for x in r.json()["reservations"]] == [rid]
        r = await c.get("/v1/balances", params={"tenant": "acme"}, headers=auth)
        assert r.json()["balances"][0]["reserved"] == amount(0)
    await app.server.aclose()
