"""The dashboard's pages: server-rendered HTML (Jinja2), htmx for the in-place changes."""

from __future__ import annotations

import asyncio
import csv
import functools
import io
import json
import math
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeVar

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from cycles.dashboard import charts
from cycles.dashboard.auth import COOKIE, LIFETIME_S, Session, SessionSigner, current, require_change, sign_in
from cycles.dashboard.data import Reader, reader_for, tree, utilisation
from cycles.errors import CyclesError, Forbidden, InvalidRequest, Unauthorized
from cycles.ledger.records import parse_time, records_of
from cycles.models import ReleaseRequest, ReservationStatus, Unit, format_amount, trusted
from cycles.server._http import error_status, read_body
from cycles.server.admin import parse_unit
from cycles.server.auth import ADMIN, Principal
from cycles.server.governance.context import AuditNote
from cycles.shadow import ShadowEvent, report_from_store

if TYPE_CHECKING:
    from cycles.server.app import CyclesServer

__all__ = ["Dashboard", "dashboard_routes"]

PREFIX = "/dashboard"
EXPORT_CAP = 10_000
_UNIT_ARG = {Unit.USD_MICROCENTS: "usd", Unit.TOKENS: "tokens", Unit.CREDITS: "credits", Unit.RISK_POINTS: "risk"}
_EVENT_KINDS = ("events", "audit", "reservations", "shadow")
_CATEGORIES = ("budget", "tenant", "api_key", "policy", "reservation", "system", "webhook")
T = TypeVar("T")
_STATIC = {"htmx.min.js": "text/javascript", "app.css": "text/css", "htmx.LICENSE": "text/plain"}
_SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


def _amount(unit: Unit, value: int | None) -> str:
    return "" if value is None else format_amount(unit, value)


def _short(unit: Unit, value: float) -> str:
    if unit is Unit.USD_MICROCENTS:
        dollars = value / 100_000_000
        return f"${dollars:,.2f}" if dollars >= 0.01 or dollars == 0 else f"${dollars:,.4f}"
    return f"{value:,.0f}"


def _money(value: Any) -> Markup:
    """An Amount in short form (``$50.00``), its exact value in a tooltip."""
    if value is None:
        return Markup("")
    return Markup('<span title="{}">{}</span>').format(str(value), _short(value.unit, value.amount))


def _wire_amount(value: dict[str, Any] | None) -> str:
    return "" if not value else format_amount(Unit(value["unit"]), int(value["amount"]))


def _when(ms: int | None) -> str:
    return "" if not ms else datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _ago(ms: int | None) -> str:
    if not ms:
        return ""
    s = int(time.time() - ms / 1000)
    if s < 0:
        s = -s
        return f"in {s // 60} min" if s >= 60 else f"in {s} s"
    if s < 60:
        return f"{s} s ago"
    if s < 3600:
        return f"{s // 60} min ago"
    if s < 86_400:
        return f"{s // 3600} h ago"
    return f"{s // 86_400} d ago"


class Dashboard:
    """Holds the server, the session signer, the templates and the data reader."""

    def __init__(self, server: CyclesServer, admin_key: str | None) -> None:
        self.server = server
        self.signer = SessionSigner(admin_key)
        self.reader: Reader = reader_for(server.ledger)
        self.one_time_tokens: set[str] = set()
        self.env = Environment(
            loader=PackageLoader("cycles.dashboard", "templates"),
            autoescape=select_autoescape(["html"]),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(
            amount=_amount, money=_money, wire_amount=_wire_amount, when=_when, ago=_ago, short=_short
        )
        self.env.globals.update(prefix=PREFIX, utilisation=utilisation)

    def login_token(self) -> str:
        """A one-time sign-in link token (``cycles dashboard`` opens the browser with it)."""
        token = secrets.token_urlsafe(24)
        self.one_time_tokens.add(token)
        return token

    # ---- plumbing ----------------------------------------------------------------------------

    def render(self, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        html = self.env.get_template(name).render(**context)
        return HTMLResponse(html, status_code, headers=_SECURITY_HEADERS)

    def page(
        self, handler: Callable[[Request, Session], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                session = await current(request, self.signer, self.server.auth)
            except Unauthorized:
                if request.headers.get("hx-request") == "true":
                    return Response(status_code=401, headers={"hx-redirect": PREFIX + "/login"})
                return RedirectResponse(PREFIX + "/login", 303)
            try:
                return await handler(request, session)
            except CyclesError as exc:
                if request.headers.get("hx-request") == "true":  # show it in the flash area, keep the page
                    response = self.render("_flash.html", error=str(exc))
                    response.headers.update({"hx-retarget": "#flash", "hx-reswap": "innerHTML"})
                    return response
                return self.render("error.html", exc.http_status, error=str(exc), session=session)

        return endpoint

    def _tenant(self, request: Request, session: Session) -> str | None:
        if not session.admin:
            return session.tenant
        tenant = (request.query_params.get("tenant") or "").strip() or None
        if tenant is not None and len(tenant) > 128:
            raise InvalidRequest("tenant is longer than 128 characters")
        return tenant

    async def _context(self, session: Session, tenant: str | None, page: str) -> dict[str, Any]:
        """What every page's frame needs: who is signed in, the tenant filter, the current page."""
        return {"session": session, "tenant": tenant, "tenants": await self._tenants(session), "page": page}

    async def _tenants(self, session: Session) -> list[str]:
        if not session.admin:
            return [session.tenant] if session.tenant else []
        budgets = await self.reader.budgets(None)
        return sorted({b.scope.split("/", 1)[0].removeprefix("tenant:") for b in budgets})

    # ---- sign-in -----------------------------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        token = request.query_params.get("token")
        if token and token in self.one_time_tokens:
            self.one_time_tokens.discard(token)
            return self._signed_in(Session(True, None, None, int(time.time()) + LIFETIME_S))
        return self.render("login.html", error=None)

    async def login(self, request: Request) -> Response:
        # An address with too many refused sign-ins is turned away before its key is looked at:
        # the admin key may be guessable, and a right guess must not get through the limit.
        answer: CyclesError | None = await self.server.gov.auth_failures.blocked(request)
        if answer is None:
            try:
                form = await _form(request)
                return self._signed_in(await sign_in(self.server.auth, form.get("key", "")))
            except (Unauthorized, Forbidden) as exc:
                nobody = Principal(tenant=None)
                answer = await self.server.record_refusal(request, nobody, "POST /dashboard/login", None, exc)
            except CyclesError as exc:
                answer = exc
        response = self.render("login.html", answer.http_status, error=answer.message)
        if answer.retry_after_s is not None:
            response.headers["retry-after"] = str(max(1, math.ceil(answer.retry_after_s)))
        return response

    def _signed_in(self, session: Session) -> Response:
        response = RedirectResponse(PREFIX, 303)
        response.set_cookie(
            COOKIE, self.signer.dump(session), max_age=LIFETIME_S, httponly=True, samesite="strict", path=PREFIX
        )
        return response

    async def logout(self, request: Request) -> Response:
        response = RedirectResponse(PREFIX + "/login", 303)
        response.delete_cookie(COOKIE, path=PREFIX)
        return response

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in _STATIC:
            return Response("not found", 404)
        body = resources.files("cycles.dashboard").joinpath("static", name).read_bytes()
        return Response(body, 200, media_type=_STATIC[name], headers={"cache-control": "public, max-age=3600"})

    # ---- pages -------------------------------------------------------------------------------

    async def overview(self, request: Request, session: Session) -> Response:
        tenant = self._tenant(request, session)
        now = int(time.time() * 1000)
        since = now - 24 * 3_600_000
        budgets, (active, capped), spend, events, denied = await asyncio.gather(
            self.reader.budgets(tenant),
            self.reader.active_count(tenant),
            self.reader.spend(tenant, since, now, 24),
            asyncio.to_thread(self._shadow_store().scan, tenant=tenant, since_ms=since, until_ms=now + 1),
            self._denied_since(tenant, since),
        )
        statuses = await self.reader.statuses(tenant)
        starts = [since + i * spend.width_ms for i in range(spend.buckets)]
        spend_charts = [
            (unit, sum(points), charts.bar_chart(points, starts, label=f"{unit.value} spent per hour", fmt=_fmt(unit)))
            for unit, points in sorted(spend.points.items(), key=lambda kv: kv[0].value)
        ]
        denials, would_deny = [0] * 24, [0] * 24
        for e in events:
            would_deny[min(23, max(0, (e.at_ms - since) // spend.width_ms))] += 1
        for at_ms in denied:
            denials[min(23, max(0, (at_ms - since) // spend.width_ms))] += 1
        closest = sorted((b for b in budgets if utilisation(b) is not None), key=lambda b: -(utilisation(b) or 0.0))[:8]
        return self.render(
            "overview.html",
            **await self._context(session, tenant, "overview"),
            budgets=budgets,
            active=active,
            capped=capped,
            spend_charts=spend_charts,
            sampled=spend.sampled,
            denials=sum(denials),
            would_deny=sum(would_deny),
            denial_chart=charts.bar_chart(
                denials, starts, label="reserves denied per hour", color="var(--danger)", integer=True
            ),
            would_deny_chart=charts.bar_chart(
                would_deny, starts, label="would-deny decisions per hour", color="var(--warn)", integer=True
            ),
            closest=closest,
            statuses=statuses,
        )

    async def _denied_since(self, tenant: str | None, since_ms: int) -> list[int]:
        """When reserves were denied (the governance plane's ``reservation.denied`` events)."""
        gov = getattr(self.server, "gov", None)
        if gov is None:
            return []
        found = await gov.run(
            gov.records.events, tenant=tenant, limit=EXPORT_CAP, event_type="reservation.denied", since=since_ms
        )
        return [int(parse_time(e["timestamp"]) or 0) for e in found]

    async def budgets(self, request: Request, session: Session) -> Response:
        return await self._budget_page(request, session, partial=False)

    async def _budget_page(self, request: Request, session: Session, *, partial: bool, flash: str = "") -> Response:
        tenant = self._tenant(request, session)
        budgets = await self.reader.budgets(tenant)
        statuses = await self.reader.statuses(tenant)
        context = await self._context(session, tenant, "budgets")
        any_debt = any(b.debt is not None and b.debt.amount for b in budgets)
        context.update(rows=tree(budgets), statuses=statuses, unit_arg=_UNIT_ARG, flash=flash, any_debt=any_debt)
        return self.render("_budget_tree.html" if partial else "budgets.html", **context)

    async def budget_status(self, request: Request, session: Session) -> Response:
        require_change(request, session)
        form = await _form(request)
        scope, status = str(form.get("scope") or ""), str(form.get("status") or "")
        if status not in ("ACTIVE", "FROZEN", "CLOSED"):
            raise InvalidRequest("status must be ACTIVE, FROZEN or CLOSED")
        unit = parse_unit(form.get("unit", ""))
        await self._audited(
            request, "setBudgetStatus", "budget", scope, self.server.ledger.set_budget_status(scope, status, unit=unit)
        )
        verb = {"ACTIVE": "unfroze", "FROZEN": "froze", "CLOSED": "closed"}[status]
        return await self._budget_page(request, session, partial=True, flash=f"{verb} {scope}")

    async def budget_fund(self, request: Request, session: Session) -> Response:
        require_change(request, session)
        from cycles.cli import parse_amount

        form = await _form(request)
        scope = str(form.get("scope") or "")
        unit = parse_unit(form.get("unit", "")) or Unit.USD_MICROCENTS
        amount = parse_amount(str(form.get("amount") or ""), _UNIT_ARG[unit])
        if amount.amount == 0:
            raise InvalidRequest("fund a positive amount")
        await self._audited(request, "fundBudget", "budget", scope, self.server.ledger.fund_budget(scope, amount))
        return await self._budget_page(request, session, partial=True, flash=f"funded {scope} with {amount}")

    async def reservations(self, request: Request, session: Session) -> Response:
        tenant = self._tenant(request, session)
        cursor = request.query_params.get("cursor") or None
        rows, next_cursor = await self.reader.reservations(tenant, ReservationStatus.ACTIVE, cursor)
        active, capped = await self.reader.active_count(tenant)
        return self.render(
            "reservations.html",
            **await self._context(session, tenant, "reservations"),
            rows=rows,
            next_cursor=next_cursor,
            active=active,
            capped=capped,
            now_ms=int(time.time() * 1000),
        )

    async def release(self, request: Request, session: Session) -> Response:
        require_change(request, session)
        rid = request.path_params["reservation_id"]
        req = trusted(
            ReleaseRequest, idempotency_key=f"dashboard-release:{rid}", reason="force-released from the dashboard"
        )
        released = await self._audited(
            request, "releaseReservation", "reservation", rid, self.server.ledger.release(rid, req)
        )
        return self.render("_released_row.html", rid=rid, released=released.released)

    async def events(self, request: Request, session: Session) -> Response:
        """Governance events, the audit log, reservations and shadow decisions: filters and export."""
        tenant = self._tenant(request, session)
        q = request.query_params
        kind = q.get("kind") or "events"
        if kind not in _EVENT_KINDS:
            raise InvalidRequest(f"kind must be one of {', '.join(_EVENT_KINDS)}")
        fmt = q.get("format")
        limit = EXPORT_CAP if fmt else 100
        filters = {
            name: (q.get(name) or "").strip()
            for name in ("status", "action", "event_type", "category", "scope", "operation")
        }
        found = await self._event_rows(kind, tenant, session, filters, limit)
        if fmt in ("json", "csv"):
            body = json.dumps(found, indent=1) if fmt == "json" else _csv(found)
            return Response(
                body,
                media_type="application/json" if fmt == "json" else "text/csv",
                headers={"content-disposition": f'attachment; filename="cycles-{kind}.{fmt}"'},
            )
        return self.render(
            "events.html",
            **await self._context(session, tenant, "events"),
            kind=kind,
            kinds=_EVENT_KINDS,
            filters=filters,
            rows=found,
            shadow_rows=[ShadowEvent.from_wire(e) for e in found] if kind == "shadow" else [],
            statuses=[s.value for s in ReservationStatus],
            categories=sorted(_CATEGORIES),
            query=request.url.query,
        )

    async def _event_rows(
        self, kind: str, tenant: str | None, session: Session, f: dict[str, str], limit: int
    ) -> list[dict[str, Any]]:
        action = f["action"]
        if kind == "events":
            records = records_of(self.server.ledger)
            options = {k: f[k] for k in ("event_type", "category", "scope") if f[k]}
            return await asyncio.to_thread(functools.partial(records.events, tenant=tenant, limit=limit, **options))
        if kind == "audit":
            records = records_of(self.server.ledger)
            options = {"operation": f["operation"]} if f["operation"] else {}
            if session.admin:  # the admin's own entries are filed under __admin__, the tenant in metadata
                entries = await asyncio.to_thread(functools.partial(records.audit, limit=EXPORT_CAP, **options))
                mine = [r for r in entries if tenant is None or tenant in (r.get("tenant_id"), _target(r))]
                return mine[:limit]
            return await asyncio.to_thread(functools.partial(records.audit, tenant=tenant, limit=limit, **options))
        if kind == "shadow":
            since = int(time.time() * 1000) - 30 * 86_400_000
            events = await asyncio.to_thread(self._shadow_store().scan, tenant=tenant, since_ms=since)
            return [e.to_wire() for e in reversed(events) if action in f"{e.action_kind} {e.action_name}"][:limit]
        status = ReservationStatus(f["status"]) if f["status"] in ReservationStatus.__members__ else None
        found: list[dict[str, Any]] = []
        cursor = None
        while len(found) < limit:
            rows, cursor = await self.reader.reservations(tenant, status, cursor, limit=200)
            found += [r.to_wire() for r in rows if action in f"{r.action.kind} {r.action.name}"]
            if not cursor:
                break
        return found[:limit]

    async def shadow(self, request: Request, session: Session) -> Response:
        tenant = self._tenant(request, session)
        since = request.query_params.get("since") or "7d"
        store = self._shadow_store()
        budgets = await self.reader.budgets(tenant)
        report = await asyncio.to_thread(report_from_store, store, budgets, tenant=tenant, since=since)
        starts = [t for t, _ in report.timeline]
        timeline = charts.bar_chart(
            [n for _, n in report.timeline],
            starts,
            label="would-deny decisions",
            color="var(--warn)",
            integer=True,
            hours=report.until_ms - report.since_ms <= 2 * 86_400_000,
        )
        reasons = charts.hbar_chart(list(report.by_reason.items()))
        return self.render(
            "shadow.html",
            **await self._context(session, tenant, "shadow"),
            since=since,
            report=report,
            timeline=timeline,
            reasons=reasons,
        )

    async def _audited(
        self, request: Request, operation: str, resource_type: str, resource_id: str, call: Awaitable[T]
    ) -> T:
        """Run an operator action and leave an audit entry for it (as the admin API does)."""
        gov = getattr(self.server, "gov", None)
        note = AuditNote(resource_id=resource_id, extra={"via": "dashboard"})
        try:
            result = await call
        except CyclesError as exc:
            if gov is not None:
                code, status = error_status(exc)
                await gov.audit(
                    request, ADMIN, operation, status, resource_type=resource_type, error_code=code, note=note
                )
            raise
        if gov is not None:
            await gov.audit(request, ADMIN, operation, 200, resource_type=resource_type, note=note)
        return result

    def _shadow_store(self) -> Any:
        from cycles.server.shadow_routes import store_of

        return store_of(self.server)


async def _form(request: Request) -> dict[str, str]:
    """A urlencoded form (what the pages and htmx send), without python-multipart; at most 16 KiB."""
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        raise InvalidRequest("expected a form (application/x-www-form-urlencoded)")
    body = await read_body(request, 16 * 1024)
    return {k: v[0] for k, v in urllib.parse.parse_qs(body.decode("utf-8", "replace")).items()}


def _target(audit: dict[str, Any]) -> str | None:
    target = (audit.get("metadata") or {}).get("target_tenant_id")
    return str(target) if target else None


def _fmt(unit: Unit) -> Callable[[float], str]:
    return lambda v: _short(unit, v)


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
    else:
        out[prefix.rstrip(".")] = json.dumps(value) if isinstance(value, list) else value
    return out


def _csv(rows: list[dict[str, Any]]) -> str:
    flat = [_flat(r) for r in rows]
    columns: list[str] = []
    for r in flat:
        columns += [c for c in r if c not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(flat)
    return buf.getvalue()


def dashboard_routes(server: CyclesServer, admin_key: str | None) -> list[BaseRoute]:
    """The dashboard's routes, mounted beside the API by ``create_app``."""
    d = Dashboard(server, admin_key)
    server.dashboard = d  # type: ignore[attr-defined]  # reachable for `cycles dashboard`'s sign-in link
    return [
        Route(PREFIX, d.page(d.overview), methods=["GET"]),
        Route(PREFIX + "/", d.page(d.overview), methods=["GET"]),
        Route(PREFIX + "/login", d.login_form, methods=["GET"]),
        Route(PREFIX + "/login", d.login, methods=["POST"]),
        Route(PREFIX + "/logout", d.logout, methods=["POST"]),
        Route(PREFIX + "/static/{name}", d.static, methods=["GET"]),
        Route(PREFIX + "/budgets", d.page(d.budgets), methods=["GET"]),
        Route(PREFIX + "/budgets/status", d.page(d.budget_status), methods=["POST"]),
        Route(PREFIX + "/budgets/fund", d.page(d.budget_fund), methods=["POST"]),
        Route(PREFIX + "/reservations", d.page(d.reservations), methods=["GET"]),
        Route(PREFIX + "/reservations/{reservation_id}/release", d.page(d.release), methods=["POST"]),
        Route(PREFIX + "/events", d.page(d.events), methods=["GET"]),
        Route(PREFIX + "/shadow", d.page(d.shadow), methods=["GET"]),
    ]
