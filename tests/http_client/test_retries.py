"""Retries: transport failures, timeouts, 5xx, 429 and ambiguous 2xx are retried with the same
request bytes and idempotency key; nothing else is (client recovery scenarios CR-CORE-001/004)."""

from __future__ import annotations

import asyncio
import select
import socket
import time
from typing import Any

import pytest
from starlette.responses import Response

from cycles.errors import InternalError, LedgerUnavailable, LimitExceeded
from cycles.ledger.http import HttpLedger
from cycles.models import CommitRequest, EventCreateRequest, ReservationCreateRequest

from .conftest import (
    ClientFactory,
    FakeProtocolServer,
    Reply,
    Seen,
    commit_reply,
    error_body,
    event_reply,
    reservation_reply,
    start_fake_server,
)

RESERVE = ReservationCreateRequest.model_validate(
    {
        "idempotency_key": "idem-1",
        "subject": {"tenant": "acme"},
        "action": {"kind": "llm.completion", "name": "m"},
        "estimate": {"unit": "USD_MICROCENTS", "amount": 500},
    }
)
COMMIT = CommitRequest.model_validate(
    {"idempotency_key": "idem-c", "actual": {"unit": "USD_MICROCENTS", "amount": 300}}
)


def _same_request_every_time(seen: list[Seen], key: str) -> None:
    assert len({s.body for s in seen}) == 1, "a retry must re-send the same body"
    assert {s.headers.get("x-idempotency-key") for s in seen} == {key}


async def test_a_5xx_then_success_is_retried_with_the_same_key(
    make_client: ClientFactory, fake: FakeProtocolServer
) -> None:
    fake.script(
        "POST",
        "/v1/reservations",
        Reply(status=503, body=b"upstream busy", content_type="text/plain"),
        Reply(status=500, json=error_body("INTERNAL_ERROR")),
        Reply(json=reservation_reply()),
    )
    result = await make_client(retries=2)("reserve", RESERVE)
    assert result.reservation_id == "rsv_1"
    _same_request_every_time(fake.seen(), "idem-1")
    assert len(fake.seen()) == 3


async def test_persistent_5xx_gives_up_as_ledger_unavailable(
    make_client: ClientFactory, fake: FakeProtocolServer
) -> None:
    fake.script(
        "POST",
        "/v1/reservations",
        Reply(status=502, body=b"<html>bad gateway</html>", content_type="text/html"),
    )
    with pytest.raises(LedgerUnavailable) as info:
        await make_client(retries=3)("reserve", RESERVE)
    err = info.value
    assert err.retryable
    assert err.details["attempts"] == 4 and err.details["http_status"] == 502
    assert "same idempotency key" in str(err)
    assert len(fake.seen()) == 4


@pytest.mark.parametrize("status", [501, 505])
async def test_5xx_that_can_never_work_are_not_retried(
    make_client: ClientFactory, fake: FakeProtocolServer, status: int
) -> None:
    fake.script("POST", "/v1/events", Reply(status=status, json=error_body("INTERNAL_ERROR", "not implemented")))
    event = EventCreateRequest.model_validate(
        {
            **RESERVE.model_dump(include={"subject", "action"}),
            "idempotency_key": "e",
            "actual": {"unit": "TOKENS", "amount": 1},
        }
    )
    with pytest.raises(InternalError):
        await make_client(retries=3)("event", event)
    assert len(fake.seen()) == 1


async def test_a_reply_slower_than_the_timeout_is_retried_with_the_same_key(
    make_client: ClientFactory, fake: FakeProtocolServer
) -> None:
    """CR-CORE-001: the first commit reached the server but its response was lost (the client
    timed out); the retry carries the same key, so the server can answer it from its replay."""
    fake.script(
        "POST",
        "/v1/reservations/rsv_1/commit",
        Reply(json=commit_reply(), delay_s=1.0),
        Reply(json=commit_reply()),
    )
    started = time.monotonic()
    result = await make_client(timeout=0.2, retries=1)("commit", "rsv_1", COMMIT)
    assert result.charged.amount == 300
    assert time.monotonic() - started < 0.9  # it did not wait for the slow reply
    _same_request_every_time(fake.seen(), "idem-c")
    assert len(fake.seen()) == 2


async def test_timeouts_every_time_give_up_as_ledger_unavailable(
    make_client: ClientFactory, fake: FakeProtocolServer
) -> None:
    fake.script("POST", "/v1/reservations", Reply(json=reservation_reply(), delay_s=0.6))
    with pytest.raises(LedgerUnavailable, match="timed out") as info:
        await make_client(timeout=0.15, retries=1)("reserve", RESERVE)
    assert info.value.details["attempts"] == 2


async def test_429_waits_for_retry_after_then_retries(make_client: ClientFactory, fake: FakeProtocolServer) -> None:
    limited = error_body("LIMIT_EXCEEDED", "slow down")
    fake.script(
        "POST",
        "/v1/reservations",
        Reply(status=429, json=limited, headers={"Retry-After": "1", "X-RateLimit-Reset": "1900000000"}),
        Reply(json=reservation_reply()),
    )
    await make_client(retries=1)("reserve", RESERVE)
    first, second = fake.seen()
    assert second.at - first.at >= 1.0, "retried before Retry-After"
    _same_request_every_time([first, second], "idem-1")


async def test_429_beyond_the_wait_limit_surfaces_as_limit_exceeded(
    make_client: ClientFactory, fake: FakeProtocolServer
) -> None:
    limited = error_body("LIMIT_EXCEEDED", "come back in an hour")
    fake.script("POST", "/v1/reservations", Reply(status=429, json=limited, headers={"Retry-After": "3600"}))
    with pytest.raises(LimitExceeded) as info:
        await make_client(retries=5, max_retry_after_s=10)("reserve", RESERVE)
    assert info.value.retry_after_s == 3600 and info.value.retryable
    assert len(fake.seen()) == 1


async def test_429_exhausted_raises_limit_exceeded(make_client: ClientFactory, fake: FakeProtocolServer) -> None:
    fake.script(
        "POST",
        "/v1/reservations",
        Reply(status=429, json=error_body("LIMIT_EXCEEDED"), headers={"Retry-After": "0"}),
    )
    with pytest.raises(LimitExceeded) as info:
        await make_client(retries=2)("reserve", RESERVE)
    assert info.value.details["attempts"] == 3 and info.value.retry_after_s == 0
    assert len(fake.seen()) == 3


async def test_a_throttle_without_an_error_body_is_still_limit_exceeded(
    make_client: ClientFactory, fake: FakeProtocolServer
) -> None:
    fake.script(
        "POST",
        "/v1/reservations",
        Reply(status=429, body=b"Too Many Requests", content_type="text/plain", headers={"Retry-After": "120"}),
    )
    with pytest.raises(LimitExceeded) as info:
        await make_client(max_retry_after_s=5)("reserve", RESERVE)
    assert info.value.retry_after_s == 120 and info.value.details["http_status"] == 429
    assert len(fake.seen()) == 1


async def test_503_retry_after_is_honoured(make_client: ClientFactory, fake: FakeProtocolServer) -> None:
    fake.script(
        "POST",
        "/v1/reservations",
        Reply(status=503, body=b"maintenance", content_type="text/plain", headers={"Retry-After": "1"}),
        Reply(json=reservation_reply()),
    )
    await make_client(retries=1)("reserve", RESERVE)
    first, second = fake.seen()
    assert second.at - first.at >= 1.0


async def test_an_http_date_retry_after_is_ignored(make_client: ClientFactory, fake: FakeProtocolServer) -> None:
    """The protocol allows only delta-seconds; an HTTP-date is invalid and falls back to backoff."""
    fake.script(
        "POST",
        "/v1/reservations",
        Reply(
            status=429,
            body=b"busy",
            content_type="text/plain",
            headers={"Retry-After": "Wed, 21 Oct 2099 07:28:00 GMT"},
        ),
        Reply(json=reservation_reply()),
    )
    started = time.monotonic()
    await make_client(retries=1)("reserve", RESERVE)
    assert time.monotonic() - started < 1.0 and len(fake.seen()) == 2


AMBIGUOUS: list[tuple[str, Reply]] = [
    ("missing a required field", Reply(json={"status": "COMMITTED"})),
    (
        "wrong type",
        Reply(json={"status": "COMMITTED", "charged": {"unit": "USD_MICROCENTS", "amount": "300"}}),
    ),
    ("not JSON", Reply(body=b"<html>ok</html>", content_type="text/html")),
    ("unexpected 2xx status", Reply(status=202, json=commit_reply())),
    ("empty 204", Reply(status=204, body=b"")),
]


@pytest.mark.parametrize("reply", [r for _, r in AMBIGUOUS], ids=[n for n, _ in AMBIGUOUS])
async def test_a_nonconforming_success_is_ambiguous_and_retried(
    make_client: ClientFactory, fake: FakeProtocolServer, reply: Reply
) -> None:
    """CR-CORE-004: only a schema-valid body with the expected status ends a commit."""
    fake.script("POST", "/v1/reservations/rsv_1/commit", reply, Reply(json=commit_reply()))
    result = await make_client(retries=1)("commit", "rsv_1", COMMIT)
    assert result.charged.amount == 300
    _same_request_every_time(fake.seen(), "idem-c")


async def test_an_ambiguous_success_that_persists_is_ledger_unavailable(
    make_client: ClientFactory, fake: FakeProtocolServer
) -> None:
    fake.script("POST", "/v1/reservations/rsv_1/commit", Reply(json={"status": "COMMITTED"}))
    with pytest.raises(LedgerUnavailable, match="does not match the response schema") as info:
        await make_client(retries=2)("commit", "rsv_1", COMMIT)
    assert info.value.details["http_status"] == 200 and info.value.details["attempts"] == 3


async def test_an_event_must_answer_201(make_client: ClientFactory, fake: FakeProtocolServer) -> None:
    event = EventCreateRequest.model_validate(
        {
            "idempotency_key": "e",
            "subject": {"tenant": "acme"},
            "action": {"kind": "k", "name": "n"},
            "actual": {"unit": "USD_MICROCENTS", "amount": 300},
        }
    )
    fake.script("POST", "/v1/events", Reply(status=200, json=event_reply()), Reply(status=201, json=event_reply()))
    assert (await make_client(retries=1)("event", event)).event_id == "evt_1"
    assert len(fake.seen()) == 2


async def test_4xx_is_never_retried(make_client: ClientFactory, fake: FakeProtocolServer) -> None:
    fake.script("POST", "/v1/reservations/rsv_1/commit", Reply(status=410, json=error_body("RESERVATION_EXPIRED")))
    with pytest.raises(Exception, match="RESERVATION_EXPIRED"):
        await make_client(retries=5)("commit", "rsv_1", COMMIT)
    assert len(fake.seen()) == 1


async def test_connection_refused_is_ledger_unavailable(make_client: ClientFactory) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(LedgerUnavailable) as info:
        await make_client(f"http://127.0.0.1:{port}", retries=1, connect_timeout=1)("reserve", RESERVE)
    assert info.value.details["attempts"] == 2 and "reason" in info.value.details


async def test_retries_zero_means_one_attempt(make_client: ClientFactory, fake: FakeProtocolServer) -> None:
    fake.script("POST", "/v1/reservations", Reply(status=503, body=b"no"))
    with pytest.raises(LedgerUnavailable):
        await make_client(retries=0)("reserve", RESERVE)
    assert len(fake.seen()) == 1


async def test_backoff_is_bounded_and_jittered(make_client: ClientFactory, fake: FakeProtocolServer) -> None:
    fake.script("POST", "/v1/reservations", Reply(status=503, body=b"no"))
    started = time.monotonic()
    with pytest.raises(LedgerUnavailable):
        await make_client(retries=4, backoff_s=0.02, max_backoff_s=0.05)("reserve", RESERVE)
    assert time.monotonic() - started < 1.0  # 4 pauses of at most 50 ms each, plus the requests


def test_a_keep_alive_connection_the_server_closed_is_replaced_transparently() -> None:
    """The sync pool reuses sockets; when the server has closed one while it sat idle, the request
    goes out again on a fresh connection without spending a retry."""
    fake, thread = start_fake_server(timeout_keep_alive=1)
    try:
        fake.script("POST", "/v1/reservations", Reply(json=reservation_reply()))
        with HttpLedger(fake.url, api_key="k", retries=0) as ledger:
            ledger.reserve(RESERVE)
            [sock] = ledger._transport._idle  # the pooled connection
            readable, _, _ = select.select([sock], [], [], 5)  # the server's FIN makes it readable
            assert readable, "the server did not close the idle connection"
            ledger.reserve(RESERVE)
        assert len(fake.seen()) == 2
    finally:
        thread.stop()


async def test_many_concurrent_async_requests_share_the_pool(fake: FakeProtocolServer) -> None:
    from cycles.ledger.http import AsyncHttpLedger

    async def reply(seen: Seen) -> Response:
        await asyncio.sleep(0.01)
        return Response(
            (
                b'{"decision":"ALLOW","affected_scopes":["tenant:acme"],"reservation_id":"'
                + seen.json["idempotency_key"].encode()
                + b'"}'
            ),
            media_type="application/json",
        )

    fake.script("POST", "/v1/reservations", reply)
    ledger = AsyncHttpLedger(fake.url, api_key="k", max_connections=8)
    try:
        reqs = [RESERVE.model_copy(update={"idempotency_key": f"k{i}"}) for i in range(64)]
        results = await asyncio.gather(*(ledger.reserve(r) for r in reqs))
    finally:
        await ledger.aclose()
    assert [r.reservation_id for r in results] == [f"k{i}" for i in range(64)]


def test_the_sync_ledger_is_thread_safe(fake: FakeProtocolServer) -> None:
    from concurrent.futures import ThreadPoolExecutor

    fake.script("POST", "/v1/reservations", Reply(json=reservation_reply()))
    with HttpLedger(fake.url, api_key="k") as ledger, ThreadPoolExecutor(8) as pool:
        results: list[Any] = list(pool.map(lambda i: ledger.reserve(RESERVE), range(80)))
    assert len(results) == 80 and len(fake.seen()) == 80
