"""``Cycles("http://...")`` / ``AsyncCycles`` over the HTTP ledgers: opening, guards and recovery
scenarios end to end, event-loop changes, and the missing extra."""

from __future__ import annotations

import asyncio
import gc
import json
import sys

import pytest
from starlette.responses import Response

from cycles import Action, AsyncCycles, Cycles, Subject, usd
from cycles.ledger.base import open_async_ledger
from cycles.ledger.http import AsyncHttpLedger, HttpLedger

from .conftest import API_KEY, FakeProtocolServer, Reply, Seen, commit_reply, reservation_reply

SUBJECT = Subject(tenant="acme")
ACTION = Action("llm.completion", "openai:gpt-4o")


def test_cycles_opens_the_http_ledger_with_its_options(fake: FakeProtocolServer) -> None:
    with Cycles(fake.url, api_key=API_KEY, timeout=3.0, retries=4) as cy:
        assert isinstance(cy.ledger, HttpLedger) and cy.url == fake.url
        assert cy.ledger._core.retry.attempts == 5
    acy = AsyncCycles(fake.url + "/", api_key=API_KEY)
    assert isinstance(acy.ledger, AsyncHttpLedger)
    with pytest.raises(TypeError):
        Cycles(fake.url, api_key=API_KEY, no_such_option=1)


class IdempotentCommits:
    """A server-side commit that applies once per idempotency key and replays after that."""

    def __init__(self, first_reply_delay_s: float = 0.0) -> None:
        self.applied: dict[str, bytes] = {}
        self.delay_s = first_reply_delay_s

    async def __call__(self, seen: Seen) -> Response:
        key = seen.json["idempotency_key"]
        if key not in self.applied:
            self.applied[key] = json.dumps(commit_reply()).encode()
            if self.delay_s:
                await asyncio.sleep(self.delay_s)  # the response is "lost": the client has timed out
        return Response(self.applied[key], media_type="application/json")


def test_guard_recovers_a_lost_commit_response_once(fake: FakeProtocolServer) -> None:
    """CR-CORE-001 through the guard: the commit is applied, its response lost, the retry replays."""
    commits = IdempotentCommits(first_reply_delay_s=1.0)
    fake.script("POST", "/v1/reservations", Reply(json=reservation_reply("rsv_g")))
    fake.script("POST", "/v1/reservations/rsv_g/commit", commits)
    cy = Cycles(fake.url, api_key=API_KEY, timeout=0.25, retries=2, heartbeat=False)
    with cy, cy.guard(SUBJECT, ACTION, usd(0.05)) as g:
        g.commit(usd(0.03))
    sent = fake.seen("POST", "/v1/reservations/rsv_g/commit")
    assert len(sent) == 2 and len({s.headers["x-idempotency-key"] for s in sent}) == 1
    assert len(commits.applied) == 1  # settled exactly once


async def test_async_guard_retries_an_ambiguous_commit_with_the_same_key(fake: FakeProtocolServer) -> None:
    """CR-CORE-004 through the async guard: a 200 that breaks the schema is not a success."""
    fake.script("POST", "/v1/reservations", Reply(json=reservation_reply("rsv_a")))
    fake.script(
        "POST", "/v1/reservations/rsv_a/commit", Reply(json={"status": "COMMITTED"}), Reply(json=commit_reply())
    )
    acy = AsyncCycles(fake.url, api_key=API_KEY, retries=1, backoff_s=0.001, heartbeat=False)
    async with acy, acy.guard(SUBJECT, ACTION, usd(0.05)) as g:
        g.commit(usd(0.03))
    sent = fake.seen("POST", "/v1/reservations/rsv_a/commit")
    assert len(sent) == 2 and sent[0].body == sent[1].body


def test_an_async_ledger_survives_a_change_of_event_loop(fake: FakeProtocolServer) -> None:
    """aiohttp sessions belong to one loop; the ledger opens a new one in a new loop and drops
    the old one without leaking sockets or warnings."""
    fake.script("POST", "/v1/reservations", Reply(json=reservation_reply()))
    acy = AsyncCycles(fake.url, api_key=API_KEY)

    async def reserve() -> str | None:
        return (await acy.reserve(SUBJECT, ACTION, usd(0.01))).reservation_id

    assert asyncio.run(reserve()) == "rsv_1"
    assert asyncio.run(reserve()) == "rsv_1"  # a second loop: the first one is closed by now
    asyncio.run(acy.aclose())
    gc.collect()
    assert len(fake.seen()) == 2


async def test_aclose_is_idempotent_and_the_ledger_reopens(fake: FakeProtocolServer) -> None:
    fake.script("POST", "/v1/reservations", Reply(json=reservation_reply()))
    acy = AsyncCycles(fake.url, api_key=API_KEY)
    await acy.reserve(SUBJECT, ACTION, usd(0.01))
    await acy.aclose()
    await acy.aclose()
    await acy.reserve(SUBJECT, ACTION, usd(0.01))
    await acy.aclose()


def test_a_missing_http_extra_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "aiohttp", None)  # import aiohttp now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'cycles-core\[http\]'"):
        AsyncHttpLedger("http://127.0.0.1:1")
    with pytest.raises(ImportError, match=r"pip install 'cycles-core\[http\]'"):
        open_async_ledger("https://cycles.example")
    HttpLedger("http://127.0.0.1:1").close()  # the sync ledger needs only the standard library
