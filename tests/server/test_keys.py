"""The API key store on every backend: keys map to one tenant, are stored hashed, are shown
once, and can be revoked; several stores over one backend see the same keys."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from starlette.datastructures import Headers

from cycles.errors import InvalidRequest, NotFound, Unauthorized
from cycles.server.auth import Authenticator
from cycles.server.keys import KeyStore, MemoryKeyStore, key_digest, open_key_store

from ..conftest import REDIS_URL

StoreFactory = Callable[[], KeyStore]


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """A factory of stores over one backend (memory: the same instance)."""
    opened: list[KeyStore] = []
    shared = MemoryKeyStore()
    sep = "&" if "?" in REDIS_URL else "?"
    url = {
        "memory": "memory://",
        "sqlite": f"sqlite:///{tmp_path}/keys.db",
        "redis": f"{REDIS_URL}{sep}prefix=cycles-test-{uuid.uuid4().hex}",
    }[request.param]

    def factory() -> KeyStore:
        if request.param == "memory":
            return shared
        store = open_key_store(url)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        if request.param == "redis":  # leave the shared database as we found it
            keys = [k async for k in store._redis.scan_iter(match=store.prefix + "*")]  # type: ignore[attr-defined]
            if keys:
                await store._redis.delete(*keys)  # type: ignore[attr-defined]
        await store.aclose()


async def test_create_verify_revoke(make_store: StoreFactory) -> None:
    store = make_store()
    new = await store.create("acme", name="ci")
    assert new.api_key.startswith(f"cyc_{new.info.key_id}_")
    info = await store.verify(new.api_key)
    assert info is not None and info.tenant == "acme" and info.name == "ci"
    assert await store.verify(new.api_key[:-1] + ("a" if new.api_key[-1] != "a" else "b")) is None
    assert await store.verify("cyc_" + new.info.key_id + "_" + "0" * 64) is None
    assert await store.verify("") is None
    assert await store.verify("nonsense") is None
    revoked = await store.revoke(new.info.key_id)
    assert revoked.revoked_at_ms is not None
    assert await store.verify(new.api_key) is None
    assert (await store.revoke(new.info.key_id)).revoked_at_ms == revoked.revoked_at_ms  # idempotent
    with pytest.raises(NotFound):
        await store.revoke("0" * 16)


async def test_stores_over_one_backend_share_keys(make_store: StoreFactory) -> None:
    a, b = make_store(), make_store()
    new = await a.create("acme")
    info = await b.verify(new.api_key)
    assert info is not None and info.tenant == "acme"
    await b.revoke(new.info.key_id)
    assert await a.verify(new.api_key) is None


async def test_list_by_tenant(make_store: StoreFactory) -> None:
    store = make_store()
    k1 = await store.create("acme")
    k2 = await store.create("globex")
    await store.revoke(k2.info.key_id)
    assert [k.key_id for k in await store.list(tenant="acme")] == [k1.info.key_id]
    all_keys = {k.key_id: k for k in await store.list()}
    assert {k1.info.key_id, k2.info.key_id} <= set(all_keys)
    assert all_keys[k2.info.key_id].active is False
    assert "api_key" not in all_keys[k1.info.key_id].to_wire()


async def test_bad_tenants_are_refused(make_store: StoreFactory) -> None:
    store = make_store()
    for tenant in ("", "a/b", "x" * 129, "tenant:acme"):
        with pytest.raises(InvalidRequest):
            await store.create(tenant)


def test_digest_is_sha256() -> None:
    assert key_digest("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


async def test_authenticator_cache_and_revocation_elsewhere(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/keys.db"
    here, elsewhere = open_key_store(url), open_key_store(url)
    try:
        new = await here.create("acme")
        headers = Headers({"x-cycles-api-key": new.api_key})
        cached = Authenticator(here, None, cache_ttl_s=3600)
        uncached = Authenticator(here, None, cache_ttl_s=0)
        assert (await cached.tenant(headers)).tenant == "acme"
        assert (await uncached.tenant(headers)).key_id == new.info.key_id
        await elsewhere.revoke(new.info.key_id)  # another server revokes it
        assert (await cached.tenant(headers)).tenant == "acme"  # until the cache entry lapses
        with pytest.raises(Unauthorized):
            await uncached.tenant(headers)
        cached.forget(new.info.key_id)
        with pytest.raises(Unauthorized):
            await cached.tenant(headers)
    finally:
        await here.aclose()
        await elsewhere.aclose()


def test_key_store_urls() -> None:
    with pytest.raises(InvalidRequest):
        open_key_store("http://elsewhere:7878")
    with pytest.raises(InvalidRequest):
        open_key_store("sqlite://")
