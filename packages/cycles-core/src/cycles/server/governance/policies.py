"""Named policies: createPolicy, listPolicies, getPolicy, updatePolicy (governance admin spec
v0.1.25, with the quota and access-list fields of the governance extensions v0.1.26).

The policies live in the ledger (``cycles.ledger.policies``), which applies them at reserve; these
handlers are the operator face. Both auths, as the spec says: the admin key acts on behalf of a
tenant (``tenant_id`` in the create body, required as a list filter; a policy id pins its tenant for
get and update), a tenant key on its own tenant with ``policies:read`` / ``policies:write``. A key
with a ``scope_filter`` may only see or write policies whose pattern is a literal scope inside the
filter (a wildcard pattern reaches beyond any filter). Every mutation is audited with the policy
before and after, and emits ``policy.created`` / ``policy.updated`` (``changed_fields``).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from starlette.requests import Request

from cycles.errors import Forbidden, InvalidRequest, NotFound, TenantClosed
from cycles.ledger.policies import NamedPolicy, PolicyPatch, now_utc
from cycles.ledger.records import _now_ms
from cycles.server._http import read_body
from cycles.server.auth import Principal
from cycles.server.governance.authz import scope_allowed
from cycles.server.governance.context import enum_param, limit_param, note_of, page_after, param

if TYPE_CHECKING:
    from cycles.server.app import CyclesServer
    from cycles.server.governance.context import Reply

__all__ = ["create", "get", "list_policies", "update"]


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError:
        raise InvalidRequest("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    return body


def _invalid(exc: ValidationError) -> InvalidRequest:
    first = exc.errors()[0]
    message = first["msg"].removeprefix("Value error, ").removeprefix("INVALID_REQUEST: ")
    where = ".".join(str(x) for x in first["loc"])
    return InvalidRequest((f"{where}: {message}" if where else message)[:500])


def _literal(pattern: str) -> str | None:
    """The scope a pattern names literally (exact, ``scope/*``), or None for a wildcard one."""
    if pattern.endswith("/*"):
        return pattern[:-2]
    return None if "*" in pattern else pattern


def _visible(p: Principal, policy: NamedPolicy) -> bool:
    if p.admin:
        return True
    if policy.tenant_id != p.tenant:
        return False
    literal = _literal(policy.scope_pattern)
    return not p.scope_filter or (literal is not None and scope_allowed(p.scope_filter, literal))


def _need(p: Principal, permission: str) -> None:
    if not p.may(permission):
        raise Forbidden(f"this API key lacks the {permission} permission")


async def _guard_tenant(s: CyclesServer, tenant: str) -> None:
    doc = await s.gov.tenant(tenant, fresh=True)
    if doc is not None and doc["status"] == "CLOSED":
        raise TenantClosed(f"tenant {tenant!r} is closed", details={"tenant_id": tenant})


async def _emit(
    s: CyclesServer, request: Request, p: Principal, event: str, policy: NamedPolicy, changed: list[str]
) -> None:
    data = {"policy_id": policy.policy_id, "name": policy.name, "scope_pattern": policy.scope_pattern}
    await s.gov.emit(event, request, p, tenant_id=policy.tenant_id, data={**data, "changed_fields": changed})


async def create(s: CyclesServer, request: Request, p: Principal) -> Reply:
    body = _json_object(await read_body(request, s.max_body_bytes))
    tenant = body.pop("tenant_id", None)
    if p.admin:
        if not isinstance(tenant, str) or not tenant:
            raise InvalidRequest("tenant_id is required with the admin key")
    elif tenant is not None:
        raise InvalidRequest("tenant_id must not be set with a tenant API key (it is the key's tenant)")
    else:
        tenant = p.tenant
    _need(p, "policies:write")
    for name in ("name", "scope_pattern"):
        if name not in body:
            raise InvalidRequest(f"{name} is required")
    if "status" in body or "policy_id" in body or "created_at" in body:
        raise InvalidRequest("status, policy_id and created_at are not fields of PolicyCreateRequest")
    try:
        policy = NamedPolicy.create(tenant, body, now_utc(_now_ms()))
    except ValidationError as exc:
        raise _invalid(exc) from None
    if not _visible(p, policy):
        raise Forbidden("the scope_pattern is outside this API key's scope_filter")
    await _guard_tenant(s, tenant)
    note = note_of(request)
    note.tenant = tenant
    stored = await s.ledger.put_named_policy(policy, create=True)
    note.resource_id, note.after = stored.policy_id, stored.wire()
    await _emit(s, request, p, "policy.created", stored, [])
    return 201, _dumps(stored.wire())


async def _load(s: CyclesServer, p: Principal, policy_id: str) -> NamedPolicy:
    policy = await s.ledger.get_named_policy(policy_id[:128])
    if not _visible(p, policy):  # another tenant's policy does not exist for this key
        raise NotFound(f"policy {policy_id[:128]!r} not found", details={"policy_id": policy_id[:128]})
    return policy


async def get(s: CyclesServer, request: Request, p: Principal) -> Reply:
    _need(p, "policies:read")
    policy = await _load(s, p, request.path_params["policy_id"])
    return 200, _dumps(policy.wire())


async def update(s: CyclesServer, request: Request, p: Principal) -> Reply:
    _need(p, "policies:write")
    body = _json_object(await read_body(request, s.max_body_bytes))
    try:
        patch = PolicyPatch.model_validate(body)
    except ValidationError as exc:
        raise _invalid(exc) from None
    if patch.allowed_action_kinds and patch.denied_action_kinds:
        raise InvalidRequest("allowed_action_kinds and denied_action_kinds are mutually exclusive")
    current = await _load(s, p, request.path_params["policy_id"])
    note = note_of(request)
    note.resource_id, note.tenant = current.policy_id, current.tenant_id
    await _guard_tenant(s, current.tenant_id)
    try:
        new, changed = current.patched(patch, now_utc(_now_ms()))
    except ValidationError as exc:
        raise _invalid(exc) from None
    note.before = current.wire()
    if changed:
        new = await s.ledger.put_named_policy(new, create=False)
        await _emit(s, request, p, "policy.updated", new, changed)
    note.after = new.wire()
    return 200, _dumps(new.wire())


async def list_policies(s: CyclesServer, request: Request, p: Principal) -> Reply:
    q = request.query_params
    tenant = param(q, "tenant_id", 128)
    if p.admin:
        if tenant is None:
            raise InvalidRequest("tenant_id is required with the admin key")
    else:
        tenant = p.tenant  # the spec: ignored with a tenant key
    _need(p, "policies:read")
    pattern = param(q, "scope_pattern", 1024)
    status = enum_param(q, "status", ("ACTIVE", "DISABLED"))
    has_quotas = enum_param(q, "has_action_quotas", ("true", "false"))
    kind = param(q, "references_action_kind", 64)
    limit = limit_param(q, hi=200)
    items = []
    for policy in await s.ledger.list_named_policies(tenant=tenant or ""):
        if not _visible(p, policy):
            continue
        if pattern is not None and policy.scope_pattern != pattern:
            continue
        if status is not None and policy.status != status:
            continue
        if has_quotas is not None and bool(policy.action_quotas or policy.risk_class_quotas) != (has_quotas == "true"):
            continue
        if kind is not None and not policy.mentions(kind):
            continue
        items.append(policy.wire())
    items.sort(key=lambda d: d["policy_id"])
    page = page_after(items, "policy_id", param(q, "cursor", 128), limit)
    return 200, _dumps({"policies": page.pop("items"), **page})
