"""Who is calling: a tenant (``X-Cycles-API-Key``) or an operator (``X-Admin-API-Key``).

Verified keys are remembered for ``cache_ttl_s`` (by digest, never in plain text) so the hot path
costs no store round trip. A revocation made through this server takes effect here at once; one
made through another server sharing the store takes effect here within ``cache_ttl_s``. Failed
lookups are not cached, so a key created elsewhere works on its first use.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass

from starlette.datastructures import Headers

from cycles.errors import InvalidRequest, Unauthorized
from cycles.server.keys import KeyInfo, KeyStore, key_digest

__all__ = ["ADMIN_HEADER", "API_KEY_HEADER", "Authenticator", "Principal"]

API_KEY_HEADER = "x-cycles-api-key"
ADMIN_HEADER = "x-admin-api-key"
_MAX_KEY_LEN = 512


@dataclass(frozen=True, slots=True)
class Principal:
    """``tenant`` is the effective tenant; ``None`` with ``admin`` set means the operator.
    ``permissions`` and ``scope_filter`` are a tenant key's (see ``cycles.server.keys.KeyInfo``)."""

    tenant: str | None
    key_id: str | None = None
    admin: bool = False
    permissions: frozenset[str] = frozenset()
    scope_filter: tuple[str, ...] = ()


ADMIN = Principal(tenant=None, admin=True)


class Authenticator:
    def __init__(self, keys: KeyStore, admin_key: str | None, *, cache_ttl_s: float = 2.0) -> None:
        self.keys = keys
        self._admin_digest = hashlib.sha256(admin_key.encode()).digest() if admin_key else None
        self._ttl = cache_ttl_s
        self._cache: dict[str, tuple[float, Principal]] = {}

    @property
    def admin_enabled(self) -> bool:
        return self._admin_digest is not None

    def forget(self, key_id: str) -> None:
        """Drop a key from the cache (after revoking it here)."""
        for digest, (_, principal) in list(self._cache.items()):
            if principal.key_id == key_id:
                self._cache.pop(digest, None)

    async def tenant(self, headers: Headers) -> Principal:
        api_key = headers.get(API_KEY_HEADER)
        if not api_key:
            raise Unauthorized("missing X-Cycles-API-Key header")
        if len(api_key) > _MAX_KEY_LEN:
            raise Unauthorized("invalid API key")
        digest = key_digest(api_key)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        info: KeyInfo | None = await self.keys.verify(api_key)
        if info is None:
            self._cache.pop(digest, None)
            raise Unauthorized("invalid, revoked or expired API key")
        principal = Principal(
            tenant=info.tenant,
            key_id=info.key_id,
            permissions=frozenset(info.effective_permissions),
            scope_filter=info.scope_filter,
        )
        if self._ttl > 0:
            if len(self._cache) > 10_000:
                self._cache.clear()
            # an expiring key is remembered no longer than it lives
            until = now + self._ttl
            if info.expires_at_ms is not None:
                until = min(until, now + (info.expires_at_ms - time.time() * 1000) / 1000)
            self._cache[digest] = (until, principal)
        return principal

    def admin(self, headers: Headers) -> Principal:
        presented = headers.get(ADMIN_HEADER)
        if self._admin_digest is None:
            raise Unauthorized("the admin API is disabled: start the server with --admin-key or CYCLES_ADMIN_KEY")
        if not presented:
            raise Unauthorized("missing X-Admin-API-Key header")
        # Compare digests: equal length whatever was presented, so timing says nothing.
        if not hmac.compare_digest(hashlib.sha256(presented.encode()).digest(), self._admin_digest):
            raise Unauthorized("invalid admin key")
        return ADMIN

    async def tenant_or_admin(self, headers: Headers) -> Principal:
        """The dual-auth endpoints (list / get / release): an admin key if one is presented."""
        if headers.get(ADMIN_HEADER) and not headers.get(API_KEY_HEADER):
            return self.admin(headers)
        return await self.tenant(headers)


def require_tenant_param(principal: Principal, tenant: str | None) -> str | None:
    """listReservations under AdminKeyAuth: the tenant filter is required (spec wording)."""
    if principal.admin and not tenant:
        raise InvalidRequest("tenant query parameter is required when using admin key authentication")
    return tenant
