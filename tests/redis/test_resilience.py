"""Failures of the Redis server surface as retryable LedgerUnavailable, scripts come back after a
SCRIPT FLUSH or a restart, and a retried commit never charges twice."""

from __future__ import annotations

import threading
import time

import pytest
import redis
from redis import exceptions as redis_errors

from cycles import Action, Cycles, Subject, tokens
from cycles.errors import InternalError, LedgerUnavailable
from cycles.ledger.redis import _unavailable, open_redis
from tests.redis.conftest import PrivateRedis

LLM = Action("llm.completion", "m")
ACME = Subject(tenant="acme", agent="a")


def _scripts_loaded(server: PrivateRedis, cy: Cycles) -> bool:
    from cycles.ledger.redis import _SCRIPTS

    return all(server.client().script_exists(_SCRIPTS[n].sha) for n in ("reserve", "commit"))


def test_script_flush_then_the_next_operation_reloads_the_scripts(private_redis: PrivateRedis) -> None:
    cy = Cycles(private_redis.url)
    cy.budgets.set("tenant:acme", tokens(100))
    r = cy.reserve(ACME, LLM, tokens(10))
    assert _scripts_loaded(private_redis, cy)
    private_redis.client().script_flush()
    cy.commit(r.reservation_id or "", tokens(7))  # NOSCRIPT -> SCRIPT LOAD -> EVALSHA
    assert _scripts_loaded(private_redis, cy)
    b = cy.budgets.get("tenant:acme")
    assert (b.spent and b.spent.amount, b.reserved and b.reserved.amount) == (7, 0)
    private_redis.client().script_flush()
    assert len(cy.list_reservations(tenant="acme").reservations) == 1  # pipelined snapshot reloads too
    cy.close()


def test_a_restarted_server_keeps_its_data_and_gets_the_scripts_again(private_redis: PrivateRedis) -> None:
    private_redis.stop()
    private_redis.start("--appendonly", "yes", "--appendfsync", "always")
    cy = Cycles(private_redis.url)
    cy.budgets.set("tenant:acme", tokens(100))
    r = cy.reserve(ACME, LLM, tokens(10))
    private_redis.stop()
    with pytest.raises(LedgerUnavailable) as info:
        cy.commit(r.reservation_id or "", tokens(4))
    assert info.value.retryable and info.value.http_status == 503
    private_redis.start("--appendonly", "yes", "--appendfsync", "always")  # same port, AOF replayed
    c = cy.commit(r.reservation_id or "", tokens(4))
    assert c.charged.amount == 4
    assert cy.budgets.get("tenant:acme").spent == tokens(4)
    cy.close()


def test_an_unreachable_server_is_ledger_unavailable_quickly() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ledger = open_redis(f"redis://127.0.0.1:{port}/0?retries=1")
    started = time.monotonic()
    with pytest.raises(LedgerUnavailable, match="unavailable"):
        ledger.get_budget("tenant:acme")
    assert time.monotonic() - started < 5
    ledger.close()


def test_a_killed_connection_is_reopened_transparently(private_redis: PrivateRedis) -> None:
    cy = Cycles(private_redis.url)
    cy.budgets.set("tenant:acme", tokens(100))
    private_redis.client().client_kill_filter(_type="normal", skipme=True)
    r = cy.reserve(ACME, LLM, tokens(10))  # the pool notices the dead socket, reconnects, resends
    assert r.reservation_id
    cy.close()


def test_busy_server_is_ledger_unavailable_and_then_works(private_redis: PrivateRedis) -> None:
    admin = private_redis.client()
    admin.config_set("busy-reply-threshold", 50)
    cy = Cycles(private_redis.url)
    cy.budgets.set("tenant:acme", tokens(100))
    spin = (  # busy for 1.5 s: past busy-reply-threshold, so other clients get BUSY replies
        "local function us() local t = redis.call('TIME') return t[1] * 1000000 + t[2] end "
        "local stop = us() + 1500000 while us() < stop do end return 1"
    )
    blocker = threading.Thread(target=lambda: private_redis.client().eval(spin, 0))
    blocker.start()
    time.sleep(0.2)  # let the slow script pass busy-reply-threshold
    try:
        with pytest.raises(LedgerUnavailable, match="BUSY"):
            cy.reserve(ACME, LLM, tokens(10))
    finally:
        blocker.join()
    assert cy.reserve(ACME, LLM, tokens(10)).reservation_id
    cy.close()


def test_a_commit_whose_reply_was_lost_is_retried_without_charging_twice(private_redis: PrivateRedis) -> None:
    private_redis.stop()
    private_redis.start("--enable-debug-command", "yes")
    # No client-side retry, a short timeout: the first commit times out while the server is stalled,
    # and the server still runs it once it wakes. Its outcome is unknown to the caller.
    cy = Cycles(private_redis.url + "?retries=0&socket_timeout=0.2")
    cy.budgets.set("tenant:acme", tokens(100))
    r = cy.reserve(ACME, LLM, tokens(10))
    staller = private_redis.client()
    staller.ping()  # connected beforehand: the stall starts as soon as the thread runs
    stall = threading.Thread(target=lambda: staller.execute_command("DEBUG", "SLEEP", "1.0"))
    stall.start()
    time.sleep(0.2)
    with pytest.raises(LedgerUnavailable) as info:
        cy.commit(r.reservation_id or "", tokens(8), idempotency_key="commit-1")
    assert info.value.retryable
    stall.join()
    retried = cy.commit(r.reservation_id or "", tokens(8), idempotency_key="commit-1")
    assert retried.charged == tokens(8)
    again = cy.commit(r.reservation_id or "", tokens(8), idempotency_key="commit-1")
    assert again == retried
    b = cy.budgets.get("tenant:acme")
    assert (b.spent and b.spent.amount, b.reserved and b.reserved.amount) == (8, 0)
    cy.close()


@pytest.mark.parametrize(
    "exc",
    [
        redis_errors.ConnectionError("Connection reset by peer"),
        redis_errors.TimeoutError("Timeout reading from socket"),
        redis_errors.BusyLoadingError("Redis is loading the dataset in memory"),
        redis_errors.ResponseError("BUSY Redis is busy running a script. You can only call SCRIPT KILL"),
        redis_errors.ReadOnlyError("You can't write against a read only replica."),
        redis_errors.TryAgainError("Multiple keys request during rehashing of slot"),
        redis_errors.ClusterDownError("The cluster is down"),
        redis_errors.MasterDownError("Link with MASTER is down and replica-serve-stale-data is set to 'no'."),
        redis_errors.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
    ],
)
def test_transient_redis_failures_are_retryable_ledger_unavailable(exc: Exception) -> None:
    err = _unavailable(exc, "h:6379")
    assert isinstance(err, LedgerUnavailable) and err.retryable
    assert "h:6379" in str(err) and "idempotency key" in str(err)


def test_a_script_error_is_an_internal_error_not_unavailable() -> None:
    err = _unavailable(redis_errors.ResponseError("ERR user_script:1: Script attempted to access nil"), "h")
    assert isinstance(err, InternalError) and not isinstance(err, LedgerUnavailable)


def test_password_is_masked_in_the_url(url: str) -> None:
    ledger = open_redis("redis://user:s3cret@127.0.0.1:6379/0?prefix=x")
    assert "s3cret" not in ledger.url and "***" in ledger.url
    ledger.close()


def test_redis_client_errors_never_leak_out_of_the_ledger(private_redis: PrivateRedis) -> None:
    cy = Cycles(private_redis.url + "?retries=0")
    cy.budgets.set("tenant:acme", tokens(100))
    private_redis.stop()
    for call in (
        lambda: cy.reserve(ACME, LLM, tokens(1)),
        lambda: cy.budgets.list(),
        lambda: cy.list_reservations(tenant="acme"),
        lambda: cy.sweep(),
    ):
        with pytest.raises(LedgerUnavailable):
            call()
    with pytest.raises(redis.ConnectionError):
        private_redis.client().ping()
    cy.close()
