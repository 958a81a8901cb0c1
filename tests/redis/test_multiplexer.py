"""The async ledger's auto-pipelining transport: every caller gets its own reply, in any order of
completion, through cancellations, lost connections and stalls."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis
import redis.asyncio
from redis import exceptions as redis_errors

from cycles import Action, AsyncCycles, Subject, tokens
from cycles.ledger.redis import _PUSH, _Incomplete, _Multiplexer, _pack, _parse, open_async_redis
from tests.conftest import REDIS_URL
from tests.redis.conftest import PrivateRedis


def parse_all(data: bytes) -> list[object]:
    buf, pos, out = bytearray(data), 0, []
    while pos < len(buf):
        value, pos = _parse(buf, pos)
        out.append(value)
    return out


def test_parser_reads_resp2_and_resp3_replies() -> None:
    replies = parse_all(
        b"$5\r\nhello\r\n$-1\r\n+OK\r\n:42\r\n(12345678901234567890\r\n_\r\n#t\r\n,1.5\r\n"
        b"*2\r\n$1\r\na\r\n*1\r\n:1\r\n~1\r\n$1\r\nm\r\n%1\r\n+k\r\n:2\r\n=7\r\ntxt:abc\r\n"
        b"|1\r\n+ttl\r\n:3\r\n$1\r\nx\r\n"
    )
    assert replies == [
        b"hello",
        None,
        b"OK",
        42,
        12345678901234567890,
        None,
        True,
        1.5,
        [b"a", [1]],
        [b"m"],
        {b"k": 2},
        b"abc",
        b"x",
    ]


def test_parser_maps_error_replies_to_redis_py_exceptions() -> None:
    noscript, loading, busy, other, blob = parse_all(
        b"-NOSCRIPT No matching script\r\n-LOADING Redis is loading\r\n"
        b"-BUSY Redis is busy running a script\r\n-ERR wrong\r\n!5\r\nERR x\r\n"
    )
    assert isinstance(noscript, redis_errors.NoScriptError)
    assert isinstance(loading, redis_errors.BusyLoadingError)
    assert type(busy) is redis_errors.ResponseError and str(busy).startswith("BUSY")
    assert type(other) is redis_errors.ResponseError and type(blob) is redis_errors.ResponseError


def test_parser_waits_for_the_whole_reply() -> None:
    data = b"*3\r\n$11\r\nhello world\r\n:7\r\n%1\r\n+a\r\n$0\r\n\r\n"
    for cut in range(len(data)):
        with pytest.raises(_Incomplete):
            _parse(bytearray(data[:cut]), 0)
    assert _parse(bytearray(data), 0) == ([b"hello world", 7, {b"a": b""}], len(data))


def test_push_messages_answer_no_command() -> None:
    data = b">2\r\n+invalidate\r\n*1\r\n$1\r\nk\r\n"
    assert _parse(bytearray(data), 0) == (_PUSH, len(data))


def _mux(url: str, retries: int = 2, **kwargs: object) -> tuple[redis.asyncio.Redis, _Multiplexer]:
    client = redis.asyncio.Redis.from_url(url, **kwargs)  # type: ignore[arg-type]
    return client, _Multiplexer(client.connection_pool, retries)


async def test_every_concurrent_caller_gets_its_own_reply() -> None:
    client, mux = _mux(REDIS_URL)
    replies = await asyncio.gather(*(mux.execute(_pack(("ECHO", f"m{i}"))) for i in range(500)))
    assert replies == [f"m{i}".encode() for i in range(500)]
    non_ascii = await mux.execute(_pack(("ECHO", "débit ✓")))
    assert non_ascii.decode() == "débit ✓"
    await mux.aclose()
    await client.aclose()


async def test_a_cancelled_caller_does_not_shift_the_replies(private_redis: PrivateRedis) -> None:
    client, mux = _mux(private_redis.url)
    slow = asyncio.ensure_future(mux.execute(_pack(("EVAL", "local t = redis.call('TIME') return 'slow'", "0"))))
    after = [asyncio.ensure_future(mux.execute(_pack(("ECHO", f"a{i}")))) for i in range(20)]
    await asyncio.sleep(0)
    slow.cancel()
    assert await asyncio.gather(*after) == [f"a{i}".encode() for i in range(20)]
    assert await mux.execute(_pack(("ECHO", "next"))) == b"next"
    await mux.aclose()
    await client.aclose()


async def test_commands_in_flight_on_a_killed_connection_are_resent(private_redis: PrivateRedis) -> None:
    admin = private_redis.client()
    client, mux = _mux(private_redis.url, retries=3)
    await mux.execute(_pack(("PING",)))
    stop = threading.Event()

    def killer() -> None:
        while not stop.is_set():
            admin.client_kill_filter(_type="normal", skipme=True)
            time.sleep(0.005)

    t = threading.Thread(target=killer)
    t.start()
    try:
        results = await asyncio.gather(
            *(mux.execute(_pack(("INCR", "counter"))) for _ in range(300)), return_exceptions=True
        )
    finally:
        stop.set()
        t.join()
    answered = [r for r in results if isinstance(r, int)]
    failed = [r for r in results if not isinstance(r, int)]
    assert all(isinstance(e, redis_errors.ConnectionError) for e in failed)
    assert len(answered) == 300 - len(failed) and len(set(answered)) == len(answered)
    assert await mux.execute(_pack(("ECHO", "alive"))) == b"alive"
    await mux.aclose()
    await client.aclose()


async def test_a_stalled_server_times_out_and_the_next_command_reconnects(
    private_redis: PrivateRedis,
) -> None:
    private_redis.stop()
    private_redis.start("--enable-debug-command", "yes")
    client, mux = _mux(private_redis.url, retries=0, socket_timeout=0.2)
    await mux.execute(_pack(("PING",)))
    staller = private_redis.client()
    staller.ping()  # connected beforehand: the stall starts as soon as the thread runs
    stall = threading.Thread(target=lambda: staller.execute_command("DEBUG", "SLEEP", "1.0"))
    stall.start()
    time.sleep(0.2)
    with pytest.raises(redis_errors.TimeoutError):
        await mux.execute(_pack(("PING",)))
    stall.join()
    assert await mux.execute(_pack(("ECHO", "back"))) == b"back"
    await mux.aclose()
    await client.aclose()


def test_one_ledger_across_event_loops(url: str) -> None:
    ledger = open_async_redis(url)
    acy = AsyncCycles(ledger=ledger)

    async def use() -> int:
        await acy.budgets.set("tenant:acme", tokens(100))
        r = await acy.reserve(Subject(tenant="acme"), Action("llm.completion", "m"), tokens(1))
        await acy.release(r.reservation_id or "")
        return len((await acy.list_reservations(tenant="acme")).reservations)

    assert asyncio.run(use()) == 1
    assert asyncio.run(use()) == 2  # a new loop: the multiplexer reconnects for it
    asyncio.run(ledger.aclose())
