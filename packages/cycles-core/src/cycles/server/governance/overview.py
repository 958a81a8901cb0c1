"""getAdminOverview: one snapshot for an operator's dashboard (tenants, budgets, webhooks, and the
last hour of events: counts by category, the latest denials and expiries)."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from cycles.ledger.records import EVENTS, EventFilter, iso_ms
from cycles.server.auth import Principal
from cycles.server.governance.budgets import ledger_view
from cycles.server.governance.context import Reply
from cycles.server.governance.tenants import ledger_id_of

if TYPE_CHECKING:
    from cycles.server.app import CyclesServer

__all__ = ["overview"]

WINDOW_S = 3600


async def overview(s: CyclesServer, request: Request, p: Principal) -> Reply:
    records = s.gov.records
    now_ms = time.time_ns() // 1_000_000
    tenants = await s.gov.run(records.doc_list, "tenant")
    t_status = Counter(t["status"] for t in tenants)
    docs = {d["ledger_id"]: d for d in await s.gov.run(records.doc_list, "budget")}
    views = []
    for b in await s.ledger.list_budgets(tenant=None):
        unit = (b.allocated.unit if b.allocated else b.remaining.unit).value
        views.append(ledger_view(b, docs.get(ledger_id_of(b.scope, unit))))
    b_status = Counter(v["status"] for v in views)
    over = [v for v in views if v["is_over_limit"]]
    debt = sorted((v for v in views if v["debt"]["amount"] > 0), key=lambda v: -v["debt"]["amount"])
    hooks = await s.gov.run(records.doc_list, "webhook")
    failing = sorted(
        (h for h in hooks if h.get("consecutive_failures", 0) > 0), key=lambda h: -h["consecutive_failures"]
    )
    recent = await s.gov.run(lambda: list(records.iter(EVENTS, match=EventFilter(since=now_ms - WINDOW_S * 1000))))
    by_category = Counter(e["category"] for e in recent)
    denials = [e for e in recent if e["event_type"] == "reservation.denied"]
    body: dict[str, Any] = {
        "as_of": iso_ms(now_ms),
        "event_window_seconds": WINDOW_S,
        "tenant_counts": {
            "total": len(tenants),
            "active": t_status["ACTIVE"],
            "suspended": t_status["SUSPENDED"],
            "closed": t_status["CLOSED"],
        },
        "budget_counts": {
            "total": len(views),
            "active": b_status["ACTIVE"],
            "frozen": b_status["FROZEN"],
            "closed": b_status["CLOSED"],
            "over_limit": len(over),
            "with_debt": len(debt),
            "by_unit": dict(Counter(v["unit"] for v in views)),
        },
        "over_limit_scopes": [_amounts(v, "allocated", "remaining", "debt") for v in over[:10]],
        "debt_scopes": [_amounts(v, "debt", "overdraft_limit") for v in debt[:10]],
        "webhook_counts": {
            "total": len(hooks),
            "active": sum(1 for h in hooks if h["status"] == "ACTIVE"),
            "disabled": sum(1 for h in hooks if h["status"] == "DISABLED"),
            "with_failures": len(failing),
        },
        "failing_webhooks": [
            {k: h[k] for k in ("subscription_id", "url", "consecutive_failures", "last_failure_at") if k in h}
            for h in failing[:10]
        ],
        "event_counts": {"total_recent": len(recent), "by_category": dict(by_category)},
        "recent_denials": denials[:10],
        "recent_expiries": [e for e in recent if e["event_type"] == "reservation.expired"][:10],
        "recent_denials_by_reason": dict(Counter(str(e.get("data", {}).get("reason_code")) for e in denials)),
    }
    return 200, json.dumps(body, separators=(",", ":")).encode()


def _amounts(view: dict[str, Any], *names: str) -> dict[str, Any]:
    return {"scope": view["scope"], "unit": view["unit"], **{n: view[n]["amount"] for n in names}}
