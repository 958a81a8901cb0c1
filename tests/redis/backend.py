"""The Redis backend for test suites: a fresh key prefix per test on the real server, and cleanup
of exactly the keys that prefix owns (never FLUSHDB: the server may be shared).

The contract suite adds it to its table of backends (tests/contract/conftest.py)::

    def _redis(tmp: Path, request: pytest.FixtureRequest) -> Backend:
        from tests.redis.backend import fresh_redis_url

        return Backend("redis", fresh_redis_url(request))

    BACKENDS = {..., "redis": _redis}

A Redis that does not answer fails the test (it does not skip): CI must run the Redis contract.
"""

from __future__ import annotations

import uuid
from urllib.parse import urlsplit

import pytest
import redis

from tests.conftest import REDIS_URL


def _client() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=10)


def require_redis() -> None:
    """Fail (not skip) when the test Redis is down."""
    client = _client()
    try:
        client.ping()
    except redis.RedisError as exc:
        where = urlsplit(REDIS_URL).netloc
        pytest.fail(f"Redis at {where} (CYCLES_TEST_REDIS_URL) is not reachable: {exc}", pytrace=False)
    finally:
        client.close()


def new_prefix() -> str:
    return f"test-{uuid.uuid4().hex}"


def drop_prefix(prefix: str) -> int:
    """Delete the keys under ``prefix`` (and only those)."""
    client = _client()
    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            deleted += client.unlink(*batch)
            batch.clear()
    if batch:
        deleted += client.unlink(*batch)
    client.close()
    return deleted


def redis_url(prefix: str, **query: str) -> str:
    extra = "".join(f"&{k}={v}" for k, v in query.items())
    sep = "&" if "?" in REDIS_URL else "?"
    return f"{REDIS_URL}{sep}prefix={prefix}{extra}"


def fresh_redis_url(request: pytest.FixtureRequest) -> str:
    """A ledger URL on a key prefix of its own, whose keys are deleted when the test ends."""
    require_redis()
    prefix = new_prefix()
    request.addfinalizer(lambda: drop_prefix(prefix))
    return redis_url(prefix)
