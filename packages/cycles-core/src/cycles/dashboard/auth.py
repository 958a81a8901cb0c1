"""Dashboard sign-in: the admin key (everything), or a tenant's API key (read-only, that tenant).

The key is checked once, at sign-in, by the server's own ``Authenticator``. The browser then holds
a session cookie: ``base64(json) + "." + HMAC-SHA256``, HttpOnly, SameSite=Strict, 12 hours. The
HMAC key is derived from the admin key, so every worker and every server sharing the admin key
accepts the same cookie; without an admin key it is random per process. A tenant session is
re-checked against the key store on every request (a revoked key signs its sessions out).
Changes (freeze, fund, release) need an admin session and the ``HX-Request`` header, which a
cross-site form cannot send.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.requests import Request

from cycles.errors import CyclesError, Forbidden, Unauthorized
from cycles.server.auth import ADMIN_HEADER, API_KEY_HEADER, Authenticator

__all__ = ["COOKIE", "Session", "SessionSigner"]

COOKIE = "cycles_dashboard"
LIFETIME_S = 12 * 3600


@dataclass(frozen=True, slots=True)
class Session:
    admin: bool
    tenant: str | None
    key_id: str | None
    expires: int

    @property
    def who(self) -> str:
        return "admin" if self.admin else f"tenant {self.tenant} (read-only)"


class SessionSigner:
    def __init__(self, admin_key: str | None) -> None:
        seed = ("cycles-dashboard:" + admin_key).encode() if admin_key else secrets.token_bytes(32)
        self._key = hashlib.sha256(seed).digest()

    def _mac(self, payload: bytes) -> str:
        return base64.urlsafe_b64encode(hmac.new(self._key, payload, hashlib.sha256).digest()).decode().rstrip("=")

    def dump(self, session: Session) -> str:
        body = json.dumps({"a": session.admin, "t": session.tenant, "k": session.key_id, "e": session.expires})
        payload = base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")
        return payload + "." + self._mac(payload.encode())

    def load(self, cookie: str | None) -> Session | None:
        if not cookie or "." not in cookie or len(cookie) > 2048:
            return None
        payload, mac = cookie.rsplit(".", 1)
        if not hmac.compare_digest(mac, self._mac(payload.encode())):
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            session = Session(bool(data["a"]), data["t"], data["k"], int(data["e"]))
        except (ValueError, KeyError, TypeError):
            return None
        return session if session.expires > time.time() else None


async def sign_in(auth: Authenticator, key: str) -> Session:
    """Admin key first (constant-time), else an API key; Unauthorized if neither."""
    key = key.strip()
    if not key:
        raise Unauthorized("enter the admin key or an API key")
    expires = int(time.time()) + LIFETIME_S
    if auth.admin_enabled:
        try:
            auth.admin(Headers({ADMIN_HEADER: key}))
            return Session(True, None, None, expires)
        except Unauthorized:
            pass
    principal = await auth.tenant(Headers({API_KEY_HEADER: key}))
    return Session(False, principal.tenant, principal.key_id, expires)


async def current(request: Request, signer: SessionSigner, auth: Authenticator) -> Session:
    session = signer.load(request.cookies.get(COOKIE))
    if session is None:
        raise Unauthorized("sign in")
    if not session.admin and session.key_id:
        try:
            info = await auth.keys.get(session.key_id)
        except CyclesError:
            raise Unauthorized("the key of this session is gone") from None
        if not info.active:
            raise Unauthorized("the key of this session was revoked")
    return session


def require_change(request: Request, session: Session) -> None:
    if not session.admin:
        raise Forbidden("this session is read-only: sign in with the admin key to change budgets or reservations")
    if request.headers.get("hx-request") != "true":
        raise Forbidden("changes are made from the dashboard's own pages")
