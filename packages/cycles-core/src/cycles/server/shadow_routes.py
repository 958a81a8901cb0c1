"""Shadow events over HTTP, so clients of a server keep their shadow decisions in its ledger.

    POST /v1/shadow/events   {events: [ShadowEvent...]}   X-Cycles-API-Key: written under the key's tenant
    GET  /v1/shadow/events?since_ms=&until_ms=&tenant=&after_id=
                             X-Cycles-API-Key (its own tenant) or X-Admin-API-Key (any tenant, or all)

Events are ``cycles.shadow.ShadowEvent`` in their wire form. A page holds at most ``PAGE`` events,
oldest first; ``next_since_ms`` and ``next_after_id`` (when present) ask for the next one.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from cycles.errors import Forbidden, InvalidRequest
from cycles.server._http import read_body
from cycles.server.auth import Principal
from cycles.shadow import ShadowEvent, ShadowStore, shadow_store_for

if TYPE_CHECKING:
    from cycles.server.app import CyclesServer

__all__ = ["list_shadow_events", "record_shadow_events", "store_of"]

Reply = tuple[int, bytes]
PAGE = 5000
MAX_EVENTS = 500

_stores: weakref.WeakKeyDictionary[Any, ShadowStore] = weakref.WeakKeyDictionary()


def store_of(server: CyclesServer) -> ShadowStore:
    """The shadow store next to the server's ledger (opened on first use)."""
    store = _stores.get(server)
    if store is None:
        store = _stores[server] = shadow_store_for(server.ledger)
    return store


async def record_shadow_events(s: CyclesServer, request: Request, p: Principal) -> Reply:
    try:
        body = json.loads(await read_body(request, s.max_body_bytes))
        raw = body["events"]
    except (ValueError, KeyError, TypeError):
        raise InvalidRequest('body must be {"events": [...]}') from None
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_EVENTS:
        raise InvalidRequest(f"events must be a list of 1 to {MAX_EVENTS} shadow events")
    events = []
    for item in raw:
        if not isinstance(item, dict):
            raise InvalidRequest("each event must be an object")
        if p.tenant is not None and item.get("tenant") in (None, "_"):
            item = {**item, "tenant": p.tenant}
        event = ShadowEvent.from_wire(item)
        if p.tenant is not None and event.tenant != p.tenant:
            raise Forbidden(f"this key records shadow events for tenant {p.tenant} only")
        events.append(event)
    await asyncio.to_thread(store_of(s).append, events)
    return 201, s.dumps({"recorded": len(events)})


def _int_param(request: Request, name: str, default: int | None) -> int | None:
    raw = (request.query_params.get(name) or "").strip()
    if not raw:
        return default
    if not raw.isdigit():
        raise InvalidRequest(f"{name} must be a whole number of ms since the epoch")
    return int(raw)


async def list_shadow_events(s: CyclesServer, request: Request, p: Principal) -> Reply:
    tenant = (request.query_params.get("tenant") or "").strip() or None
    if not p.admin:
        if tenant is not None and tenant != p.tenant:
            raise Forbidden(f"this key reads tenant {p.tenant} only")
        tenant = p.tenant
    since_ms = _int_param(request, "since_ms", 0) or 0
    until_ms = _int_param(request, "until_ms", None)
    after_id = (request.query_params.get("after_id") or "").strip()
    events = await asyncio.to_thread(store_of(s).scan, tenant=tenant, since_ms=since_ms, until_ms=until_ms)
    ordered = sorted(events, key=lambda e: (e.at_ms, e.event_id))
    if after_id:
        ordered = [e for e in ordered if (e.at_ms, e.event_id) > (since_ms, after_id)]
    page = ordered[:PAGE]
    body: dict[str, Any] = {"events": [e.to_wire() for e in page]}
    if len(ordered) > PAGE:
        body["next_since_ms"] = page[-1].at_ms
        body["next_after_id"] = page[-1].event_id
    return 200, s.dumps(body)
