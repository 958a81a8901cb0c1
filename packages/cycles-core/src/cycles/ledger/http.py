"""``http(s)://``: any Cycles protocol v0 server, over HTTP/1.1 with keep-alive.

Layout (httpx's ``BaseClient`` idea): ``_HttpCore`` does everything that needs no I/O -- builds each
request, decides what a response or a transport failure means, and runs the retry policy as a
generator *flow* that yields "send this" / "sleep this long". ``HttpLedger`` and
``AsyncHttpLedger`` are shells that only perform those two steps, blocking or awaited.

Transports sit behind a two-method internal interface (``send``, ``close``): the sync shell
writes each request with one ``sendall`` on a pooled keep-alive socket and reads the response with
the standard library's ``http.client.HTTPResponse``; the async shell uses aiohttp, imported only
when an async HTTP ledger is opened (``pip install 'cycles-core[http]'``). Why those two and not
httpx is measured in ``bench/bench_transport.py``; the short version is in the transports'
docstrings. The public API (``Cycles``/``AsyncCycles`` options) names no transport.

Wire rules (protocol v0):

- Every mutating request carries ``X-Idempotency-Key`` equal to the body's ``idempotency_key``,
  and a retry re-sends the *same bytes*, so a lost response can never settle twice.
- Retried: connection failures, timeouts, 5xx (but 501/505), 429 (waiting at least its
  ``Retry-After`` delta-seconds, also honoured on 503), and a 2xx that is not the expected status or does not validate
  against the response schema -- the outcome of such a call is unknown (recovery scenario
  CR-CORE-004), so only a schema-valid expected status ends a call as a success. Never retried:
  any other 4xx.
- An ``ErrorResponse`` body becomes the exception class of its code (``cycles.errors``), with
  ``details``, ``request_id`` and ``trace_id``. When retries run out on a response that was not a
  conforming error, or on a transport failure, the call raises ``LedgerUnavailable`` (retryable).
- Responses are validated ignoring unknown fields: v0 servers may add fields (``cycles_evidence``
  and later additive fields), and additions must not break a client.

Budget administration is not part of protocol v0. With ``admin_key=`` the ledger uses this
project's operator plane (``/admin/budgets...``, ``X-Admin-API-Key``); without it those methods
raise ``InvalidRequest`` saying so. ``fund()`` (the governance spec's funding operations) is the
spec's ``POST /v1/admin/budgets/fund``, with the admin key or a tenant API key that has
``budgets:write``; it always sends an idempotency key, so a retry never applies it twice.
``sweep()`` is a no-op: the server expires reservations.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import AsyncGenerator, Callable, Generator, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast
from urllib.parse import quote, urlencode, urlsplit

from pydantic import BaseModel, TypeAdapter, ValidationError

from cycles import __version__
from cycles.errors import (
    CyclesError,
    Forbidden,
    InternalError,
    InvalidRequest,
    LedgerUnavailable,
    LimitExceeded,
    Unauthorized,
    error_for,
)
from cycles.ledger.base import AsyncLedger, Ledger
from cycles.ledger.counters import CounterPage, CounterQuery, CounterReset, CounterResetRequest
from cycles.ledger.funding import FundingOperation, FundingRequest, FundingResult, check_request
from cycles.ledger.periods import PeriodSpec
from cycles.ledger.quotas import EXTENSIONS_VERSION, PolicyEdit, ScopePolicy
from cycles.ledger.rules import BalanceQuery, ReservationQuery, new_idempotency_key
from cycles.models import (
    Amount,
    Balance,
    BalanceResponse,
    Budget,
    Caps,
    CommitRequest,
    CommitResponse,
    DecisionRequest,
    DecisionResponse,
    ErrorResponse,
    EventCreateRequest,
    EventCreateResponse,
    ReleaseRequest,
    ReleaseResponse,
    ReservationCreateRequest,
    ReservationCreateResponse,
    ReservationDetail,
    ReservationExtendRequest,
    ReservationExtendResponse,
    ReservationListResponse,
    SignedAmount,
    Unit,
)
from cycles.scopes import scope_tenant

if TYPE_CHECKING:
    import aiohttp

__all__ = ["AsyncHttpLedger", "HttpLedger", "open_async_http", "open_http", "trace_context"]

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

_USER_AGENT = f"cycles-python/{__version__}"
_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
_DELTA_SECONDS = re.compile(r"^\s*(\d+)\s*$")
#: What may go in a header value as is: visible ASCII and spaces (no CR/LF, so no header injection).
_HEADER_VALUE = re.compile(r"^[\x20-\x7e]*$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
#: 5xx statuses that say the request can never work; retrying them only delays the error.
_NOT_RETRIED_5XX = frozenset({501, 505})
_ADMIN_HINT = (
    "administration (budgets, API keys) is not part of Cycles protocol v0: pass admin_key=... (command line: "
    "--admin-key or $CYCLES_ADMIN_KEY) to use this server's operator plane (X-Admin-API-Key)"
)


# ---- trace propagation ----------------------------------------------------------------------

_TRACE: ContextVar[tuple[tuple[str, str], ...]] = ContextVar("cycles_http_trace", default=())


@contextlib.contextmanager
def trace_context(trace_id: str | None = None, *, traceparent: str | None = None) -> Iterator[None]:
    """Send trace headers with every Cycles HTTP request made inside the block.

    ``trace_id`` (32 lowercase hex characters, W3C trace-id) goes out as ``X-Cycles-Trace-Id``;
    ``traceparent`` is sent as is, and the server prefers it. The setting is a ``contextvars``
    value: asyncio tasks started inside the block inherit it, other threads do not."""
    headers: list[tuple[str, str]] = []
    if trace_id is not None:
        if not _TRACE_ID.match(trace_id) or trace_id == "0" * 32:
            raise ValueError("trace_id must be 32 lowercase hex characters, not all zero")
        headers.append(("X-Cycles-Trace-Id", trace_id))
    if traceparent is not None:
        if not _HEADER_VALUE.match(traceparent):
            raise ValueError("traceparent must be printable ASCII")
        headers.append(("traceparent", traceparent))
    token = _TRACE.set(tuple(headers))
    try:
        yield
    finally:
        _TRACE.reset(token)


# ---- the sans-I/O core ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Call(Generic[T]):
    """One logical operation: the exact request (re-sent unchanged on retry) and how to read it."""

    method: str
    target: str  # path + query, relative to the server root
    body: bytes | None
    headers: Mapping[str, str]
    expect: int | None  # the one success status the protocol defines; None: any 2xx (operator plane)
    parse: Callable[[bytes], T]


@dataclass(frozen=True, slots=True)
class _Raw:
    """What a transport got back. Only the headers the client reads are kept."""

    status: int
    body: bytes
    content_type: str | None = None
    retry_after: str | None = None
    request_id: str | None = None
    trace_id: str | None = None


@dataclass(frozen=True, slots=True)
class _Failure:
    """The request may or may not have reached the server: connection error, reset, timeout."""

    reason: str
    timeout: bool = False


@dataclass(frozen=True, slots=True)
class _Sleep:
    seconds: float


@dataclass(frozen=True, slots=True)
class _Retry:
    """A verdict: this attempt failed in a way a retry with the same request may fix."""

    reason: str
    error: CyclesError | None = None  # the conforming protocol error, if the server sent one
    retry_after_s: float | None = None
    http_status: int | None = None


_Flow = Generator[_Call[Any] | _Sleep, _Raw | _Failure | None, T]


def _model_parser(model: type[M]) -> Callable[[bytes], M]:
    def parse(body: bytes) -> M:
        return model.model_validate_json(body, extra="ignore")

    return parse


def _list_parser(adapter: TypeAdapter[list[Budget]]) -> Callable[[bytes], list[Balance]]:
    def parse(body: bytes) -> list[Balance]:
        data = json.loads(body)
        if isinstance(data, dict) and isinstance(data.get("budgets"), list):
            data = data["budgets"]
        return list(adapter.validate_python(data, extra="ignore"))

    return parse


# The operator plane answers with Budgets (a Balance plus status and caps).
_BUDGET_LIST: TypeAdapter[list[Budget]] = TypeAdapter(list[Budget])
_PARSE_RESERVE = _model_parser(ReservationCreateResponse)
_PARSE_COMMIT = _model_parser(CommitResponse)
_PARSE_RELEASE = _model_parser(ReleaseResponse)
_PARSE_EXTEND = _model_parser(ReservationExtendResponse)
_PARSE_DECIDE = _model_parser(DecisionResponse)
_PARSE_EVENT = _model_parser(EventCreateResponse)
_PARSE_BALANCES = _model_parser(BalanceResponse)
_PARSE_DETAIL = _model_parser(ReservationDetail)
_PARSE_LIST = _model_parser(ReservationListResponse)
_PARSE_BALANCE = _model_parser(Budget)
_PARSE_LEDGER_BALANCE = _model_parser(Balance)  # the admin spec's BudgetLedger: its Balance fields
_PARSE_BALANCE_LIST = _list_parser(_BUDGET_LIST)
_PARSE_POLICY = _model_parser(ScopePolicy)
_PARSE_COUNTERS = _model_parser(CounterPage)
_PARSE_RESET = _model_parser(CounterReset)


class _FundingWire(BaseModel):
    """The spec's BudgetFundingResponse (unknown fields ignored, like every response here)."""

    previous_allocated: Amount
    new_allocated: Amount
    previous_remaining: SignedAmount
    new_remaining: SignedAmount
    previous_debt: Amount | None = None
    new_debt: Amount | None = None
    previous_spent: Amount | None = None
    new_spent: Amount | None = None
    timestamp: str | None = None


def _funding_parser(req: FundingRequest) -> Callable[[bytes], FundingResult]:
    def side(allocated: Amount, remaining: SignedAmount, debt: Amount | None, spent: Amount | None) -> Balance:
        reserved = None  # not on the wire: derived from the others when the server sent spent
        if spent is not None:
            held = allocated.amount - spent.amount - (debt.amount if debt else 0) - remaining.amount
            reserved = Amount(unit=allocated.unit, amount=held) if held >= 0 else None
        return Balance(
            scope=req.scope,
            scope_path=req.scope,
            remaining=remaining,
            allocated=allocated,
            debt=debt,
            spent=spent,
            reserved=reserved,
        )

    def parse(body: bytes) -> FundingResult:
        from cycles.ledger.records import parse_time

        w = _FundingWire.model_validate_json(body)
        at = parse_time(w.timestamp) if w.timestamp else None
        return FundingResult(
            operation=req.operation,
            scope=req.scope,
            unit=req.unit,
            before=side(w.previous_allocated, w.previous_remaining, w.previous_debt, w.previous_spent),
            after=side(w.new_allocated, w.new_remaining, w.new_debt, w.new_spent),
            funded_at_ms=at if at is not None else int(time.time() * 1000),
        )

    return parse


def _parse_policies(body: bytes) -> list[ScopePolicy]:
    return [ScopePolicy.model_validate(p) for p in json.loads(body)["policies"]]


def _parse_sweep(body: bytes) -> int:
    return int(json.loads(body)["expired"])


def _parse_key(body: bytes) -> dict[str, Any]:
    data = json.loads(body)
    if not isinstance(data, dict) or not isinstance(data.get("key_id"), str):
        raise ValueError("not an API key record")
    return data


def _parse_keys(body: bytes) -> list[dict[str, Any]]:
    data = json.loads(body)
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, list) or not all(isinstance(k, dict) and "key_id" in k for k in keys):
        raise ValueError("not a list of API key records")
    return keys


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _query(pairs: list[tuple[str, str | None]]) -> str:
    present = [(k, v) for k, v in pairs if v is not None and v != ""]
    return "?" + urlencode(present, quote_via=quote) if present else ""


def _excerpt(body: bytes, limit: int = 200) -> str:
    text = body[:limit].decode("utf-8", "replace")
    return text + ("..." if len(body) > limit else "")


@dataclass(frozen=True, slots=True)
class _Endpoint:
    scheme: str
    host: str
    port: int
    prefix: str  # path prefix before /v1 and /admin, "" or "/something"

    @classmethod
    def parse(cls, url: str) -> _Endpoint:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise InvalidRequest(f"not an http(s) ledger URL: {url!r}")
        if parts.username or parts.password:
            raise InvalidRequest("put credentials in api_key= / admin_key=, not in the ledger URL")
        if parts.query or parts.fragment:
            raise InvalidRequest(f"a ledger URL has no query or fragment: {url!r}")
        prefix = parts.path.rstrip("/")
        if prefix.endswith("/v1"):  # a spec server_id already ends in /v1
            prefix = prefix[:-3]
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError as exc:
            raise InvalidRequest(f"bad port in ledger URL {url!r}") from exc
        return cls(scheme, parts.hostname, port, prefix)

    @property
    def origin(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return f"{self.scheme}://{host}" + ("" if self.port == default else f":{self.port}")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard to try before giving up. ``attempts`` counts the first try.

    Backoff is exponential with full jitter (``backoff_s * 2**n``, capped at ``max_backoff_s``).
    A 429's ``Retry-After`` is a floor, never shortened; when it exceeds ``max_retry_after_s`` the
    call stops waiting and raises ``LimitExceeded`` carrying ``retry_after_s`` for the caller.
    """

    attempts: int = 3
    backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    max_retry_after_s: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise InvalidRequest("retries must be >= 0")
        if min(self.backoff_s, self.max_backoff_s, self.max_retry_after_s) < 0:
            raise InvalidRequest("backoff and Retry-After limits must be >= 0")

    def delay(self, attempt: int, retry_after_s: float | None, rng: random.Random) -> float:
        jittered = rng.uniform(0, min(self.max_backoff_s, self.backoff_s * 2**attempt))
        if retry_after_s is None:
            return jittered
        return retry_after_s + rng.uniform(0, self.backoff_s)


class _HttpCore:
    """Request building, response reading, error mapping and the retry flow. No I/O."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None,
        admin_key: str | None,
        retry: RetryPolicy,
        headers: Mapping[str, str] | None,
    ) -> None:
        if api_key is None:
            api_key = os.environ.get("CYCLES_API_KEY")
        self.url = url
        self.endpoint = _Endpoint.parse(url)
        self.api_key = api_key
        self.admin_key = admin_key
        self.retry = retry
        self._rng = random.Random()
        # X-Cycles-Extensions: this client reads the v0.1.26 additions (deny_detail on DENY bodies).
        base = {
            "Accept": "application/json",
            "User-Agent": _USER_AGENT,
            "X-Cycles-Extensions": EXTENSIONS_VERSION,
            **(headers or {}),
        }
        for name, value in [*base.items(), ("api_key", api_key or ""), ("admin_key", admin_key or "")]:
            if not _HEADER_NAME.match(name) or not _HEADER_VALUE.match(value):
                raise InvalidRequest(f"{name}: header names and values must be printable ASCII")
        self._runtime_headers = dict(base)
        if api_key:
            self._runtime_headers["X-Cycles-API-Key"] = api_key
        elif admin_key:
            # The spec lets an admin key read and release any reservation (AdminKeyAuth).
            self._runtime_headers["X-Admin-API-Key"] = admin_key
        self._admin_headers = dict(base)
        if admin_key:
            self._admin_headers["X-Admin-API-Key"] = admin_key
        self._v1 = self.endpoint.prefix + "/v1"
        self._admin = self.endpoint.prefix + "/admin"

    # -- building requests -----------------------------------------------------------------

    def _headers(self, base: Mapping[str, str], body: bool, idempotency_key: str | None) -> dict[str, str]:
        headers = dict(base)
        if body:
            headers["Content-Type"] = "application/json"
        # The header is optional and the body's key is authoritative: a key that cannot travel in a
        # header verbatim (newline, non-ASCII) goes in the body only.
        if idempotency_key is not None and _HEADER_VALUE.match(idempotency_key):
            headers["X-Idempotency-Key"] = idempotency_key
        trace = _TRACE.get()
        if trace:
            headers.update(trace)
        return headers

    def _post(
        self, path: str, req: BaseModel, idempotency_key: str, expect: int, parse: Callable[[bytes], T]
    ) -> _Call[T]:
        body = req.model_dump_json(exclude_none=True).encode()
        return _Call(
            "POST",
            self._v1 + path,
            body,
            self._headers(self._runtime_headers, True, idempotency_key),
            expect,
            parse,
        )

    def _get(self, path: str, parse: Callable[[bytes], T]) -> _Call[T]:
        headers = self._headers(self._runtime_headers, False, None)
        return _Call("GET", self._v1 + path, None, headers, 200, parse)

    @staticmethod
    def _rid(reservation_id: str) -> str:
        return quote(reservation_id, safe="")

    def reserve(self, req: ReservationCreateRequest) -> _Call[ReservationCreateResponse]:
        return self._post("/reservations", req, req.idempotency_key, 200, _PARSE_RESERVE)

    def commit(self, reservation_id: str, req: CommitRequest) -> _Call[CommitResponse]:
        path = f"/reservations/{self._rid(reservation_id)}/commit"
        return self._post(path, req, req.idempotency_key, 200, _PARSE_COMMIT)

    def release(self, reservation_id: str, req: ReleaseRequest) -> _Call[ReleaseResponse]:
        path = f"/reservations/{self._rid(reservation_id)}/release"
        return self._post(path, req, req.idempotency_key, 200, _PARSE_RELEASE)

    def extend(self, reservation_id: str, req: ReservationExtendRequest) -> _Call[ReservationExtendResponse]:
        path = f"/reservations/{self._rid(reservation_id)}/extend"
        return self._post(path, req, req.idempotency_key, 200, _PARSE_EXTEND)

    def decide(self, req: DecisionRequest) -> _Call[DecisionResponse]:
        return self._post("/decide", req, req.idempotency_key, 200, _PARSE_DECIDE)

    def event(self, req: EventCreateRequest) -> _Call[EventCreateResponse]:
        return self._post("/events", req, req.idempotency_key, 201, _PARSE_EVENT)

    def balances(self, q: BalanceQuery) -> _Call[BalanceResponse]:
        query = _query(
            [
                *q.pairs(),
                ("include_children", "true" if q.include_children else None),
                ("limit", str(q.limit)),
                ("cursor", q.cursor),
            ]
        )
        return self._get("/balances" + query, _PARSE_BALANCES)

    def get_reservation(self, reservation_id: str) -> _Call[ReservationDetail]:
        return self._get(f"/reservations/{self._rid(reservation_id)}", _PARSE_DETAIL)

    def list_reservations(self, q: ReservationQuery) -> _Call[ReservationListResponse]:
        sort_dir = q.sort_dir if (q.sort_by or q.sort_dir != "desc") else None
        query = _query(
            [
                ("idempotency_key", q.idempotency_key),
                ("status", q.status.value if q.status is not None else None),
                *q.pairs(),
                ("from", _iso(q.created_from_ms)),
                ("to", _iso(q.created_to_ms)),
                ("expires_from", _iso(q.expires_from_ms)),
                ("expires_to", _iso(q.expires_to_ms)),
                ("finalized_from", _iso(q.finalized_from_ms)),
                ("finalized_to", _iso(q.finalized_to_ms)),
                ("sort_by", q.sort_by),
                ("sort_dir", sort_dir),
                ("include", ",".join(q.include) if q.include else None),
                ("limit", str(q.limit)),
                ("cursor", q.cursor),
            ]
        )
        return self._get("/reservations" + query, _PARSE_LIST)

    # operator plane (this project's admin API, not protocol v0)

    def _admin_call(
        self, method: str, path: str, payload: dict[str, Any] | None, parse: Callable[[bytes], T]
    ) -> _Call[T]:
        if not self.admin_key:
            raise InvalidRequest(_ADMIN_HINT)
        body = json.dumps(payload, separators=(",", ":")).encode() if payload is not None else None
        headers = self._headers(self._admin_headers, body is not None, None)
        return _Call(method, self._admin + path, body, headers, None, parse)

    def set_budget(
        self,
        scope: str,
        amount: Amount,
        overdraft_limit: Amount | None,
        caps: Caps | None,
        period: PeriodSpec | None = None,
    ) -> _Call[Balance]:
        payload: dict[str, Any] = {"scope": scope, "amount": amount.to_wire()}
        if overdraft_limit is not None:
            payload["overdraft_limit"] = overdraft_limit.to_wire()
        if caps is not None:
            payload["caps"] = caps.to_wire()
        if period is not None:
            payload["period"] = period.period or "none"
            payload.update(
                {k: v for k, v in (("timezone", period.timezone), ("rollover_policy", period.rollover_policy)) if v}
            )
        return self._admin_call("POST", "/budgets", payload, _PARSE_BALANCE)

    def fund_budget(self, scope: str, amount: Amount) -> _Call[Balance]:
        payload = {"scope": scope, "amount": amount.to_wire()}
        return self._admin_call("POST", "/budgets/fund", payload, _PARSE_BALANCE)

    def set_overdraft_limit(self, scope: str, limit: Amount) -> _Call[Balance]:
        """The governance spec's updateBudget with only ``overdraft_limit`` (admin key): the server
        changes the limit alone, never the amounts."""
        if not self.admin_key:
            raise InvalidRequest(_ADMIN_HINT)
        query = _query([("scope", scope), ("unit", limit.unit.value)])
        body = json.dumps({"overdraft_limit": limit.to_wire()}, separators=(",", ":")).encode()
        headers = self._headers(self._admin_headers, True, None)
        return _Call("PATCH", self._v1 + "/admin/budgets" + query, body, headers, 200, _PARSE_LEDGER_BALANCE)

    def fund(self, req: FundingRequest, idempotency_key: str | None) -> _Call[FundingResult]:
        """The governance spec's fundBudget, with the admin key (or the tenant's API key: the
        operation is dual-auth). A key is always sent, so a retried request is never applied twice."""
        if not (self.admin_key or self.api_key):
            raise InvalidRequest(_ADMIN_HINT)
        key = idempotency_key or new_idempotency_key()
        payload: dict[str, Any] = {"operation": req.operation.value, "amount": req.amount.to_wire()}
        if req.spent is not None:
            payload["spent"] = req.spent.to_wire()
        payload["idempotency_key"] = key
        query = _query([("tenant_id", scope_tenant(req.scope)), ("scope", req.scope), ("unit", req.unit.value)])
        base = self._admin_headers if self.admin_key else self._runtime_headers
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = self._headers(base, True, key)
        return _Call("POST", self._v1 + "/admin/budgets/fund" + query, body, headers, 200, _funding_parser(req))

    def set_budget_status(self, scope: str, status: str, unit: Unit | None) -> _Call[list[Balance]]:
        payload: dict[str, Any] = {"scope": scope, "status": status}
        if unit is not None:
            payload["unit"] = Unit(unit).value
        return self._admin_call("POST", "/budgets/status", payload, _PARSE_BALANCE_LIST)

    def get_budget(self, scope: str, unit: Unit | None) -> _Call[Balance]:
        query = _query([("unit", Unit(unit).value if unit is not None else None)])
        return self._admin_call("GET", "/budgets/" + quote(scope, safe=":/") + query, None, _PARSE_BALANCE)

    def delete_budget(self, scope: str, unit: Unit | None, force: bool) -> _Call[list[Balance]]:
        query = _query([("unit", Unit(unit).value if unit is not None else None), ("force", "true" if force else None)])
        return self._admin_call("DELETE", "/budgets/" + quote(scope, safe=":/") + query, None, _PARSE_BALANCE_LIST)

    def list_budgets(self, tenant: str | None) -> _Call[list[Balance]]:
        return self._admin_call("GET", "/budgets" + _query([("tenant", tenant)]), None, _PARSE_BALANCE_LIST)

    def update_policy(self, scope: str, edit: PolicyEdit) -> _Call[ScopePolicy]:
        payload = {"scope": scope, **edit.model_dump(mode="json", exclude_none=True)}
        return self._admin_call("POST", "/policies", payload, _PARSE_POLICY)

    def list_policies(self, tenant: str | None) -> _Call[list[ScopePolicy]]:
        return self._admin_call("GET", "/policies" + _query([("tenant", tenant)]), None, _parse_policies)

    # action quota counters (cycles-action-kinds): the admin key reads any tenant's (tenant_id
    # required), a tenant key its own; only the admin key resets.
    def list_quota_counters(self, q: CounterQuery) -> _Call[CounterPage]:
        query = _query(
            [
                ("tenant_id", q.tenant),
                ("scope", q.scope),
                ("action_kind", q.action_kind),
                ("window", q.window),
                ("run_id", q.run_id),
                ("include_zero", "true" if q.include_zero else None),
                ("cursor", q.cursor),
                ("limit", str(q.limit)),
            ]
        )
        headers = self._headers(self._admin_headers if self.admin_key else self._runtime_headers, False, None)
        return _Call("GET", self._v1 + "/admin/action-quota-counters" + query, None, headers, 200, _PARSE_COUNTERS)

    def reset_quota_counter(self, req: CounterResetRequest) -> _Call[CounterReset]:
        if not self.admin_key:
            raise InvalidRequest(
                "resetting a quota counter needs the admin key (AdminKeyAuth only): pass admin_key=..."
            )
        body = req.model_dump_json(exclude_none=True).encode()
        headers = self._headers(self._admin_headers, True, None)
        return _Call("POST", self._v1 + "/admin/action-quota-counters/reset", body, headers, 200, _PARSE_RESET)

    def sweep(self, limit: int) -> _Call[int] | None:
        """Our server's operator plane can sweep on demand; without an admin key (or against
        another server) there is nothing to do from a client: the server expires on its own."""
        if not self.admin_key:
            return None
        return self._admin_call("POST", "/sweep" + _query([("limit", str(limit))]), None, _parse_sweep)

    def create_key(self, tenant: str, name: str | None) -> _Call[dict[str, Any]]:
        payload = {"tenant": tenant, **({"name": name} if name is not None else {})}
        return self._admin_call("POST", "/keys", payload, _parse_key)

    def list_keys(self, tenant: str | None) -> _Call[list[dict[str, Any]]]:
        return self._admin_call("GET", "/keys" + _query([("tenant", tenant)]), None, _parse_keys)

    def revoke_key(self, key_id: str) -> _Call[dict[str, Any]]:
        return self._admin_call("DELETE", "/keys/" + quote(key_id, safe=""), None, _parse_key)

    # -- reading responses -----------------------------------------------------------------

    def flow(self, call: _Call[T]) -> _Flow[T]:
        """Send ``call`` until it ends: yields the call (send it back a ``_Raw`` or ``_Failure``) and
        ``_Sleep`` pauses; returns the parsed success or raises the error to surface."""
        attempts = self.retry.attempts
        for attempt in range(attempts):
            outcome = yield call
            if isinstance(outcome, _Failure):
                kind = "timed out" if outcome.timeout else "failed"
                verdict = _Retry(f"request {kind}: {outcome.reason}")
            elif isinstance(outcome, _Raw):
                result = self._read(call, outcome)
                if not isinstance(result, _Retry):
                    return result
                verdict = result
            else:  # pragma: no cover - a shell bug
                raise TypeError(f"flow expected a response, got {outcome!r}")
            if verdict.retry_after_s is not None and verdict.retry_after_s > self.retry.max_retry_after_s:
                raise self._give_up(call, verdict, attempt + 1)
            if attempt + 1 == attempts:
                raise self._give_up(call, verdict, attempts)
            yield _Sleep(self.retry.delay(attempt, verdict.retry_after_s, self._rng))
        raise AssertionError("unreachable")

    def _read(self, call: _Call[T], raw: _Raw) -> T | _Retry:
        status = raw.status
        if 200 <= status < 300:
            if call.expect is not None and status != call.expect:
                return _Retry(f"HTTP {status} where the protocol defines {call.expect}", http_status=status)
            try:
                return call.parse(raw.body)
            except (ValidationError, ValueError) as exc:
                problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                reason = f"HTTP {status} body does not match the response schema ({problem})"
                return _Retry(reason, http_status=status)
        error = self._error(call, raw)
        if status == 429 or (status >= 500 and status not in _NOT_RETRIED_5XX):
            reason = str(error) if error is not None else f"HTTP {status}: {_excerpt(raw.body)}"
            retry_after = _retry_after(raw.retry_after) if status in (429, 503) else None
            return _Retry(reason, error=error, retry_after_s=retry_after, http_status=status)
        if error is not None:
            raise error
        raise self._nonconforming(call, raw)

    def _error(self, call: _Call[Any], raw: _Raw) -> CyclesError | None:
        """The protocol error in ``raw``, or None when the body is not an ErrorResponse."""
        try:
            parsed = ErrorResponse.model_validate_json(raw.body, extra="ignore")
        except (ValidationError, ValueError):
            return None
        retry_after = _retry_after(raw.retry_after) if raw.status == 429 else None
        return error_for(
            parsed.error,
            parsed.message,
            details=parsed.details,
            request_id=parsed.request_id or raw.request_id,
            trace_id=parsed.trace_id or raw.trace_id,
            retry_after_s=retry_after,
        )

    def _nonconforming(self, call: _Call[Any], raw: _Raw) -> CyclesError:
        """A non-retryable status whose body is not an ErrorResponse (a proxy, a wrong URL, ...)."""
        details = {
            "http_status": raw.status,
            "method": call.method,
            "url": self.endpoint.origin + call.target,
            "content_type": raw.content_type,
            "body": _excerpt(raw.body),
        }
        message = f"HTTP {raw.status} from {call.method} {call.target} is not a Cycles error response"
        cls: type[CyclesError] = {401: Unauthorized, 403: Forbidden}.get(raw.status, InternalError)
        return cls(message, details=details, request_id=raw.request_id, trace_id=raw.trace_id)

    def _give_up(self, call: _Call[Any], verdict: _Retry, attempts: int) -> CyclesError:
        url = self.endpoint.origin + call.target
        if verdict.error is not None:
            err = verdict.error
            err.details.setdefault("attempts", attempts)
            err.details.setdefault("url", url)
            return err
        details: dict[str, Any] = {
            "attempts": attempts,
            "method": call.method,
            "url": url,
            "reason": verdict.reason,
        }
        if verdict.http_status is not None:
            details["http_status"] = verdict.http_status
        if verdict.http_status == 429:  # throttled, whatever the body said: the protocol's LIMIT_EXCEEDED
            message = f"{call.method} {url}: rate limited ({verdict.reason})"
            return LimitExceeded(message, details=details, retry_after_s=verdict.retry_after_s)
        tries = f"gave up after {attempts} attempt{'s' * (attempts > 1)}"
        if call.method == "GET":  # a read changes nothing: there is no outcome to be unsure of
            advice = f"is the Cycles server at {self.endpoint.origin} running and reachable?"
        else:
            advice = "the outcome is unknown, retry with the same idempotency key"
        message = f"{call.method} {url}: {verdict.reason} ({tries}; {advice})"
        return LedgerUnavailable(message, details=details, retry_after_s=verdict.retry_after_s)


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` as delta-seconds. The HTTP-date form is invalid in this protocol: ignored."""
    if value is None:
        return None
    match = _DELTA_SECONDS.match(value)
    return float(match.group(1)) if match else None


# ---- transports -----------------------------------------------------------------------------


class _StdlibTransport:
    """Blocking HTTP/1.1 on plain sockets with a thread-safe LIFO pool of keep-alive connections.

    The request goes out in one ``sendall`` (headers and body together, ``TCP_NODELAY``) and the
    response is read by the standard library's ``http.client.HTTPResponse`` (content-length,
    chunked, ``Connection: close``). Measured against httpx.Client, urllib3 and ``http.client``
    on the same endpoint, that does the least work per request (``bench/bench_transport.py``):
    httpx and ``http.client`` write headers and body in two sends, and httpx adds per-request pool
    bookkeeping. A pooled connection the server closed meanwhile is retried once on a fresh
    connection before the attempt counts as failed.
    """

    def __init__(
        self,
        endpoint: _Endpoint,
        *,
        timeout: float,
        connect_timeout: float,
        ssl_context: ssl.SSLContext | None,
        max_idle: int,
    ) -> None:
        self._endpoint = endpoint
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        if ssl_context is None and endpoint.scheme == "https":
            ssl_context = ssl.create_default_context()
        self._ssl = ssl_context
        self._max_idle = max_idle
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        default_port = 443 if endpoint.scheme == "https" else 80
        host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
        self._host_header = host if endpoint.port == default_port else f"{host}:{endpoint.port}"

    def _connect(self) -> socket.socket:
        ep = self._endpoint
        sock = socket.create_connection((ep.host, ep.port), timeout=self._connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(sock, server_hostname=ep.host)
            sock.settimeout(self._timeout)
        except BaseException:
            sock.close()
            raise
        return sock

    def _encode(self, call: _Call[Any]) -> bytes:
        lines = [f"{call.method} {call.target} HTTP/1.1", f"Host: {self._host_header}"]
        lines += [f"{name}: {value}" for name, value in call.headers.items()]
        if call.body is not None:
            lines.append(f"Content-Length: {len(call.body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head + call.body if call.body else head

    def send(self, call: _Call[Any]) -> _Raw | _Failure:
        request = self._encode(call)
        for _ in range(2):
            with self._lock:
                sock = self._idle.pop() if self._idle else None
            reused = sock is not None
            if sock is None:
                try:
                    sock = self._connect()
                except TimeoutError:
                    return _Failure(f"could not connect within {self._connect_timeout}s", timeout=True)
                except OSError as exc:
                    return _Failure(f"could not connect: {type(exc).__name__}: {exc}")
            try:
                resp, body = _exchange(sock, request, call.method)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                sock.close()
                if reused:
                    continue  # the server had closed this idle keep-alive connection: try a fresh one
                return _Failure(f"{type(exc).__name__}: {exc}")
            except TimeoutError:
                sock.close()
                return _Failure(f"no response within {self._timeout}s", timeout=True)
            except (OSError, http.client.HTTPException) as exc:
                sock.close()
                return _Failure(f"{type(exc).__name__}: {exc}")
            except BaseException:  # KeyboardInterrupt mid-exchange: the socket's state is unknown
                sock.close()
                raise
            if resp.will_close:
                sock.close()
            else:
                self._checkin(sock)
            return _Raw(
                resp.status,
                body,
                resp.getheader("Content-Type"),
                resp.getheader("Retry-After"),
                resp.getheader("X-Request-Id"),
                resp.getheader("X-Cycles-Trace-Id"),
            )
        return _Failure("the server closed the connection before answering")

    def _checkin(self, sock: socket.socket) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(sock)
                return
        sock.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()


def _exchange(sock: socket.socket, request: bytes, method: str) -> tuple[http.client.HTTPResponse, bytes]:
    sock.sendall(request)
    resp = http.client.HTTPResponse(sock, method=method)
    try:
        resp.begin()
        return resp, resp.read()
    finally:
        resp.close()  # closes the response's file object only; the socket stays open for reuse


class _AiohttpTransport:
    """Non-blocking HTTP/1.1 over aiohttp: its C response parser, one write per request, O(1) pool.

    httpx.AsyncClient (httpcore 1.0.9) was measured at a fraction of aiohttp's throughput with 32
    concurrent requests, with a long latency tail. The cause is httpcore's connection pool, not
    the pool limits or HTTP/2: an idle connection stays "available" until the request assigned to
    it starts, so concurrent requests are assigned the *same* connection, all but one fail with
    ``ConnectionNotAvailable`` and are re-queued; at 32 concurrent requests each request took ~5
    attempts, ~6 full pool scans under the pool lock and ~77 socket-readability ``poll()`` calls.
    Raising ``max_keepalive_connections`` or ``max_connections`` does not change that.

    aiohttp binds its session to the event loop that created it, so the session is created on
    first use inside the running loop, closed when that loop shuts down, and created again if the
    ledger is used from another loop (``asyncio.run`` twice, a test per loop).
    """

    def __init__(
        self,
        endpoint: _Endpoint,
        *,
        timeout: float,
        connect_timeout: float,
        ssl_context: ssl.SSLContext | None,
        max_connections: int,
    ) -> None:
        try:
            import aiohttp
        except ImportError as exc:  # pragma: no cover - exercised by the missing-extra test
            raise ImportError(
                f"AsyncCycles over http(s):// needs aiohttp: pip install 'cycles-core[http]' ({exc})"
            ) from exc
        self._origin = endpoint.origin
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout)
        self._timeout_s = timeout
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._guard: AsyncGenerator[None, None] | None = None
        self._errors: tuple[type[BaseException], ...] = (aiohttp.ClientError, OSError)

    async def _open_session(self) -> aiohttp.ClientSession:
        """A session for the running loop, closed when that loop shuts down (see ``_closed_with``)."""
        loop = asyncio.get_running_loop()
        old, old_loop = self._session, self._loop
        if old is not None and not old.closed:
            _abandon(old, old_loop)
        import aiohttp  # already imported by __init__: a dictionary lookup

        connector = aiohttp.TCPConnector(limit=self._max_connections, ssl=self._ssl)
        session = aiohttp.ClientSession(connector=connector, timeout=self._timeout, trust_env=False)
        guard = _closed_with(session)
        await guard.asend(None)  # first iteration: the loop now tracks it and closes it at shutdown
        self._session, self._loop, self._guard = session, loop, guard
        return session

    async def send(self, call: _Call[Any]) -> _Raw | _Failure:
        session = self._session
        if session is None or session.closed or self._loop is not asyncio.get_running_loop():
            session = await self._open_session()
        try:
            async with session.request(
                call.method,
                self._origin + call.target,
                data=call.body,
                headers=call.headers,
                allow_redirects=False,
            ) as resp:
                body = await resp.read()
                headers = resp.headers
                return _Raw(
                    resp.status,
                    body,
                    headers.get("Content-Type"),
                    headers.get("Retry-After"),
                    headers.get("X-Request-Id"),
                    headers.get("X-Cycles-Trace-Id"),
                )
        except TimeoutError as exc:  # aiohttp's timeouts subclass TimeoutError (asyncio's, since 3.11)
            return _Failure(f"no response within {self._timeout_s}s ({type(exc).__name__})", timeout=True)
        except self._errors as exc:
            return _Failure(f"{type(exc).__name__}: {exc}")

    async def close(self) -> None:
        session, loop, guard = self._session, self._loop, self._guard
        self._session = self._loop = self._guard = None
        if session is None or session.closed:
            return
        if loop is asyncio.get_running_loop() and guard is not None:
            await guard.aclose()  # closes the session
        else:
            _abandon(session, loop)


async def _closed_with(session: aiohttp.ClientSession) -> AsyncGenerator[None, None]:
    """An async generator started in the session's loop. ``asyncio.run`` (and any runner) closes
    the open async generators of a loop before closing the loop, which runs this ``finally``: the
    session's connections are closed while their loop can still do it."""
    try:
        yield
    finally:
        if not session.closed:
            await session.close()


def _abandon(session: aiohttp.ClientSession, loop: asyncio.AbstractEventLoop | None) -> None:
    """Let go of a session whose loop is not the running one: close it on its own loop if that
    loop still runs (another thread), else detach it (its loop closed without shutting down)."""
    if loop is not None and loop.is_running() and not loop.is_closed():
        asyncio.run_coroutine_threadsafe(session.close(), loop)
    else:
        session.detach()


# ---- the shells -----------------------------------------------------------------------------


class HttpLedger(Ledger):
    """A remote Cycles server, blocking. Thread-safe: one pool of keep-alive connections.

    Options (``Cycles("http://host:7878", api_key=..., ...)`` passes them through):

    - ``api_key``: sent as ``X-Cycles-API-Key`` (default ``$CYCLES_API_KEY``). The server derives
      the tenant from it, so the interface's ``tenant=`` arguments are not sent.
    - ``admin_key``: enables the budget methods over this project's operator plane. Never read
      from the environment: a process gets operator rights only when its code asks for them.
    - ``timeout`` (5 s): how long one attempt waits for its response; ``connect_timeout`` (2 s).
    - ``retries`` (2): extra attempts after a transport failure, a timeout, a 5xx, a 429 or a
      non-conforming 2xx, each re-sending the same request and idempotency key, with exponential
      backoff and full jitter (``backoff_s``, ``max_backoff_s``). A ``Retry-After`` longer than
      ``max_retry_after_s`` (30 s) is not waited out: ``LimitExceeded`` carries it instead.
    - ``max_idle_connections`` (32): keep-alive sockets kept for reuse.
    - ``ssl_context``: for ``https://`` (default: verified against the system's trust store).
    - ``headers``: extra headers on every request.
    """

    blocking = True

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        admin_key: str | None = None,
        timeout: float = 5.0,
        connect_timeout: float = 2.0,
        retries: int = 2,
        backoff_s: float = 0.05,
        max_backoff_s: float = 2.0,
        max_retry_after_s: float = 30.0,
        max_idle_connections: int = 32,
        ssl_context: ssl.SSLContext | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        retry = RetryPolicy(retries + 1, backoff_s, max_backoff_s, max_retry_after_s)
        self._core = _HttpCore(url, api_key=api_key, admin_key=admin_key, retry=retry, headers=headers)
        self.url = url
        self._transport = _StdlibTransport(
            self._core.endpoint,
            timeout=timeout,
            connect_timeout=connect_timeout,
            ssl_context=ssl_context,
            max_idle=max_idle_connections,
        )

    def _run(self, call: _Call[T]) -> T:
        flow = self._core.flow(call)
        try:
            step = next(flow)
            while True:
                if isinstance(step, _Sleep):
                    time.sleep(step.seconds)
                    step = flow.send(None)
                else:
                    step = flow.send(self._transport.send(step))
        except StopIteration as stop:
            return cast(T, stop.value)

    def reserve(self, req: ReservationCreateRequest, *, tenant: str | None = None) -> ReservationCreateResponse:
        return self._run(self._core.reserve(req))

    def commit(self, reservation_id: str, req: CommitRequest, *, tenant: str | None = None) -> CommitResponse:
        return self._run(self._core.commit(reservation_id, req))

    def release(self, reservation_id: str, req: ReleaseRequest, *, tenant: str | None = None) -> ReleaseResponse:
        return self._run(self._core.release(reservation_id, req))

    def extend(
        self, reservation_id: str, req: ReservationExtendRequest, *, tenant: str | None = None
    ) -> ReservationExtendResponse:
        return self._run(self._core.extend(reservation_id, req))

    def decide(self, req: DecisionRequest, *, tenant: str | None = None) -> DecisionResponse:
        return self._run(self._core.decide(req))

    def event(self, req: EventCreateRequest, *, tenant: str | None = None) -> EventCreateResponse:
        return self._run(self._core.event(req))

    def balances(self, query: BalanceQuery, *, tenant: str | None = None) -> BalanceResponse:
        return self._run(self._core.balances(query))

    def get_reservation(self, reservation_id: str, *, tenant: str | None = None) -> ReservationDetail:
        return self._run(self._core.get_reservation(reservation_id))

    def list_reservations(self, query: ReservationQuery, *, tenant: str | None = None) -> ReservationListResponse:
        return self._run(self._core.list_reservations(query))

    def set_budget(
        self,
        scope: str,
        amount: Amount,
        *,
        overdraft_limit: Amount | None = None,
        caps: Caps | None = None,
        period: PeriodSpec | None = None,
    ) -> Balance:
        return self._run(self._core.set_budget(scope, amount, overdraft_limit, caps, period))

    def fund_budget(self, scope: str, amount: Amount) -> Balance:
        return self._run(self._core.fund_budget(scope, amount))

    def set_overdraft_limit(self, scope: str, limit: Amount) -> Balance:
        return self._run(self._core.set_overdraft_limit(scope, limit))

    def fund(
        self,
        scope: str,
        unit: Unit,
        operation: FundingOperation | str,
        amount: Amount,
        *,
        spent: Amount | None = None,
        idempotency_key: str | None = None,
    ) -> FundingResult:
        req = check_request(scope, unit, operation, amount, spent, idempotency_key)
        return self._run(self._core.fund(req, idempotency_key))

    def set_budget_status(self, scope: str, status: str, *, unit: Unit | None = None) -> list[Balance]:
        return self._run(self._core.set_budget_status(scope, status, unit))

    def delete_budget(self, scope: str, *, unit: Unit | None = None, force: bool = False) -> list[Balance]:
        return self._run(self._core.delete_budget(scope, unit, force))

    def get_budget(self, scope: str, *, unit: Unit | None = None) -> Balance:
        return self._run(self._core.get_budget(scope, unit))

    def list_budgets(self, *, tenant: str | None = None) -> list[Balance]:
        return self._run(self._core.list_budgets(tenant))

    def update_policy(self, scope: str, edit: PolicyEdit) -> ScopePolicy:
        return self._run(self._core.update_policy(scope, edit))

    def list_policies(self, *, tenant: str | None = None) -> list[ScopePolicy]:
        return self._run(self._core.list_policies(tenant))

    def list_quota_counters(self, query: CounterQuery, *, tenant: str | None = None) -> CounterPage:
        return self._run(self._core.list_quota_counters(query))

    def reset_quota_counter(self, req: CounterResetRequest, *, tenant: str | None = None) -> CounterReset:
        return self._run(self._core.reset_quota_counter(req))

    def sweep(self, limit: int = 1000) -> int:
        call = self._core.sweep(limit)
        return self._run(call) if call is not None else 0

    # API keys, through our server's operator plane (needs admin_key): what ``cycles keys`` uses
    # against an http(s):// ledger. Records are the server's JSON (``api_key`` only on creation).

    def create_key(self, tenant: str, name: str | None = None) -> dict[str, Any]:
        return self._run(self._core.create_key(tenant, name))

    def list_keys(self, tenant: str | None = None) -> list[dict[str, Any]]:
        return self._run(self._core.list_keys(tenant))

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        return self._run(self._core.revoke_key(key_id))

    def close(self) -> None:
        self._transport.close()

    def __repr__(self) -> str:
        return f"HttpLedger({self.url!r})"


class AsyncHttpLedger(AsyncLedger):
    """A remote Cycles server, awaited. The options of ``HttpLedger``, except that
    ``max_connections`` (100) bounds the connections open at once: requests beyond it wait for one,
    and that wait counts toward ``timeout``."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        admin_key: str | None = None,
        timeout: float = 5.0,
        connect_timeout: float = 2.0,
        retries: int = 2,
        backoff_s: float = 0.05,
        max_backoff_s: float = 2.0,
        max_retry_after_s: float = 30.0,
        max_connections: int = 100,
        ssl_context: ssl.SSLContext | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        retry = RetryPolicy(retries + 1, backoff_s, max_backoff_s, max_retry_after_s)
        self._core = _HttpCore(url, api_key=api_key, admin_key=admin_key, retry=retry, headers=headers)
        self.url = url
        self._transport = _AiohttpTransport(
            self._core.endpoint,
            timeout=timeout,
            connect_timeout=connect_timeout,
            ssl_context=ssl_context,
            max_connections=max_connections,
        )

    async def _run(self, call: _Call[T]) -> T:
        flow = self._core.flow(call)
        try:
            step = next(flow)
            while True:
                if isinstance(step, _Sleep):
                    await asyncio.sleep(step.seconds)
                    step = flow.send(None)
                else:
                    step = flow.send(await self._transport.send(step))
        except StopIteration as stop:
            return cast(T, stop.value)

    async def reserve(self, req: ReservationCreateRequest, *, tenant: str | None = None) -> ReservationCreateResponse:
        return await self._run(self._core.reserve(req))

    async def commit(self, reservation_id: str, req: CommitRequest, *, tenant: str | None = None) -> CommitResponse:
        return await self._run(self._core.commit(reservation_id, req))

    async def release(self, reservation_id: str, req: ReleaseRequest, *, tenant: str | None = None) -> ReleaseResponse:
        return await self._run(self._core.release(reservation_id, req))

    async def extend(
        self, reservation_id: str, req: ReservationExtendRequest, *, tenant: str | None = None
    ) -> ReservationExtendResponse:
        return await self._run(self._core.extend(reservation_id, req))

    async def decide(self, req: DecisionRequest, *, tenant: str | None = None) -> DecisionResponse:
        return await self._run(self._core.decide(req))

    async def event(self, req: EventCreateRequest, *, tenant: str | None = None) -> EventCreateResponse:
        return await self._run(self._core.event(req))

    async def balances(self, query: BalanceQuery, *, tenant: str | None = None) -> BalanceResponse:
        return await self._run(self._core.balances(query))

    async def get_reservation(self, reservation_id: str, *, tenant: str | None = None) -> ReservationDetail:
        return await self._run(self._core.get_reservation(reservation_id))

    async def list_reservations(self, query: ReservationQuery, *, tenant: str | None = None) -> ReservationListResponse:
        return await self._run(self._core.list_reservations(query))

    async def set_budget(
        self,
        scope: str,
        amount: Amount,
        *,
        overdraft_limit: Amount | None = None,
        caps: Caps | None = None,
        period: PeriodSpec | None = None,
    ) -> Balance:
        return await self._run(self._core.set_budget(scope, amount, overdraft_limit, caps, period))

    async def fund_budget(self, scope: str, amount: Amount) -> Balance:
        return await self._run(self._core.fund_budget(scope, amount))

    async def set_overdraft_limit(self, scope: str, limit: Amount) -> Balance:
        return await self._run(self._core.set_overdraft_limit(scope, limit))

    async def fund(
        self,
        scope: str,
        unit: Unit,
        operation: FundingOperation | str,
        amount: Amount,
        *,
        spent: Amount | None = None,
        idempotency_key: str | None = None,
    ) -> FundingResult:
        req = check_request(scope, unit, operation, amount, spent, idempotency_key)
        return await self._run(self._core.fund(req, idempotency_key))

    async def set_budget_status(self, scope: str, status: str, *, unit: Unit | None = None) -> list[Balance]:
        return await self._run(self._core.set_budget_status(scope, status, unit))

    async def delete_budget(self, scope: str, *, unit: Unit | None = None, force: bool = False) -> list[Balance]:
        return await self._run(self._core.delete_budget(scope, unit, force))

    async def get_budget(self, scope: str, *, unit: Unit | None = None) -> Balance:
        return await self._run(self._core.get_budget(scope, unit))

    async def list_budgets(self, *, tenant: str | None = None) -> list[Balance]:
        return await self._run(self._core.list_budgets(tenant))

    async def update_policy(self, scope: str, edit: PolicyEdit) -> ScopePolicy:
        return await self._run(self._core.update_policy(scope, edit))

    async def list_policies(self, *, tenant: str | None = None) -> list[ScopePolicy]:
        return await self._run(self._core.list_policies(tenant))

    async def list_quota_counters(self, query: CounterQuery, *, tenant: str | None = None) -> CounterPage:
        return await self._run(self._core.list_quota_counters(query))

    async def reset_quota_counter(self, req: CounterResetRequest, *, tenant: str | None = None) -> CounterReset:
        return await self._run(self._core.reset_quota_counter(req))

    async def sweep(self, limit: int = 1000) -> int:
        call = self._core.sweep(limit)
        return await self._run(call) if call is not None else 0

    async def aclose(self) -> None:
        await self._transport.close()

    def __repr__(self) -> str:
        return f"AsyncHttpLedger({self.url!r})"


def open_http(url: str, **options: Any) -> HttpLedger:
    return HttpLedger(url, **options)


def open_async_http(url: str, **options: Any) -> AsyncHttpLedger:
    return AsyncHttpLedger(url, **options)
