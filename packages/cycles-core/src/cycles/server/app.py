"""The ASGI app: protocol v0 over any ledger, stateless, so any number of servers can share one.

``create_app("redis://...", admin_key=...)`` opens the ledger (``open_async_ledger``) and the API
key store next to it. Every request goes through ``CyclesServer.dispatch``, which does what the
spec asks of every response: an ``X-Request-Id``, an ``X-Cycles-Trace-Id`` (traceparent first),
and errors as ``ErrorResponse`` with ``request_id`` and ``trace_id`` -- a ``CyclesError`` keeps its
code and status, a malformed request is 400 INVALID_REQUEST, anything unexpected is a logged
500 INTERNAL_ERROR that reveals nothing of the internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, Literal, TypeVar, cast

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from cycles.errors import (
    CyclesError,
    Denied,
    Forbidden,
    InternalError,
    InvalidRequest,
    LedgerUnavailable,
    NotFound,
    Unauthorized,
)
from cycles.ledger import custom_kinds
from cycles.ledger.base import AsyncLedger, default_ledger_url, open_async_ledger
from cycles.models import Balance, Unit
from cycles.otel import instrument, instrument_app, wrap_ledger
from cycles.server import admin, governance, routes, shadow_routes
from cycles.server._http import (
    MAX_BODY_BYTES,
    error_body,
    error_status,
    new_request_id,
    retry_headers,
    trace_id_from,
)
from cycles.server.access_log import ACCESS_LOGGER, access_record, configure_logging
from cycles.server.auth import Authenticator, AuthFailed, Principal
from cycles.server.keys import KeyStore, open_key_store
from cycles.server.metrics import Metrics

__all__ = ["CyclesApp", "CyclesServer", "app_from_env", "create_app"]

logger = logging.getLogger("cycles.server")

T = TypeVar("T")
Auth = Literal["api", "dual", "admin", "none"]
Handler = Callable[["CyclesServer", Request, Principal], Awaitable[tuple[int, bytes]]]

NOBODY = Principal(tenant=None)
_ACTIVE_COUNT_TTL_S = 5.0
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class CyclesServer:
    """Everything a request needs: the ledger, the key store, auth, metrics and settings."""

    gov: governance.Governance  # the governance plane's state (set by governance.install)

    def __init__(
        self,
        ledger: AsyncLedger,
        keys: KeyStore,
        *,
        admin_key: str | None,
        max_body_bytes: int = MAX_BODY_BYTES,
        key_cache_ttl_s: float = 2.0,
        access_log: bool = True,
        sweep_interval_s: float = 5.0,
        metrics_token: str | None = None,
    ) -> None:
        self.ledger = ledger
        #: When set, ``/metrics`` answers only ``Authorization: Bearer <metrics_token>``.
        self.metrics_token = metrics_token
        self.keys = keys
        self.auth = Authenticator(keys, admin_key, cache_ttl_s=key_cache_ttl_s)
        self.metrics = Metrics()
        self.max_body_bytes = max_body_bytes
        self.access_log = access_log
        self.sweep_interval_s = sweep_interval_s
        self._active_checked = 0.0

    # ---- helpers for handlers ----------------------------------------------------------------

    async def timed(self, operation: str, call: Coroutine[Any, Any, T]) -> T:
        start = time.perf_counter()
        try:
            return await call
        finally:
            self.metrics.ledger_latency.observe(time.perf_counter() - start, operation)

    def note_over_limit(self, balances: Sequence[Balance] | None) -> None:
        """OVERDRAFT RECONCILIATION: log scopes that are over their overdraft limit after a charge."""
        for b in balances or ():
            if b.is_over_limit:
                self.metrics.over_limit.inc()
                logger.warning(
                    "scope is over its overdraft limit",
                    extra={
                        "cycles": {
                            "scope": b.scope,
                            "debt": b.debt.amount if b.debt else None,
                            "overdraft_limit": b.overdraft_limit.amount if b.overdraft_limit else None,
                        }
                    },
                )

    @staticmethod
    def dumps(body: Any) -> bytes:
        return json.dumps(body, separators=(",", ":")).encode()

    # ---- the request path --------------------------------------------------------------------

    async def dispatch(
        self, scope: Scope, receive: Receive, send: Send, route: str, handler: Handler, auth: Auth
    ) -> None:
        """One request: auth, the handler, the error mapping, the response with its correlation
        headers, metrics and the access log. Raw ASGI: no response object, no middleware."""
        start = time.perf_counter()
        request = Request(scope, receive)
        headers = request.headers
        request_id = new_request_id()
        trace_id = trace_id_from(headers)
        scope["cycles.ids"] = (request_id, trace_id)  # for audit entries and events (governance)
        principal = NOBODY
        error: str | None = None
        extra_headers: list[tuple[bytes, bytes]] = []
        try:
            if auth == "api":
                principal = await self.auth.tenant(headers)
            elif auth == "dual":
                principal = await self.auth.tenant_or_admin(headers)
            elif auth == "admin":
                principal = self.auth.admin(headers)
            if auth != "none":
                await self.gov.auth_failures.accepted()
            status, body = await handler(self, request, principal)
            extra_headers = scope.get("cycles.headers", extra_headers)  # a handler's own (ETag, ...)
        except CyclesError as caught:
            exc = caught
            if isinstance(exc, (Unauthorized, Forbidden)):
                exc = await self.record_refusal(request, principal, route, handler, exc)
            error, status = error_status(exc)
            extra_headers = retry_headers(exc, status, time.time())
            if status >= 500:
                logger.error(
                    "ledger error on %s: %s",
                    route,
                    exc,
                    extra={"cycles": {"request_id": request_id, "trace_id": trace_id}},
                )
                message = (
                    "the ledger is unavailable; retry with the same idempotency key"
                    if isinstance(exc, (LedgerUnavailable, InternalError))
                    else "internal error"
                )
                body = error_body(error, message, request_id, trace_id)
            else:
                if status == 401:
                    self.metrics.auth_failures.inc("admin" if auth == "admin" else "api_key")
                details = {**exc.details, "deny_detail": exc.deny_detail} if isinstance(exc, Denied) else exc.details
                body = error_body(error, exc.message, request_id, trace_id, details)
        except Exception:
            logger.exception(
                "unhandled error on %s", route, extra={"cycles": {"request_id": request_id, "trace_id": trace_id}}
            )
            error, status = "INTERNAL_ERROR", 500
            body = error_body(error, f"internal error (request {request_id})", request_id, trace_id)
        raw_headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", request_id.encode()),
            (b"x-cycles-trace-id", trace_id.encode()),
            *extra_headers,
        ]
        if principal.tenant is not None:
            raw_headers.append((b"x-cycles-tenant", principal.tenant.encode()))
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": body})
        elapsed = time.perf_counter() - start
        method = scope["method"]
        self.metrics.requests.inc(route, method, str(status))
        self.metrics.latency.observe(elapsed, route)
        if self.access_log and ACCESS_LOGGER.isEnabledFor(logging.INFO):
            client = scope.get("client")
            ACCESS_LOGGER.info(
                access_record(
                    request_id=request_id,
                    trace_id=trace_id,
                    method=method,
                    path=scope["path"],
                    route=route,
                    status=status,
                    duration_s=elapsed,
                    tenant=principal.tenant,
                    key_id=principal.key_id,
                    actor="admin" if principal.admin else ("api_key" if principal.key_id else "anonymous"),
                    error=error,
                    client=client[0] if client else None,
                )
            )

    async def record_refusal(
        self, request: Request, principal: Principal, route: str, handler: Handler | None, exc: CyclesError
    ) -> CyclesError:
        """A 401/403: audited, counted, maybe answered 429 (governance/authfail.py). Recording it
        must never turn the refusal into a 500: if the store cannot take it, it is logged."""
        try:
            return await self.gov.auth_failures.refused(request, principal, route, handler, exc)
        except Exception as failure:  # noqa: BLE001 - the refusal is answered whatever happens here
            logger.warning("could not record a refused request: %s", type(failure).__name__)
            return exc

    def error_response(
        self, request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> Response:
        """404 / 405 for requests no route takes (Starlette's router found none)."""
        request_id = new_request_id()
        trace_id = trace_id_from(request.headers)
        all_headers = {"x-request-id": request_id, "x-cycles-trace-id": trace_id, **(headers or {})}
        method = request.method if request.method in _METHODS else "OTHER"  # labels stay a closed set
        self.metrics.requests.inc("unmatched", method, str(status))
        if self.access_log and ACCESS_LOGGER.isEnabledFor(logging.INFO):
            ACCESS_LOGGER.info(
                access_record(
                    request_id=request_id,
                    trace_id=trace_id,
                    method=method,
                    path=request.url.path,
                    route="unmatched",
                    status=status,
                    duration_s=0.0,
                    tenant=None,
                    key_id=None,
                    actor="anonymous",
                    error=code,
                    client=request.client.host if request.client else None,
                )
            )
        return Response(
            error_body(code, message, request_id, trace_id), status, all_headers, media_type="application/json"
        )

    # ---- operations endpoints ----------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return Response(b'{"status":"ok"}', 200, media_type="application/json")

    async def readyz(self, request: Request) -> Response:
        """Ready when the ledger and the key store answer."""
        try:
            try:
                await self.ledger.get_budget("tenant:__cycles_readyz__", unit=Unit.USD_MICROCENTS)
            except NotFound:
                pass
            except (LedgerUnavailable, InternalError):
                raise
            except CyclesError:
                pass  # any protocol answer means the ledger is there
            await self.keys.ping()
        except Exception as exc:  # noqa: BLE001 - answered as 500 INTERNAL_ERROR, logged
            logger.warning("not ready: %s", type(exc).__name__)
            return Response(b'{"status":"unavailable"}', 503, media_type="application/json")
        return Response(b'{"status":"ready"}', 200, media_type="application/json")

    async def metrics_endpoint(self, request: Request) -> Response:
        """Counters this process maintains as it serves, plus the ledger's maintained ACTIVE count:
        a scrape never scans reservations. Behind ``metrics_token`` when one is set."""
        if self.metrics_token is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.metrics_token}".encode()):
                self.metrics.auth_failures.inc("metrics")
                reason = "invalid_token" if given else "missing_token"
                refused = AuthFailed("metrics need Authorization: Bearer <token>", reason)
                answer = await self.record_refusal(request, NOBODY, "GET /metrics", None, refused)
                code, status = error_status(answer)
                headers = {k.decode(): v.decode() for k, v in retry_headers(answer, status, time.time())}
                return self.error_response(request, status, code, answer.message, headers)
        await self._refresh_active_count()
        return Response(self.metrics.render(), 200, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def _refresh_active_count(self) -> None:
        now = time.monotonic()
        if now - self._active_checked < _ACTIVE_COUNT_TTL_S:
            return
        self._active_checked = now
        try:
            count = await self.ledger.count_active()
        except Exception as exc:  # noqa: BLE001 - a metric must never fail the scrape
            logger.warning("could not read the active reservation count: %s", type(exc).__name__)
            return
        self.metrics.active_reservations = count

    # ---- lifecycle ---------------------------------------------------------------------------

    async def _flush_forever(self) -> None:
        """Every second: refusal summaries of windows that are over, rate counts held back."""
        while True:
            await asyncio.sleep(1.0)
            try:
                await self.gov.auth_failures.flush()
                await self.gov.alerts.denials.flush()
            except Exception as exc:  # noqa: BLE001 - the next second tries again
                logger.warning("flushing refusal records failed: %s", type(exc).__name__)

    async def _sweep_forever(self) -> None:
        """Expire abandoned reservations (returning their budget) even when no request does it."""
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            try:
                await self.ledger.sweep()
            except Exception as exc:  # noqa: BLE001 - the sweeper must outlive a failed sweep
                logger.warning("sweep failed: %s", type(exc).__name__)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(self._sweep_forever()) if self.sweep_interval_s > 0 else None
        dispatcher = asyncio.create_task(self.gov.dispatcher.run_forever())  # webhooks (governance)
        flusher = asyncio.create_task(self._flush_forever())
        try:
            yield
        finally:
            for task in (sweeper, dispatcher, flusher):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await self.aclose()

    async def aclose(self) -> None:
        await self.ledger.aclose()
        await self.keys.aclose()
        if getattr(self, "gov", None) is not None:
            self.gov.records.close()


class Endpoint:
    """One operation as a raw ASGI app (Starlette mounts it as such: no request/response wrapper)."""

    __slots__ = ("auth", "handler", "method", "path", "route", "server")

    def __init__(self, server: CyclesServer, path: str, method: str, handler: Handler, auth: Auth) -> None:
        self.server, self.path, self.method, self.handler, self.auth = server, path, method, handler, auth
        self.route = f"{method} {path}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.server.dispatch(scope, receive, send, self.route, self.handler, self.auth)


def _endpoints(server: CyclesServer) -> list[Endpoint]:
    r, a = routes, admin

    def ep(path: str, method: str, handler: Handler, auth: Auth) -> Endpoint:
        return Endpoint(server, path, method, handler, auth)

    return [
        ep("/v1/decide", "POST", r.decide, "api"),
        ep("/v1/reservations", "POST", r.reserve, "api"),
        ep("/v1/reservations", "GET", r.list_reservations, "dual"),
        ep("/v1/reservations/{reservation_id}", "GET", r.get_reservation, "dual"),
        ep("/v1/reservations/{reservation_id}/commit", "POST", r.commit, "api"),
        ep("/v1/reservations/{reservation_id}/release", "POST", r.release, "dual"),
        ep("/v1/reservations/{reservation_id}/extend", "POST", r.extend, "api"),
        ep("/v1/balances", "GET", r.balances, "api"),
        ep("/v1/events", "POST", r.event, "api"),
        ep("/v1/evidence/{evidence_id}", "GET", r.evidence, "none"),
        ep("/v1/.well-known/cycles-jwks.json", "GET", r.evidence_jwks, "none"),
        ep("/admin/budgets", "POST", a.set_budget, "admin"),
        ep("/admin/budgets", "GET", a.list_budgets, "admin"),
        ep("/admin/budgets/fund", "POST", a.fund_budget, "admin"),
        ep("/admin/budgets/status", "POST", a.set_budget_status, "admin"),
        ep("/admin/budgets/{scope:path}", "GET", a.get_budget, "admin"),
        ep("/admin/budgets/{scope:path}", "DELETE", a.delete_budget, "admin"),
        ep("/admin/keys", "POST", a.create_key, "admin"),
        ep("/admin/keys", "GET", a.list_keys, "admin"),
        ep("/admin/keys/{key_id}", "GET", a.get_key, "admin"),
        ep("/admin/keys/{key_id}", "DELETE", a.revoke_key, "admin"),
        ep("/admin/sweep", "POST", a.sweep, "admin"),
        ep("/admin/policies", "POST", a.update_policy, "admin"),
        ep("/admin/policies", "GET", a.list_policies, "admin"),
        ep("/v1/shadow/events", "POST", shadow_routes.record_shadow_events, "api"),
        ep("/v1/shadow/events", "GET", shadow_routes.list_shadow_events, "dual"),
    ]


_RESERVATION_PREFIX = "/v1/reservations/"
_RESERVATION_ACTIONS = ("commit", "release", "extend")


class CyclesApp:
    """The ASGI entry point. The runtime plane's paths are matched here with a dict and one split,
    straight to their endpoint; everything else (admin, health, metrics, 404/405) goes through
    Starlette's router. Both reach the same ``Endpoint`` objects."""

    def __init__(self, server: CyclesServer, endpoints: list[Endpoint], starlette: Starlette) -> None:
        self.server = server
        self.starlette = starlette
        self.state = starlette.state
        self._exact: dict[tuple[str, str], Endpoint] = {}
        self._by_id: dict[tuple[str, str], Endpoint] = {}
        for e in endpoints:
            if not e.path.startswith("/v1/"):
                continue
            if "{" not in e.path:
                self._exact[(e.method, e.path)] = e
            elif e.path.startswith(_RESERVATION_PREFIX):
                action = e.path.rsplit("/", 1)[1]
                self._by_id[(e.method, action if action in _RESERVATION_ACTIONS else "")] = e

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            method: str = scope["method"]
            endpoint = self._exact.get((method, path))
            if endpoint is None and path.startswith(_RESERVATION_PREFIX):
                parts = path[len(_RESERVATION_PREFIX) :].split("/")
                if parts[0] and (len(parts) == 1 or (len(parts) == 2 and parts[1] in _RESERVATION_ACTIONS)):
                    endpoint = self._by_id.get((method, parts[1] if len(parts) == 2 else ""))
                    if endpoint is not None:
                        scope["path_params"] = {"reservation_id": parts[0]}
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
        await self.starlette(scope, receive, send)


def _open_ledger(url: str, include_balances: bool) -> AsyncLedger:
    if include_balances:
        try:
            return open_async_ledger(url, include_balances=True)
        except TypeError:  # a backend without the option (its responses carry what they carry)
            pass
    return open_async_ledger(url)


def create_app(
    ledger_url: str | None = None,
    *,
    admin_key: str | None = None,
    keys_url: str | None = None,
    ledger: AsyncLedger | None = None,
    keys: KeyStore | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    key_cache_ttl_s: float = 2.0,
    access_log: bool = True,
    sweep_interval_s: float = 5.0,
    include_balances: bool = True,
    metrics_token: str | None = None,
    auth_failure_limit: int = 60,
) -> CyclesApp:
    """An ASGI app serving protocol v0 over the ledger at ``ledger_url`` (or the given ``ledger``).

    API keys live in ``keys_url``, by default the ledger's own store (same SQLite file, same
    Redis), so every server over one ledger knows the same keys. ``admin_key`` enables ``/admin``.
    ``auth_failure_limit``: refused requests (401/403) per source IP or key id per minute, across
    every server on the ledger, before they are answered 429 (0: no limit; governance/authfail.py).
    ``include_balances`` asks the ledger for the optional ``balances`` snapshots in reserve, commit,
    release and event responses. ``metrics_token`` puts ``/metrics`` behind ``Authorization: Bearer``.
    The server is reachable as ``app.state.cycles`` (a ``CyclesServer``).
    """
    if ledger is None:
        if ledger_url is None:
            raise ValueError("create_app needs a ledger_url or a ledger")
        ledger = _open_ledger(ledger_url, include_balances)
    if keys is None:
        source = keys_url or ledger_url or ledger.url
        if not source or source.split("://", 1)[0].lower() in ("http", "https"):
            raise ValueError("API keys cannot be kept in an http(s):// ledger: pass keys_url (memory, sqlite, redis)")
        keys = open_key_store(source)
    server = CyclesServer(
        wrap_ledger(ledger),  # traced when cycles.otel.instrument() was called
        keys,
        admin_key=admin_key,
        max_body_bytes=max_body_bytes,
        key_cache_ttl_s=key_cache_ttl_s,
        access_log=access_log,
        sweep_interval_s=sweep_interval_s,
        metrics_token=metrics_token,
    )

    async def not_found(request: Request, exc: Exception) -> Response:
        return server.error_response(request, 404, "NOT_FOUND", f"no such endpoint: {request.url.path[:200]}")

    async def not_allowed(request: Request, exc: Exception) -> Response:
        # Starlette's Allow names the first matching route's methods; a path has several routes.
        # A literal path (/v1/admin/tenants/bulk-action) is not also its templated sibling's.
        matching = [r for r in starlette_routes if isinstance(r, Route) and r.path_regex.match(request.url.path)]
        literal = [r for r in matching if r.path == request.url.path]
        allowed = sorted({m for r in (literal or matching) for m in (r.methods or ())})
        return server.error_response(
            request,
            405,
            "INVALID_REQUEST",
            f"method {request.method} is not allowed here",
            {"allow": ", ".join(allowed)},
        )

    endpoints = governance.install(server, _endpoints(server))
    server.gov.auth_failures.limit = auth_failure_limit
    starlette_routes: list[BaseRoute] = [
        Route(e.path, e, methods=[e.method], include_in_schema=False) for e in endpoints
    ]
    starlette_routes += [
        Route("/healthz", server.healthz, methods=["GET"], include_in_schema=False),
        Route("/readyz", server.readyz, methods=["GET"], include_in_schema=False),
        Route("/metrics", server.metrics_endpoint, methods=["GET"], include_in_schema=False),
    ]
    from cycles.dashboard import dashboard_routes  # here: the dashboard imports the server's modules

    starlette_routes += dashboard_routes(server, admin_key)
    starlette = Starlette(
        routes=starlette_routes,
        exception_handlers={404: not_found, 405: not_allowed},
        lifespan=server.lifespan,
    )
    starlette.router.redirect_slashes = False  # "/v1/balances/" is not a route: 404, not a 307
    starlette.state.cycles = server
    return cast(CyclesApp, instrument_app(CyclesApp(server, endpoints, starlette)))


def tune_gc() -> None:
    """Garbage-collector settings for a long-running server process (not for a library caller).

    Objects that exist after start-up (modules, models, the app) are frozen out of every future
    collection, and the young generation is collected every 20,000 allocations instead of 700: a
    request allocates hundreds of short-lived containers, and with the defaults the collector ran
    several times per request and, over the in-process ledger, took half the CPU.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def app_from_env(env: Mapping[str, str] | None = None) -> CyclesApp:
    """The app ``cycles serve`` runs in each uvicorn worker, configured through the environment."""
    env = os.environ if env is None else env
    if env.get("CYCLES_OTEL") == "1":  # spans and metrics to the OpenTelemetry SDK the process configured
        instrument()
    if env.get("CYCLES_SERVER_LOG_LEVEL"):  # each worker process sets up its own JSON logging
        configure_logging(env["CYCLES_SERVER_LOG_LEVEL"])
    if env.get("CYCLES_SERVER_TUNE_GC") == "1":
        app = _app_from(env)
        tune_gc()
        return app
    return _app_from(env)


def _app_from(env: Mapping[str, str]) -> CyclesApp:
    if env.get(custom_kinds.ENV):  # validated now: a bad declaration stops the server at start
        custom_kinds.load_file(env[custom_kinds.ENV])
    return create_app(
        env.get("CYCLES_SERVER_LEDGER") or default_ledger_url(),
        admin_key=env.get("CYCLES_ADMIN_KEY") or None,
        keys_url=env.get("CYCLES_SERVER_KEYS") or None,
        max_body_bytes=int(env.get("CYCLES_SERVER_MAX_BODY_BYTES", MAX_BODY_BYTES)),
        key_cache_ttl_s=float(env.get("CYCLES_SERVER_KEY_CACHE_TTL_S", "2.0")),
        access_log=env.get("CYCLES_SERVER_ACCESS_LOG", "1") != "0",
        sweep_interval_s=float(env.get("CYCLES_SERVER_SWEEP_INTERVAL_S", "5.0")),
        include_balances=env.get("CYCLES_SERVER_BALANCES", "1") != "0",
        metrics_token=env.get("CYCLES_METRICS_TOKEN") or None,
        auth_failure_limit=_whole(env, "CYCLES_SERVER_AUTH_FAILURE_LIMIT", 60),
    )


def _whole(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not (raw.isascii() and raw.isdigit()):
        raise InvalidRequest(f"{name} must be a whole number >= 0 (0 turns it off), got {raw[:32]!r}")
    return int(raw)
