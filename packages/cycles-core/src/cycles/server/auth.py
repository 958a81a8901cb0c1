"""Who is calling: a tenant (``X-Cycles-API-Key``) or an operator (``X-Admin-API-Key``).

Verified keys are remembered for ``cache_ttl_s`` (by digest, never in plain text) so the hot path
costs no store round trip. A revocation made through this server takes effect here at once; one
made through another server sharing the store takes effect here within ``cache_ttl_s``. Failed
lookups are not cached, so a key created elsewhere works on its first use.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from dataclasses import dataclass

from starlette.datastructures import Headers

from cycles.errors import InvalidRequest, Unauthorized
from cycles.server.keys import KeyInfo, KeyStore, key_digest, permission_granted

__all__ = ["ADMIN_HEADER", "API_KEY_HEADER", "AuthFailed", "Authenticator", "Principal", "key_id_prefix"]

API_KEY_HEADER = "x-cycles-api-key"
ADMIN_HEADER = "x-admin-api-key"
_MAX_KEY_LEN = 512
_KEY_ID_PREFIX = re.compile(r"cyc_([0-9a-f]{16})_")


def key_id_prefix(presented: str | None) -> str | None:
    """The key id of a presented key that parses as ``cyc_<key_id>_...`` (the public part; never
    the secret), whatever follows it."""
    m = _KEY_ID_PREFIX.match(presented or "")
    return m.group(1) if m else None


class AuthFailed(Unauthorized):
    """A refused credential, with why (the spec's ``failure_reason`` values: ``missing_key``,
    ``invalid_format``, ``key_not_found``, ``key_revoked``, ``key_expired``, ``invalid_admin_key``,
    ``admin_disabled``) for the audit log. On the wire it stays ``401 UNAUTHORIZED``: the reason is
    recorded, not told. ``tenant`` is set when the key is one of ours (revoked or expired: the caller
    holds the whole key)."""

    def __init__(self, message: str, reason: str, *, key_id: str | None = None, tenant: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.key_id = key_id
        self.tenant = tenant


@dataclass(frozen=True, slots=True)
class Principal:
    """``tenant`` is the effective tenant; ``None`` with ``admin`` set means the operator.
    ``permissions`` and ``scope_filter`` are a tenant key's (see ``cycles.server.keys.KeyInfo``)."""

    tenant: str | None
    key_id: str | None = None
    admin: bool = False
    permissions: frozenset[str] = frozenset()
    scope_filter: tuple[str, ...] = ()

    def may(self, needed: str) -> bool:
        """Whether this caller holds ``needed`` (the admin key holds every permission; a tenant
        key's admin:* permissions count as the spec's wildcards)."""
        return self.admin or permission_granted(self.permissions, needed)


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
            raise AuthFailed("missing X-Cycles-API-Key header", "missing_key")
        if len(api_key) > _MAX_KEY_LEN:
            raise AuthFailed("invalid API key", "invalid_format", key_id=key_id_prefix(api_key))
        digest = key_digest(api_key)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        info: KeyInfo | None = await self.keys.identify(api_key)
        if info is None or not info.active:
            self._cache.pop(digest, None)
            raise _refused(api_key, info)
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
            raise AuthFailed(
                "the admin API is disabled: start the server with --admin-key or CYCLES_ADMIN_KEY", "admin_disabled"
            )
        if not presented:
            raise AuthFailed("missing X-Admin-API-Key header", "missing_key")
        # Compare digests: equal length whatever was presented, so timing says nothing.
        if not hmac.compare_digest(hashlib.sha256(presented.encode()).digest(), self._admin_digest):
            raise AuthFailed("invalid admin key", "invalid_admin_key")
        return ADMIN

    async def tenant_or_admin(self, headers: Headers) -> Principal:
        """The dual-auth endpoints (list / get / release): an admin key if one is presented."""
        if headers.get(ADMIN_HEADER) and not headers.get(API_KEY_HEADER):
            return self.admin(headers)
        return await self.tenant(headers)


def _refused(api_key: str, info: KeyInfo | None) -> AuthFailed:
    message = "invalid, revoked or expired API key"  # one message: the reason is audited, not told
    key_id = key_id_prefix(api_key)
    if info is None:
        return AuthFailed(message, "key_not_found" if key_id else "invalid_format", key_id=key_id)
    reason = "key_revoked" if info.revoked_at_ms is not None else "key_expired"
    return AuthFailed(message, reason, key_id=info.key_id, tenant=info.tenant)


def require_tenant_param(principal: Principal, tenant: str | None) -> str | None:
    """listReservations under AdminKeyAuth: the tenant filter is required (spec wording)."""
    if principal.admin and not tenant:
        raise InvalidRequest("tenant query parameter is required when using admin key authentication")
    return tenant
