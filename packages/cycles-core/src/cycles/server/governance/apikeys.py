"""API keys on the spec's paths (createApiKey, listApiKeys, updateApiKey, revokeApiKey) and the
auth endpoints (validateApiKey, introspectAuth). Keys live in the server's key store
(``cycles.server.keys``): the secret is shown once, at creation, and stored as a SHA-256 digest."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints
from starlette.requests import Request

from cycles.errors import InvalidRequest, NotFound, TenantClosed
from cycles.ledger.records import iso_ms, parse_time
from cycles.server._http import parse_body, read_body
from cycles.server.auth import Principal
from cycles.server.governance.authz import ALL_PERMISSIONS, capabilities, check_scope_filter
from cycles.server.governance.context import (
    Reply,
    enum_param,
    limit_param,
    note_of,
    page_after,
    param,
    sort_ascending,
    sort_by,
)
from cycles.server.keys import NEVER, KeyInfo

if TYPE_CHECKING:
    from cycles.server.app import CyclesServer

__all__ = ["create", "introspect", "list_keys", "revoke", "update", "validate"]

Permission = Literal[ALL_PERMISSIONS]  # type: ignore[valid-type]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ApiKeyCreateRequest(_Body):
    tenant_id: Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[a-zA-Z0-9_.-]+$")]
    name: Annotated[str, StringConstraints(max_length=256)]
    description: Annotated[str, StringConstraints(max_length=1024)] | None = None
    permissions: list[Permission] | None = None
    scope_filter: list[str] | None = None
    expires_at: str | None = None
    metadata: dict[str, Any] | None = None


class ApiKeyUpdateRequest(_Body):
    name: Annotated[str, StringConstraints(max_length=256)] | None = None
    description: Annotated[str, StringConstraints(max_length=1024)] | None = None
    permissions: list[Permission] | None = None
    scope_filter: list[str] | None = None
    metadata: dict[str, Any] | None = None


class ApiKeyValidationRequest(BaseModel):
    key_secret: Annotated[str, StringConstraints(max_length=512)]


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


async def _tenant_open(s: CyclesServer, tenant_id: str, *, must_exist: bool) -> None:
    """Rule 2: no key mutation under a CLOSED tenant; a new key needs its tenant to exist."""
    doc = await s.gov.tenant(tenant_id, fresh=True)
    if doc is None:
        if must_exist:  # createApiKey declares no 404: a key for an unknown tenant is a bad request
            raise InvalidRequest(f"tenant {tenant_id!r} not found: create it first (POST /v1/admin/tenants)")
        return
    if doc["status"] == "CLOSED":
        raise TenantClosed(f"tenant {tenant_id!r} is closed", details={"tenant_id": tenant_id})


async def create(s: CyclesServer, request: Request, p: Principal) -> Reply:
    req = parse_body(ApiKeyCreateRequest, await read_body(request, s.max_body_bytes))
    note = note_of(request)
    note.tenant = req.tenant_id
    await _tenant_open(s, req.tenant_id, must_exist=True)
    if req.expires_at is not None and not req.expires_at.strip():
        raise InvalidRequest("expires_at must be an ISO 8601 date-time")
    expires_ms = parse_time(req.expires_at) if req.expires_at is not None else None
    if expires_ms is not None and expires_ms <= _now_ms():
        raise InvalidRequest("expires_at is in the past")
    new = await s.keys.create(
        req.tenant_id,
        name=req.name,
        permissions=tuple(dict.fromkeys(req.permissions)) if req.permissions is not None else None,
        scope_filter=check_scope_filter(req.scope_filter or ()),
        expires_at_ms=expires_ms,
        metadata={**(req.metadata or {}), "description": req.description}
        if req.description is not None
        else req.metadata,
    )
    info = new.info
    note.resource_id = info.key_id
    note.after = info.to_spec()
    await s.gov.emit(
        "api_key.created",
        request,
        p,
        tenant_id=info.tenant,
        data={"key_id": info.key_id, "key_name": info.name, "new_status": "ACTIVE",
              "permissions": list(info.effective_permissions)},
    )  # fmt: skip
    body = {
        "key_id": info.key_id,
        "key_secret": new.api_key,
        "key_prefix": info.key_prefix,
        "tenant_id": info.tenant,
        "permissions": list(info.effective_permissions),
        "created_at": iso_ms(info.created_at_ms),
        "expires_at": iso_ms(info.expires_at_ms) if info.expires_at_ms is not None else NEVER,
    }
    return 201, _dumps(body)


def _now_ms() -> int:
    from cycles.ledger.records import _now_ms as now

    return now()


async def list_keys(s: CyclesServer, request: Request, p: Principal) -> Reply:
    q = request.query_params
    tenant = param(q, "tenant_id", 128)
    status = enum_param(q, "status", ("ACTIVE", "REVOKED", "EXPIRED"))
    search = (param(q, "search", 128) or "").lower()
    limit = limit_param(q)
    sort_ascending(q)
    sort_by(q, ("key_id", "name", "tenant_id", "status", "created_at", "expires_at"))
    keys = [
        k.to_spec()
        for k in sorted(await s.keys.list(tenant=tenant), key=lambda k: k.key_id)
        if (status is None or k.status == status)
        and (not search or search in k.key_id or search in (k.name or "").lower())
    ]
    page = page_after(keys, "key_id", param(q, "cursor", 128), limit)
    return 200, _dumps({"keys": page.pop("items"), **page})


async def _get(s: CyclesServer, key_id: str) -> KeyInfo:
    try:
        return await s.keys.get(key_id)
    except NotFound:
        raise NotFound(f"API key {key_id[:64]!r} not found") from None


async def update(s: CyclesServer, request: Request, p: Principal) -> Reply:
    key_id: str = request.path_params["key_id"]
    req = parse_body(ApiKeyUpdateRequest, await read_body(request, s.max_body_bytes))
    note = note_of(request)
    note.resource_id = key_id
    before = await _get(s, key_id)
    note.tenant = before.tenant
    await _tenant_open(s, before.tenant, must_exist=False)
    if before.revoked_at_ms is not None:
        raise InvalidRequest(f"API key {key_id} is revoked: create a new one")
    changes: dict[str, Any] = {}
    if req.name is not None:
        changes["name"] = req.name
    if req.permissions is not None:
        changes["permissions"] = tuple(dict.fromkeys(req.permissions))
    if req.scope_filter is not None:
        changes["scope_filter"] = check_scope_filter(req.scope_filter)
    if req.metadata is not None or req.description is not None:
        meta = dict(req.metadata if req.metadata is not None else (before.metadata or {}))
        if req.description is not None:
            meta["description"] = req.description
        changes["metadata"] = meta
    after = await s.keys.update(key_id, **changes) if changes else before
    s.auth.forget(key_id)
    note.before, note.after = before.to_spec(), after.to_spec()
    if before.effective_permissions != after.effective_permissions or before.scope_filter != after.scope_filter:
        await s.gov.emit(
            "api_key.permissions_changed",
            request,
            p,
            tenant_id=after.tenant,
            data={"key_id": key_id, "key_name": after.name, "permissions": list(after.effective_permissions)},
        )
    return 200, _dumps(after.to_spec())


async def revoke(s: CyclesServer, request: Request, p: Principal) -> Reply:
    key_id: str = request.path_params["key_id"]
    reason = param(request.query_params, "reason", 512)
    note = note_of(request)
    note.resource_id = key_id
    before = await _get(s, key_id)
    note.tenant = before.tenant
    await _tenant_open(s, before.tenant, must_exist=False)
    after = await s.keys.revoke(key_id, reason=reason)
    s.auth.forget(key_id)
    note.before, note.after = before.to_spec(), after.to_spec()
    if before.revoked_at_ms is None:
        await s.gov.emit(
            "api_key.revoked",
            request,
            p,
            tenant_id=after.tenant,
            data={"key_id": key_id, "key_name": after.name, "previous_status": before.status, "new_status": "REVOKED"},
        )
    return 200, _dumps(after.to_spec())


async def validate(s: CyclesServer, request: Request, p: Principal) -> Reply:
    req = parse_body(ApiKeyValidationRequest, await read_body(request, s.max_body_bytes))
    info = await s.keys.identify(req.key_secret)
    if info is None:
        return 200, _dumps({"valid": False, "tenant_id": "", "reason": "NOT_FOUND"})
    body: dict[str, Any] = {
        "valid": info.active,
        "tenant_id": info.tenant,
        "key_id": info.key_id,
        "permissions": list(info.effective_permissions),
        "expires_at": iso_ms(info.expires_at_ms) if info.expires_at_ms is not None else NEVER,
    }
    if info.scope_filter:
        body["scope_filter"] = list(info.scope_filter)
    if not info.active:
        body["reason"] = info.status  # REVOKED or EXPIRED
    return 200, _dumps(body)


async def introspect(s: CyclesServer, request: Request, p: Principal) -> Reply:
    if p.admin:
        body: dict[str, Any] = {
            "authenticated": True,
            "auth_type": "admin",
            "permissions": ["*"],
            "capabilities": capabilities(None),
        }
    else:
        perms = sorted(p.permissions)
        body = {
            "authenticated": True,
            "auth_type": "tenant",
            "permissions": perms,
            "capabilities": capabilities(perms),
            "tenant_id": p.tenant,
        }
        if p.scope_filter:
            body["scope_filter"] = list(p.scope_filter)
    return 200, _dumps(body)
