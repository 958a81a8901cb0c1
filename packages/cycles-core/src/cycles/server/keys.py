"""API keys: each maps to one tenant. Stored hashed, next to the ledger, so servers share them.

A key reads ``cyc_<key_id>_<secret>``. ``key_id`` (16 hex) is public: it names the key in lists,
logs and ``DELETE /admin/keys/{key_id}``, and is how a presented key is looked up. ``secret`` is
32 random bytes in hex. The store keeps only ``sha256(key)``.

Why SHA-256 and not bcrypt/argon2: slow hashes exist to make guessing *low-entropy* secrets
(passwords) expensive. These keys carry 256 random bits, so no amount of guessing reverses even a
fast hash, and a slow one would cost milliseconds on every request for no gain. The digest is
compared with ``hmac.compare_digest`` so timing reveals nothing about how much of it matched.

Backends, chosen by the ledger's URL (or ``--keys URL``): ``memory://`` (this process only),
``sqlite:///path`` (an ``api_keys`` table in the ledger's own file), ``redis://`` (plain hashes
under ``cycles:apikey:``).
"""

from __future__ import annotations

import abc
import asyncio
import builtins
import dataclasses
import hashlib
import hmac
import json
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from cycles.errors import InvalidRequest, NotFound
from cycles.identifiers import is_identifier
from cycles.ledger.records import iso_ms

__all__ = [
    "DEFAULT_PERMISSIONS",
    "KeyInfo",
    "KeyStore",
    "MemoryKeyStore",
    "NewKey",
    "RedisKeyStore",
    "SqliteKeyStore",
    "key_digest",
    "open_key_store",
    "permission_granted",
]

NEVER = "9999-12-31T23:59:59.999Z"
_KEY = re.compile(r"cyc_([0-9a-f]{16})_[0-9a-f]{64}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")


def key_digest(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _check_tenant(tenant: str) -> None:
    if not is_identifier(tenant):
        raise InvalidRequest("tenant must be 1-128 characters of [a-zA-Z0-9_.-]")


def _check_name(name: str | None) -> None:
    if name is not None and (not isinstance(name, str) or len(name) > 128):
        raise InvalidRequest("name must be a string of at most 128 characters")


def _check_key_id(key_id: str) -> None:
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        raise NotFound(f"API key {key_id[:32]!r} not found")


#: What a key may do when it was created without a permission list (and every key made before
#: keys had permissions): the governance spec's default for tenant keys (createApiKey).
DEFAULT_PERMISSIONS: tuple[str, ...] = (
    "reservations:create",
    "reservations:commit",
    "reservations:release",
    "reservations:extend",
    "reservations:list",
    "balances:read",
    "budgets:read",
    "budgets:write",
    "policies:read",
    "policies:write",
)


#: What the admin permissions a (legacy) tenant key may carry grant, beyond themselves: the spec's
#: NORMATIVE wildcard semantics (admin:read satisfies any *:read, admin:write any *:write, never the
#: other way) and its capabilities table (admin:read views reservations, admin:write manages them);
#: a granular admin:<resource>:read|write satisfies <resource>:read|write.
_WILDCARDS: dict[str, tuple[str, ...]] = {
    "admin:read": ("balances:read", "budgets:read", "policies:read", "webhooks:read", "events:read",
                   "reservations:list", "action_quotas:read"),
    "admin:write": ("budgets:write", "policies:write", "webhooks:write", "reservations:create",
                    "reservations:commit", "reservations:release", "reservations:extend"),
    "admin:budgets:read": ("budgets:read",),
    "admin:budgets:write": ("budgets:write",),
    "admin:policies:read": ("policies:read",),
    "admin:policies:write": ("policies:write",),
    "admin:webhooks:read": ("webhooks:read",),
    "admin:webhooks:write": ("webhooks:write",),
    "admin:events:read": ("events:read",),
}  # fmt: skip


def permission_granted(held: frozenset[str] | tuple[str, ...], needed: str) -> bool:
    """Whether a key holding ``held`` may do what needs ``needed``."""
    return needed in held or any(needed in _WILDCARDS.get(p, ()) for p in held)


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What the store knows about a key (never the key itself).

    ``permissions`` are the governance spec's ``Permission`` values (``None``: the default runtime
    set, ``DEFAULT_PERMISSIONS``); ``scope_filter`` limits the key to budgets at or under those
    scopes (``workspace:prod`` or ``tenant:acme/workspace:prod``; empty: the whole tenant);
    ``expires_at_ms`` makes it stop working at that instant.
    """

    key_id: str
    tenant: str
    created_at_ms: int
    revoked_at_ms: int | None = None
    name: str | None = None
    permissions: tuple[str, ...] | None = None
    scope_filter: tuple[str, ...] = ()
    expires_at_ms: int | None = None
    metadata: dict[str, Any] | None = None
    revoked_reason: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at_ms is None and not self.expired()

    def expired(self, now_ms: int | None = None) -> bool:
        return self.expires_at_ms is not None and self.expires_at_ms <= (_now_ms() if now_ms is None else now_ms)

    @property
    def effective_permissions(self) -> tuple[str, ...]:
        return DEFAULT_PERMISSIONS if self.permissions is None else self.permissions

    @property
    def status(self) -> str:
        if self.revoked_at_ms is not None:
            return "REVOKED"
        return "EXPIRED" if self.expired() else "ACTIVE"

    @property
    def key_prefix(self) -> str:
        return f"cyc_{self.key_id}"

    def attrs_json(self) -> str | None:
        """The governance attributes as stored (``None`` for a key that has none)."""
        attrs = {
            k: v
            for k, v in (
                ("permissions", list(self.permissions) if self.permissions is not None else None),
                ("scope_filter", list(self.scope_filter) or None),
                ("expires_at_ms", self.expires_at_ms),
                ("metadata", self.metadata),
                ("revoked_reason", self.revoked_reason),
            )
            if v is not None
        }
        return json.dumps(attrs, separators=(",", ":"), sort_keys=True) if attrs else None

    def with_attrs(self, raw: str | None) -> KeyInfo:
        if not raw:
            return self
        a = json.loads(raw)
        perms = a.get("permissions")
        return dataclasses.replace(
            self,
            permissions=tuple(perms) if perms is not None else None,
            scope_filter=tuple(a.get("scope_filter") or ()),
            expires_at_ms=a.get("expires_at_ms"),
            metadata=a.get("metadata"),
            revoked_reason=a.get("revoked_reason"),
        )

    def to_spec(self) -> dict[str, Any]:
        """The governance spec's ``ApiKey``. A key without expiry reads ``expires_at`` 9999-12-31
        (the schema requires the field; the spec allows keys that never expire)."""
        out: dict[str, Any] = {
            "key_id": self.key_id,
            "tenant_id": self.tenant,
            "key_prefix": self.key_prefix,
            "permissions": list(self.effective_permissions),
            "status": self.status,
            "created_at": iso_ms(self.created_at_ms),
            "expires_at": iso_ms(self.expires_at_ms) if self.expires_at_ms is not None else NEVER,
        }
        if self.name is not None:
            out["name"] = self.name
        if self.scope_filter:
            out["scope_filter"] = list(self.scope_filter)
        if self.revoked_at_ms is not None:
            out["revoked_at"] = iso_ms(self.revoked_at_ms)
        if self.revoked_reason is not None:
            out["revoked_reason"] = self.revoked_reason
        if self.metadata is not None:
            out["metadata"] = self.metadata
        return out

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key_id": self.key_id, "tenant": self.tenant, "created_at_ms": self.created_at_ms}
        if self.name is not None:
            out["name"] = self.name
        out["status"] = self.status
        if self.revoked_at_ms is not None:
            out["revoked_at_ms"] = self.revoked_at_ms
        return out


@dataclass(frozen=True, slots=True)
class NewKey:
    """A freshly created key. ``api_key`` exists only here: show it once, then it is gone."""

    info: KeyInfo
    api_key: str

    def to_wire(self) -> dict[str, Any]:
        return {**self.info.to_wire(), "api_key": self.api_key}


def _mint(tenant: str, name: str | None, **attrs: Any) -> tuple[KeyInfo, str, str]:
    _check_tenant(tenant)
    _check_name(name)
    key_id = secrets.token_hex(8)
    api_key = f"cyc_{key_id}_{secrets.token_hex(32)}"
    return KeyInfo(key_id, tenant, _now_ms(), None, name, **attrs), api_key, key_digest(api_key)


def _key_id_of(api_key: str) -> str | None:
    m = _KEY.fullmatch(api_key)
    return m.group(1) if m else None


def _matches(stored_digest: str, api_key: str) -> bool:
    return hmac.compare_digest(stored_digest.encode(), key_digest(api_key).encode())


class KeyStore(abc.ABC):
    """Where API keys live. Every method is safe to call from several servers at once."""

    url: str = ""

    async def create(
        self,
        tenant: str,
        *,
        name: str | None = None,
        permissions: tuple[str, ...] | None = None,
        scope_filter: tuple[str, ...] = (),
        expires_at_ms: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> NewKey:
        info, api_key, digest = _mint(
            tenant,
            name,
            permissions=permissions,
            scope_filter=scope_filter,
            expires_at_ms=expires_at_ms,
            metadata=metadata,
        )
        await self._insert(info, digest)
        return NewKey(info, api_key)

    async def verify(self, api_key: str) -> KeyInfo | None:
        """The key's record if it is one of ours, not revoked and not expired, else ``None``."""
        info = await self.identify(api_key)
        return info if info is not None and info.active else None

    async def identify(self, api_key: str) -> KeyInfo | None:
        """The key's record if it is one of ours (whatever its status), else ``None``."""
        key_id = _key_id_of(api_key)
        if key_id is None:
            return None
        found = await self._lookup(key_id)
        if found is None:
            return None
        info, digest = found
        return info if _matches(digest, api_key) else None

    async def revoke(self, key_id: str, *, reason: str | None = None) -> KeyInfo:
        """Revoke a key (idempotent: revoking a revoked key returns it unchanged)."""
        _check_key_id(key_id)
        info = await self._revoke(key_id, _now_ms())
        if info is None:
            raise NotFound(f"API key {key_id} not found")
        if reason and info.revoked_reason is None:
            info = dataclasses.replace(info, revoked_reason=reason[:512])
            await self._update(info)
        return info

    async def update(self, key_id: str, **changes: Any) -> KeyInfo:
        """Change ``name``, ``permissions``, ``scope_filter`` or ``metadata`` of a key."""
        allowed = {"name", "permissions", "scope_filter", "metadata"}
        if not set(changes) <= allowed:
            raise InvalidRequest(f"only {', '.join(sorted(allowed))} of a key can change")
        info = await self.get(key_id)
        if "name" in changes:
            _check_name(changes["name"])
        info = dataclasses.replace(info, **changes)
        await self._update(info)
        return info

    async def get(self, key_id: str) -> KeyInfo:
        _check_key_id(key_id)
        found = await self._lookup(key_id)
        if found is None:
            raise NotFound(f"API key {key_id} not found")
        return found[0]

    async def list(self, *, tenant: str | None = None) -> list[KeyInfo]:
        keys = await self._list(tenant)
        return sorted(keys, key=lambda k: (k.tenant, k.created_at_ms, k.key_id))

    async def ping(self) -> None:
        """Raise if the store cannot be reached (readiness)."""
        await self._lookup("0" * 16)

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    @abc.abstractmethod
    async def _insert(self, info: KeyInfo, digest: str) -> None: ...
    @abc.abstractmethod
    async def _lookup(self, key_id: str) -> tuple[KeyInfo, str] | None: ...
    @abc.abstractmethod
    async def _revoke(self, key_id: str, now_ms: int) -> KeyInfo | None: ...
    @abc.abstractmethod
    async def _list(self, tenant: str | None) -> builtins.list[KeyInfo]: ...
    @abc.abstractmethod
    async def _update(self, info: KeyInfo) -> None:
        """Write ``name`` and the governance attributes of an existing key."""


class MemoryKeyStore(KeyStore):
    """Keys of one process (pairs with the ``memory://`` ledger, and tests)."""

    def __init__(self) -> None:
        self.url = "memory://"
        self._keys: dict[str, tuple[KeyInfo, str]] = {}

    async def _insert(self, info: KeyInfo, digest: str) -> None:
        self._keys[info.key_id] = (info, digest)

    async def _lookup(self, key_id: str) -> tuple[KeyInfo, str] | None:
        return self._keys.get(key_id)

    async def _revoke(self, key_id: str, now_ms: int) -> KeyInfo | None:
        found = self._keys.get(key_id)
        if found is None:
            return None
        info, digest = found
        if info.revoked_at_ms is None:
            info = dataclasses.replace(info, revoked_at_ms=now_ms)
            self._keys[key_id] = (info, digest)
        return info

    async def _update(self, info: KeyInfo) -> None:
        found = self._keys.get(info.key_id)
        if found is not None:
            stored = found[0]
            self._keys[info.key_id] = (dataclasses.replace(info, revoked_at_ms=stored.revoked_at_ms), found[1])

    async def _list(self, tenant: str | None) -> list[KeyInfo]:
        return [info for info, _ in self._keys.values() if tenant is None or info.tenant == tenant]


_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    digest TEXT NOT NULL,
    name TEXT,
    created_at_ms INTEGER NOT NULL,
    revoked_at_ms INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS api_keys_tenant ON api_keys (tenant);
"""
_SQLITE_COLS = "key_id, tenant, created_at_ms, revoked_at_ms, name, digest, attrs"


def _info_from(row: tuple[Any, ...]) -> tuple[KeyInfo, str]:
    return KeyInfo(row[0], row[1], row[2], row[3], row[4]).with_attrs(row[6]), row[5]


class SqliteKeyStore(KeyStore):
    """An ``api_keys`` table in the ledger's SQLite file (WAL: lookups never wait for writers).

    Calls run in a worker thread: a write may wait on the ledger's write lock.
    """

    def __init__(self, path: str, *, busy_timeout_ms: int = 10_000) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"
        if path != ":memory:":
            Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_ms / 1000)
        self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        self._db.execute("PRAGMA journal_mode=WAL")
        with self._lock:
            self._db.executescript(_SQLITE_SCHEMA)
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(api_keys)").fetchall()}
            if "attrs" not in columns:  # keys made before permissions: they keep the defaults
                try:
                    self._db.execute("ALTER TABLE api_keys ADD COLUMN attrs TEXT")
                except sqlite3.OperationalError as exc:  # another process added it first
                    if "duplicate column" not in str(exc):
                        raise

    def _run(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    async def _call(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return await asyncio.to_thread(self._run, sql, params)

    async def _insert(self, info: KeyInfo, digest: str) -> None:
        await self._call(
            "INSERT INTO api_keys (key_id, tenant, digest, name, created_at_ms, revoked_at_ms, attrs) "
            "VALUES (?,?,?,?,?,NULL,?)",
            (info.key_id, info.tenant, digest, info.name, info.created_at_ms, info.attrs_json()),
        )

    async def _update(self, info: KeyInfo) -> None:
        await self._call(
            "UPDATE api_keys SET name=?, attrs=? WHERE key_id=?", (info.name, info.attrs_json(), info.key_id)
        )

    async def _lookup(self, key_id: str) -> tuple[KeyInfo, str] | None:
        rows = await self._call(f"SELECT {_SQLITE_COLS} FROM api_keys WHERE key_id=?", (key_id,))
        return _info_from(rows[0]) if rows else None

    async def _revoke(self, key_id: str, now_ms: int) -> KeyInfo | None:
        await self._call(
            "UPDATE api_keys SET revoked_at_ms=? WHERE key_id=? AND revoked_at_ms IS NULL", (now_ms, key_id)
        )
        found = await self._lookup(key_id)
        return found[0] if found else None

    async def _list(self, tenant: str | None) -> list[KeyInfo]:
        if tenant is None:
            rows = await self._call(f"SELECT {_SQLITE_COLS} FROM api_keys")
        else:
            rows = await self._call(f"SELECT {_SQLITE_COLS} FROM api_keys WHERE tenant=?", (tenant,))
        return [_info_from(r)[0] for r in rows]

    async def aclose(self) -> None:
        with self._lock:
            self._db.close()


class RedisKeyStore(KeyStore):
    """Keys as Redis hashes ``<prefix>:{!keys}:apikey:<key_id>`` plus the set ``<prefix>:{!keys}:ids``.

    ``<prefix>`` is the ledger URL's ``?prefix=`` (default ``cycles``), so keys sit beside the
    ledger they guard; the ``{!keys}`` hash tag keeps them in one cluster slot (``?cluster=true``),
    apart from every tenant's slot. Other query parameters go to redis-py if it knows them.
    """

    _REDIS_PARAMS = frozenset(
        {
            "db",
            "username",
            "password",
            "socket_timeout",
            "socket_connect_timeout",
            "health_check_interval",
            "client_name",
            "protocol",
            "ssl_cert_reqs",
            "ssl_ca_certs",
            "ssl_certfile",
            "ssl_keyfile",
        }
    )

    def __init__(self, url: str, *, prefix: str | None = None) -> None:
        try:
            import redis.asyncio as aioredis
            from redis.asyncio.cluster import RedisCluster
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ImportError(
                f"the redis:// key store needs an optional dependency: pip install 'cycles-core[redis]' ({exc})"
            ) from exc
        parts = urlsplit(url)
        query = parse_qsl(parts.query)
        options = dict(query)
        base = prefix if prefix is not None else options.get("prefix", "cycles")
        if not base or "{" in base or "}" in base:
            raise InvalidRequest(f"invalid Redis key prefix {base!r}: non-empty, without braces")
        self.prefix = f"{base}:{{!keys}}:"
        kept = urlencode([(k, v) for k, v in query if k in self._REDIS_PARAMS])
        self.url = urlunsplit((parts.scheme, parts.netloc, parts.path, kept, ""))
        if options.get("cluster", "").lower() in ("1", "true", "yes"):
            self._redis: Any = RedisCluster.from_url(self.url, decode_responses=True)
        else:
            self._redis = aioredis.from_url(self.url, decode_responses=True)

    def _key(self, key_id: str) -> str:
        return f"{self.prefix}apikey:{key_id}"

    @property
    def _ids(self) -> str:
        return f"{self.prefix}ids"

    @staticmethod
    def _from_hash(key_id: str, h: dict[str, str]) -> tuple[KeyInfo, str]:
        revoked = h.get("revoked_at_ms")
        info = KeyInfo(key_id, h["tenant"], int(h["created_at_ms"]), int(revoked) if revoked else None, h.get("name"))
        return info.with_attrs(h.get("attrs")), h["digest"]

    async def _insert(self, info: KeyInfo, digest: str) -> None:
        fields = {"tenant": info.tenant, "digest": digest, "created_at_ms": str(info.created_at_ms)}
        if info.name is not None:
            fields["name"] = info.name
        attrs = info.attrs_json()
        if attrs is not None:
            fields["attrs"] = attrs
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(self._key(info.key_id), mapping=fields)
        pipe.sadd(self._ids, info.key_id)
        await pipe.execute()

    async def _lookup(self, key_id: str) -> tuple[KeyInfo, str] | None:
        h = await self._redis.hgetall(self._key(key_id))
        return self._from_hash(key_id, h) if h else None

    async def _revoke(self, key_id: str, now_ms: int) -> KeyInfo | None:
        key = self._key(key_id)
        if not await self._redis.exists(key):
            return None
        await self._redis.hsetnx(key, "revoked_at_ms", str(now_ms))  # first revocation wins
        found = await self._lookup(key_id)
        return found[0] if found else None

    async def _update(self, info: KeyInfo) -> None:
        key = self._key(info.key_id)
        pipe = self._redis.pipeline(transaction=True)
        if info.name is None:
            pipe.hdel(key, "name")
        else:
            pipe.hset(key, "name", info.name)
        attrs = info.attrs_json()
        if attrs is None:
            pipe.hdel(key, "attrs")
        else:
            pipe.hset(key, "attrs", attrs)
        await pipe.execute()

    async def _list(self, tenant: str | None) -> list[KeyInfo]:
        ids = sorted(await self._redis.smembers(self._ids))
        out: list[KeyInfo] = []
        for i in range(0, len(ids), 500):
            pipe = self._redis.pipeline(transaction=False)
            for key_id in ids[i : i + 500]:
                pipe.hgetall(self._key(key_id))
            for key_id, h in zip(ids[i : i + 500], await pipe.execute(), strict=True):
                if h:
                    info = self._from_hash(key_id, h)[0]
                    if tenant is None or info.tenant == tenant:
                        out.append(info)
        return out

    async def ping(self) -> None:
        await self._redis.ping()

    async def aclose(self) -> None:
        await self._redis.aclose()


def open_key_store(url: str) -> KeyStore:
    """The key store for a ledger URL (or a dedicated ``--keys`` URL)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "memory":
        return MemoryKeyStore()
    if scheme == "sqlite":
        raw = url[len("sqlite://") :].split("?", 1)[0]
        if not raw.startswith("/") or len(raw) < 2:
            raise InvalidRequest(f"sqlite URL needs a path: sqlite:///keys.db or sqlite:////abs/keys.db, got {url!r}")
        return SqliteKeyStore(unquote(raw[1:]))
    if scheme in ("redis", "rediss"):
        return RedisKeyStore(url)
    raise InvalidRequest(
        f"cannot keep API keys at {url.split('?', 1)[0]!r}: give --keys memory://, sqlite:///path or redis://host"
    )
