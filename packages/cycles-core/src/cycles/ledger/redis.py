"""``redis://host:port/db``: budgets in Redis, shared by any number of machines.

Every mutation -- reserve across all derived scopes, commit with its overage policy and debt,
release, extend, event, expiry, the idempotency record -- is one Lua script run atomically by
Redis (``lua/*.lua``, package data). The scripts mirror ``rules`` line for line and are held to the
same contract and differential tests. Python only builds arguments and reads replies: there is no
read-modify-write from the client. Scripts are sent by SHA (EVALSHA) and loaded on the first
``NOSCRIPT`` reply, so a ``SCRIPT FLUSH``, a restart or a failover to a fresh replica costs one
reload. Time is the Redis server's (``TIME`` inside the script), the authoritative clock.

URL: ``redis://[user:password@]host:6379/0?prefix=cycles`` (``rediss://`` for TLS).
``prefix`` (default ``cycles``) starts every key, so several ledgers (or tests) can share one
database. ``cluster=true`` connects with ``RedisCluster``. ``retries`` (default 2) is how often a
command is resent after a connection error or timeout -- safe, since every script is idempotent by
its request key. ``include_balances=true`` puts Balance snapshots into reserve/commit/release/event
responses. ``multiplex=false`` turns off the async ledger's auto-pipelining. Other query options go
to redis-py (``socket_timeout``, 5 s by default here, ``socket_connect_timeout``, 2 s, ...).

Key layout. One hash tag per tenant, so a tenant's budgets, reservations and idempotency records
share one Redis Cluster slot and each script touches a single slot, while tenants spread over the
cluster. ``{t}`` is the tenant of the subject (or of the scope); subjects and scopes without a
tenant use ``{~}`` (``~`` cannot occur in a tenant name; they all share that one slot, so give heavy
traffic a tenant). ``{!}`` holds the few global keys::

    <p>:{<t>}:budgets                 hash    every budget of the slot, one HMGET/HSET per operation:
                                              "<scope>|<unit>" -> "allocated,spent,reserved,debt,
                                              overdraft_limit,over_limit,status"; "<scope>|<unit>|caps"
                                              -> caps JSON; "~hint" -> the slot's sweep-index score
    <p>:{<t>}:r:<reservation id>      hash    a reservation (status, amounts, deadline, held scopes, ...)
    <p>:{<t>}:idx                     zset    reservation id -> deadline (expires_at + grace) while
                                              ACTIVE, purge time (finished + 24 h) once finished
    <p>:{<t>}:i:<endpoint>:<tenant>:<key>   string  idempotency record, TTL 24 h
    <p>:{<t>}:ix:<owner>              zset    "<created_at_ms, 13 digits>:<id>" (scores 0) of the owner's
                                              reservations in the slot: keyset-paged listing (ZRANGE BYLEX)
    <p>:{<t>}:bix                     zset    "<scope>\0<unit>" of every budget: keyset-paged balances
    <p>:{<t>}:active                  hash    owner -> ACTIVE reservations it holds (the per-tenant limit)
    <p>:{!}:tenants                   set     every tag with budgets (list_budgets, round-robin sweep)
    <p>:{!}:due, <p>:{!}:duev         zset, hash  tag -> a lower bound of the earliest time something
                                              in the slot falls due; tag -> version (for the sweep's CAS)

Scripts receive the slot base ``<p>:{<t>}:`` as ``KEYS[1]`` (and the idempotency key as ``KEYS[2]``
when the client can name it) and derive every other key from the base, so all keys a script
touches hash to that one slot. Reservation ids carry the tag: ``rsv_<tenant>_<32 hex>``
(``rsv_<32 hex>`` without a tenant), so ``GET /reservations/{id}`` needs nothing but the id.

Expiry. Each script first expires the overdue reservations of its slot (a range read on ``idx``,
O(log n) when nothing is due), so no tenant ever sees budget held by a dead client; the same pass
purges reservations that finished more than 24 h ago. A background sweep (``ledger.sweep()``, the
``cycles sweep`` command, a server task) visits only the slots whose score in the global ``due``
index has passed, plus a few registry slots in round-robin order; it never scans keys. Idempotency
records expire by key TTL after 24 h (``rules.IDEMPOTENCY_RETENTION_MS``).

Transport. The sync ledger uses a thread-safe redis-py client. The async ledger multiplexes: the
commands of all the event loop's tasks share one connection and leave in batched writes (see
``_Multiplexer``), which under concurrency costs a fraction of a pooled request per command.

Errors. Connection loss, timeouts and BUSY / LOADING / READONLY / TRYAGAIN / CLUSTERDOWN / OOM
replies raise ``LedgerUnavailable`` (retryable). The outcome of that call is unknown: retry it with
the same idempotency key, which replays the stored response instead of charging twice.

Durability is the Redis persistence you choose. Recommended: ``appendonly yes`` with
``appendfsync everysec`` -- a Redis crash loses nothing acknowledged (the AOF is in the OS page
cache); an OS crash or power loss loses about the last second of operations. ``appendfsync always``
loses nothing acknowledged even on power loss, at a large cost per write. RDB snapshots alone lose
everything since the last snapshot: budgets spent since then are spendable again. Replication is
asynchronous, so a failover can drop the newest acknowledged writes unless ``min-replicas-to-write``
bounds that. Use ``maxmemory-policy noeviction``: an evicted budget key is a lost budget.

Limits. Lua numbers are doubles: amounts and balances must stay below 2**53 (about 90 million
USD in USD_MICROCENTS); larger amounts are refused with ``INVALID_REQUEST``. Requires Redis 6.2+.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio
from pydantic_core import from_json, to_json
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from cycles.errors import (
    BudgetClosed,
    BudgetExceeded,
    BudgetFrozen,
    CyclesError,
    DebtOutstanding,
    Forbidden,
    IdempotencyMismatch,
    InternalError,
    InvalidRequest,
    LedgerUnavailable,
    MaxExtensionsExceeded,
    NotFound,
    OverdraftLimitExceeded,
    ReservationExpired,
    ReservationFinalized,
    UnitMismatch,
    deny_detail_of,
)
from cycles.identifiers import is_identifier
from cycles.ledger import counters as quota_counters
from cycles.ledger import custom_kinds, funding, periods, policies, quotas, rules
from cycles.ledger.base import AsyncLedger, BalanceQuery, Ledger, ReservationQuery
from cycles.ledger.limits import (
    DEFAULT_LIMITS,
    RateLimiter,
    TenantLimits,
    active_limit_error,
    check_metadata,
    limits_from_query,
)
from cycles.ledger.paging import SCAN_BUDGET, ReservationScan, peek_position
from cycles.ledger.periods import PeriodSpec
from cycles.ledger.rules import BudgetRow, IdempotencyRecord, ReservationRow
from cycles.models import (
    Action,
    Amount,
    Balance,
    BalanceResponse,
    Caps,
    CommitOveragePolicy,
    CommitRequest,
    CommitResponse,
    Decision,
    DecisionRequest,
    DecisionResponse,
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
    ReservationStatus,
    Subject,
    Unit,
    trusted,
)
from cycles.scopes import derive_scopes, parse_scope, scope_tenant

__all__ = ["AsyncRedisLedger", "RedisLedger", "open_async_redis", "open_redis"]

logger = logging.getLogger("cycles.ledger")

T = TypeVar("T")

NO_TENANT_TAG = "~"
GLOBAL_TAG = "!"
DEFAULT_PREFIX = "cycles"
#: Lua numbers are doubles: integers are exact up to here.
MAX_EXACT_AMOUNT = 2**53 - 1
#: Overdue reservations each script expires in its slot before doing its own work.
LAZY_EXPIRY = 100
#: Reconnect-and-resend attempts after a connection error or timeout (redis-py's default is 10).
DEFAULT_RETRIES = 2
#: Registry slots each sweep also visits in round-robin order.
SWEEP_ROUND_ROBIN = 10
#: Reservations one sweep script expires at most: each script stays short, as Redis runs one at a time.
SWEEP_BATCH = 100

_UNIT_ORDER = tuple(sorted(Unit, key=lambda u: u.value))  # the order budget_units reports (as sqlite)
_HEX32 = re.compile(r"[0-9a-f]{32}")
_REASON = {
    "BUDGET_NOT_FOUND": "BUDGET_NOT_FOUND",
    "OVER_LIMIT": "OVERDRAFT_LIMIT_EXCEEDED",
    "HEADROOM": "PRIORITY_HEADROOM",
}
# Failures after which a retry may succeed: connection loss, timeouts, LOADING, failover, cluster
# resharding, OOM under maxmemory. Everything else from Redis is a bug here: INTERNAL_ERROR.
_TRANSIENT_ERRORS = (
    redis_errors.ConnectionError,  # includes BusyLoadingError (LOADING)
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,
    redis_errors.OutOfMemoryError,
    redis_errors.TryAgainError,
    redis_errors.ClusterError,  # includes ClusterDownError, MasterDownError
    redis_errors.RedisClusterException,
)
_TRANSIENT_REPLIES = (
    "BUSY",
    "LOADING",
    "READONLY",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "MASTERDOWN",
    "OOM",
    "NOREPLICAS",
)


# ---- scripts --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Script:
    name: str
    source: str
    sha: str


_SCRIPT_NAMES = (
    "reserve",
    "commit",
    "release",
    "extend",
    "event",
    "decide",
    "set_budget",
    "fund",
    "funding",
    "overdraft",
    "set_status",
    "delete_budget",
    "get_budget",
    "get_reservation",
    "snapshot_budgets",
    "sweep_slot",
    "touch",
    "due_tags",
    "cas",
    "roll",
    "policy_put",
    "counter_reset",
)


def _lua_chunks(common: str) -> list[tuple[str, str]]:
    """Split the shared library into its top-level definitions: (name, text), in order."""
    chunks: list[tuple[str, str]] = []
    pending: list[str] = []  # comment lines: they belong to the definition that follows
    for line in common.splitlines(keepends=True):
        match = re.match(r"local (?:function )?([A-Za-z_][A-Za-z0-9_]*)", line)
        if match:
            chunks.append((match.group(1), "".join(pending) + line))
            pending = []
        elif chunks and not line.startswith("--") and line.strip():
            name, text = chunks[-1]
            chunks[-1] = (name, text + "".join(pending) + line)
            pending = []
        else:
            pending.append(line)
    return chunks


def _link(chunks: list[tuple[str, str]], body: str) -> str:
    """The definitions ``body`` uses, directly or through one another, in library order. Scripts
    run the whole chunk on every call, so leaving out unused helpers saves their closures."""

    def names(text: str) -> set[str]:
        code = re.sub(r"--[^\n]*", "", text)
        return {name for name, _ in chunks if re.search(rf"\b{name}\b", code)}

    texts = dict(chunks)
    wanted = {"base", "now"} | names(body)
    todo = list(wanted)
    while todo:
        for name in names(texts[todo.pop()]) - wanted:
            wanted.add(name)
            todo.append(name)
    return "".join(text for name, text in chunks if name in wanted)


def _load_scripts() -> dict[str, _Script]:
    folder = resources.files("cycles.ledger").joinpath("lua")
    common = folder.joinpath("common.lua").read_text(encoding="utf-8")
    for name, value in (
        ("MAX_EXTENSIONS", str(rules.MAX_EXTENSIONS)),
        ("RETENTION_MS", str(rules.IDEMPOTENCY_RETENTION_MS)),
        ("LAZY_EXPIRY", str(LAZY_EXPIRY)),
        ("UNITS", ", ".join(f"'{u.value}'" for u in _UNIT_ORDER)),
    ):
        common = common.replace(f"@{name}@", value)
    header = common[: common.index("local base")]
    chunks = _lua_chunks(common[len(header) :])
    scripts = {}
    for name in _SCRIPT_NAMES:
        body = folder.joinpath(f"{name}.lua").read_text(encoding="utf-8")
        source = f"-- cycles {name}.lua\n" + _link(chunks, body) + "\n" + body
        scripts[name] = _Script(name, source, hashlib.sha1(source.encode()).hexdigest())
    return scripts


_SCRIPTS = _load_scripts()


# ---- what a flow asks the shell to do ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Call:
    """EVALSHA of one script. ``best_effort``: a failure is reported as ``None``, not raised."""

    script: _Script
    keys: tuple[str, ...]
    args: tuple[str | int, ...]
    best_effort: bool = False


@dataclass(frozen=True, slots=True)
class _Command:
    args: tuple[str, ...]


_Step = _Call | _Command | list[_Call | _Command]
# A flow yields steps, receives each step's raw reply (a list of them for a list), returns the result.
_Flow = Generator[_Step, Any, T]


def _unavailable(exc: Exception, where: str) -> CyclesError:
    """The one place a redis-py exception becomes a Cycles error."""
    if isinstance(exc, _TRANSIENT_ERRORS):
        detail = f"{type(exc).__name__}: {exc}"
    elif isinstance(exc, redis_errors.ResponseError) and str(exc).startswith(_TRANSIENT_REPLIES):
        detail = str(exc)  # BUSY (a long script), NOREPLICAS ... arrive as plain ResponseErrors
    else:
        return InternalError(f"Redis ledger at {where} failed: {type(exc).__name__}: {exc}")
    return LedgerUnavailable(
        f"Redis ledger at {where} is unavailable ({detail}); the outcome is unknown: "
        "retry with the same idempotency key"
    )


# ---- reading replies ------------------------------------------------------------------------


@lru_cache(maxsize=1024)
def _caps(text: str) -> Caps:
    return Caps.model_validate_json(text)


def _budget(row: list[Any], unit: Unit) -> BudgetRow:
    scope, allocated, spent, reserved, debt, overdraft, over, status, caps = row[:9]
    return BudgetRow(
        scope,
        unit,
        scope_tenant(scope),
        allocated,
        spent,
        reserved,
        debt,
        overdraft,
        bool(over),
        status,
        _caps(caps) if caps else None,
    )


def _reservation(row: list[Any]) -> ReservationRow:
    rid, status, tenant, unit, amount, budgeted, created, expires, grace, policy = row[:10]
    committed, finalized, extensions, info, committed_metadata = row[10:]
    subject_data, action_data, metadata, idempotency_key = info
    subject = Subject.model_validate(subject_data)
    return ReservationRow(
        reservation_id=rid,
        tenant=tenant,
        status=ReservationStatus(status),
        subject=subject,
        action=Action.model_validate(action_data),
        unit=Unit(unit),
        amount=amount,
        budgeted_scopes=budgeted.split(),
        affected_scopes=derive_scopes(subject),
        created_at_ms=created,
        expires_at_ms=expires,
        grace_period_ms=grace,
        overage_policy=CommitOveragePolicy(policy),
        idempotency_key=idempotency_key,
        committed=committed,
        finalized_at_ms=finalized,
        extensions=extensions,
        metadata=metadata,
        committed_metadata=committed_metadata,
    )


def _info(req: ReservationCreateRequest) -> str:
    """What only Python reads back, stored as one opaque field: [subject, action, metadata, key]."""
    return (
        f"[{req.subject.model_dump_json(exclude_none=True)},{req.action.model_dump_json(exclude_none=True)},"
        f"{_json(req.metadata) or 'null'},{to_json(req.idempotency_key).decode()}]"
    )


@dataclass(slots=True)
class _Reply:
    replay: bool
    now_ms: int
    payload: Any
    extra: Any


@dataclass(slots=True)
class _Context:
    """What an error message needs that the script does not send back."""

    scopes: Sequence[str] = ()
    unit: Unit | None = None
    reservation_id: str = ""
    idempotency_key: str = ""
    endpoint: str = ""
    scope: str = ""
    owner: str | None = None
    active_limit: int = 0


class _ScriptError(Exception):
    """A refusal reported by a script (``["E", tag, args...]``), before it becomes a CyclesError."""

    def __init__(self, reply: list[Any]) -> None:
        self.tag: str = reply[1]
        self.args_: list[Any] = reply[2:]

    def error(self, ctx: _Context) -> CyclesError:
        return _error(self.tag, self.args_, ctx)


def _open(raw: Any, ctx: Callable[[], _Context] = _Context) -> _Reply:
    """Read a script's reply; a refusal becomes the CyclesError rules would raise (``ctx`` supplies
    what its message needs, built only then)."""
    reply = from_json(raw)
    if reply[0] == "E":
        raise _ScriptError(reply).error(ctx()) from None
    return _Reply(reply[0] == "R", reply[1], reply[2], reply[3])


def _error(tag: str, args: list[Any], ctx: _Context) -> CyclesError:
    """The exception rules would raise, with the same message and details."""
    unit = ctx.unit.value if ctx.unit is not None else ""
    rid = ctx.reservation_id
    if tag == "BUDGET_NOT_FOUND":
        scopes = list(ctx.scopes)
        return NotFound(f"Budget not found for provided scope: {scopes[-1]}", details={"scopes": scopes})
    if tag == "SCOPE_NOT_FOUND":
        return NotFound(f"Budget not found for provided scope: {ctx.scope}")
    if tag == "UNIT_MISMATCH_SCOPE":
        scope, units = args
        return UnitMismatch(
            f"no {unit} budget for scope {scope}; it has budgets in " + ", ".join(units),
            details={"scope": scope, "requested_unit": unit, "expected_units": list(units)},
        )
    if tag == "BUDGET_CLOSED":
        return BudgetClosed(f"budget {args[0]} is closed", details={"scope": args[0]})
    if tag == "IN_USE":
        return rules.budget_in_use(ctx.scope, args[0], args[1])
    if tag == "DEBT_BLOCKS_DELETE":
        return rules.debt_blocks_delete(ctx.scope, args[0], args[1])
    if tag == "CLOSED_FOR_GOOD":
        return BudgetClosed(f"budget {args[0]} is closed for good", details={"scope": args[0]})
    if tag == "BUDGET_FROZEN":
        return BudgetFrozen(f"budget {args[0]} is frozen", details={"scope": args[0]})
    if tag == "OVER_LIMIT":
        scope, debt, limit = args
        return OverdraftLimitExceeded(
            f"scope {scope} is over its overdraft limit until reconciled",
            details={"scope": scope, "debt": debt, "overdraft_limit": limit},
        )
    if tag == "DEBT_OUTSTANDING":
        scope, debt = args
        return DebtOutstanding(
            f"scope {scope} has outstanding debt; fund it before new reservations",
            details={"scope": scope, "debt": debt},
        )
    if tag == "BUDGET_EXCEEDED":
        scope, left, requested = args
        return BudgetExceeded(
            f"Insufficient remaining budget for scope {scope}",
            details={"scope": scope, "unit": unit, "remaining": left, "requested": requested},
        )
    if tag == "HEADROOM":
        scope, left, requested, pct = args
        return quotas.headroom_denial(scope, unit, left, requested, pct)
    if tag == "COMMIT_REJECTED":
        actual, held, info = args
        path = derive_scopes(Subject.model_validate(info[0]))[-1]
        return BudgetExceeded(
            f"actual {actual} exceeds the reserved {held} and overage_policy=REJECT",
            details={"reserved": held, "actual": actual, "scope": path},
        )
    if tag == "EVENT_REJECTED":
        scope, left, delta = args
        return BudgetExceeded(
            f"Insufficient remaining budget for scope {scope}",
            details={"scope": scope, "remaining": left, "requested": delta},
        )
    if tag == "OVERDRAFT":
        scope, debt, shortfall, limit = args
        return OverdraftLimitExceeded(
            f"commit would take scope {scope} past its overdraft limit",
            details={"scope": scope, "debt": debt, "shortfall": shortfall, "overdraft_limit": limit},
        )
    if tag == "RESERVATION_NOT_FOUND":
        return _reservation_not_found(rid)
    if tag == "FORBIDDEN":
        return Forbidden("reservation belongs to another tenant")
    if tag == "FINALIZED":
        return ReservationFinalized(
            f"reservation {rid} is already {args[0]}", details={"reservation_id": rid, "status": args[0]}
        )
    if tag == "EXPIRED":
        expires, grace = args
        return ReservationExpired(
            f"reservation {rid} expired at {expires} (grace {grace} ms)",
            details={"reservation_id": rid, "expires_at_ms": expires},
        )
    if tag == "UNIT_MISMATCH_COMMIT":
        return UnitMismatch(
            f"actual is in {unit} but the reservation is in {args[0]}",
            details={"requested_unit": unit, "expected_units": [args[0]]},
        )
    if tag == "MAX_EXTENSIONS":
        return MaxExtensionsExceeded(
            f"reservation {rid} has been extended {args[0]} times (max {rules.MAX_EXTENSIONS})",
            details={"reservation_id": rid, "max_extensions": rules.MAX_EXTENSIONS},
        )
    if tag == "IDEMPOTENCY_MISMATCH":
        key, endpoint = ctx.idempotency_key, ctx.endpoint
        return IdempotencyMismatch(
            f"idempotency key {key!r} was already used on {endpoint} with a different payload",
            details={"idempotency_key": key, "endpoint": endpoint},
        )
    if tag == "LIMIT_EXCEEDED":
        return active_limit_error(ctx.active_limit, args[0], ctx.owner)
    if tag == "DEBIT_SHORT":
        return funding.debit_refused(ctx.scope, unit, args[0], args[1])
    if tag == "REPAY_EXCEEDS":
        return funding.repay_refused(ctx.scope, unit, args[0], args[1])
    if tag == "TOO_LARGE":
        return InvalidRequest(f"the Redis ledger keeps amounts below 2**53; this would make {args[0]}")
    return InternalError(f"unexpected reply from a Cycles Lua script: {tag} {args}")


def _deny_detail(denial: list[Any] | None, scopes: Sequence[str], unit: Unit) -> dict[str, Any] | None:
    if denial is None:
        return None
    error = _error(denial[0], denial[1:], _Context(scopes, unit))
    return deny_detail_of(error.code, error.details)


def _balance(row: list[Any], unit: Unit) -> Balance:
    balance = _budget(row, unit).to_budget()  # the operator plane's view: status and caps too
    if len(row) > 9 and row[9] is not None:
        return rules.with_period(balance, periods.PeriodState(*row[9]))
    return balance


def _plain_balance(row: list[Any], unit: Unit) -> Balance:
    """A budget row as a Balance (with its period), without the operator plane's status and caps."""
    balance = _budget(row, unit).to_balance()
    if len(row) > 9 and row[9] is not None:
        return rules.with_period(balance, periods.PeriodState(*row[9]))
    return balance


def _period_arg(spec: PeriodSpec | None, base: int, clock: Callable[[], int] | None) -> str:
    """set_budget.lua's period argument: '' keeps, 'none' removes, else the new state (its window
    from this process's clock: set_budget.lua keeps the stored window when the period is the same)."""
    if spec is None:
        return ""
    now_ms = int(clock()) if clock is not None else time.time_ns() // 1_000_000
    state = spec.state(base, now_ms)
    return "none" if state is None else state.dumps()


def _reservation_not_found(rid: str) -> NotFound:
    return NotFound(f"reservation {rid} not found", details={"reservation_id": rid})


def _check_amount(*amounts: Amount | None) -> None:
    for a in amounts:
        if a is not None and a.amount > MAX_EXACT_AMOUNT:
            raise InvalidRequest(f"amount {a.amount} is too large for the Redis ledger (at most {MAX_EXACT_AMOUNT})")


def _opt(value: str | None) -> str:
    """None -> '' and 'x' -> '=x', so that an empty string stays distinct from no value."""
    return "" if value is None else "=" + value


def _json(value: Any) -> str:
    return "" if value is None else json.dumps(value, separators=(",", ":"))


def _str(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _merge(caps: list[str]) -> Caps | None:
    return rules.merge_caps(_caps(c) for c in caps) if caps else None


def _ttl_left(status: str, expires_at_ms: int, now_ms: int) -> int:
    """``rules._remaining_ttl``: 0 unless the reservation is still ACTIVE."""
    return max(0, expires_at_ms - now_ms) if status == ReservationStatus.ACTIVE.value else 0


class _Snapshot:
    """A read-only ``rules.Txn`` over rows a script returned, so reads run ``rules`` itself.

    The scripts expire overdue reservations before they return rows, and ``now_ms`` is the earliest
    script time, so the rules' read paths never find anything left to expire (nothing to write).
    """

    include_balances = False
    limits = DEFAULT_LIMITS

    def __init__(
        self,
        now_ms: int,
        budgets: Iterable[BudgetRow] = (),
        reservations: Iterable[ReservationRow] = (),
        meta: dict[str, str] | None = None,
        complete: bool = True,
    ):
        self.now_ms = now_ms
        #: False for a window read from an index: reading past its end raises ``_NeedMore``.
        self.complete = complete
        self._budgets = {(b.scope, b.unit): b for b in budgets}
        self._reservations = {r.reservation_id: r for r in reservations}
        self._meta = meta or {}

    def get_budget(self, scope: str, unit: Unit) -> BudgetRow | None:
        return self._budgets.get((scope, unit))

    def get_budgets(self, scopes: Sequence[str], unit: Unit) -> list[BudgetRow]:
        return [b for s in scopes if (b := self._budgets.get((s, unit))) is not None]

    def budget_units(self, scope: str) -> list[Unit]:
        return [u for u in _UNIT_ORDER if (scope, u) in self._budgets]

    def put_budget(self, row: BudgetRow) -> None:
        raise RuntimeError("a Redis read snapshot is read-only")

    def delete_budget(self, scope: str, unit: Unit) -> None:
        raise RuntimeError("a Redis read snapshot is read-only")

    def iter_budgets(self, tenant: str | None, all_tenants: bool) -> Iterator[BudgetRow]:
        return (b for b in self._budgets.values() if all_tenants or b.tenant == tenant)

    def get_reservation(self, reservation_id: str) -> ReservationRow | None:
        return self._reservations.get(reservation_id)

    def put_reservation(self, row: ReservationRow) -> None:
        raise RuntimeError("a Redis read snapshot is read-only")

    def iter_reservations(self, tenant: str | None, all_tenants: bool) -> Iterator[ReservationRow]:
        return (r for r in self._reservations.values() if all_tenants or r.tenant == tenant)

    def page_reservations(self, scan: ReservationScan) -> Iterator[ReservationRow]:
        statuses, descending, after = scan.statuses, scan.descending, scan.after
        rows = sorted(
            (
                r
                for r in self.iter_reservations(scan.tenant, scan.all_tenants)
                if statuses is None or r.status in statuses
            ),
            key=lambda r: (r.created_at_ms, r.reservation_id),
            reverse=descending,
        )
        for r in rows:
            key = (r.created_at_ms, r.reservation_id)
            if after is None or (key < after if descending else key > after):
                yield r
        if not self.complete:
            raise _NeedMore

    def page_budgets(self, tenant: str | None, all_tenants: bool, after: tuple[str, str] | None) -> Iterator[BudgetRow]:
        for b in sorted(self.iter_budgets(tenant, all_tenants), key=lambda b: (b.scope, b.unit.value)):
            if after is None or (b.scope, b.unit.value) > after:
                yield b
        if not self.complete:
            raise _NeedMore

    def active_reservations(self, owner: str | None) -> int:
        return 0

    def due_reservations(
        self, now_ms: int, limit: int, tenant: str | rules.AllTenants | None = rules.ALL_TENANTS
    ) -> list[str]:
        return []

    def get_idempotency(self, tenant: str, endpoint: str, key: str) -> IdempotencyRecord | None:
        return None

    def put_idempotency(self, tenant: str, endpoint: str, key: str, record: IdempotencyRecord) -> None:
        raise RuntimeError("a Redis read snapshot is read-only")

    def purge(self, older_than_ms: int, limit: int) -> int:
        raise RuntimeError("a Redis read snapshot is read-only")

    def get_meta(self, keys: Sequence[str]) -> dict[str, str]:
        return {k: v for k in keys if (v := self._meta.get(k)) is not None}

    def put_meta(self, key: str, value: str | None) -> None:
        raise RuntimeError("a Redis read snapshot is read-only")

    def scan_meta(self, prefix: str, limit: int | None = None, *, after: str | None = None) -> list[tuple[str, str]]:
        found = sorted((k, v) for k, v in self._meta.items() if k.startswith(prefix) and (after is None or k > after))
        return found[:limit]


def _periods_of(rows: Iterable[tuple[str, list[Any]]]) -> dict[str, str]:
    """The periods that came back with budget rows (their 10th field), as ``rules`` meta entries."""
    return {
        periods.meta_key(row[0], unit): json.dumps(row[9], separators=(",", ":"))
        for unit, row in rows
        if len(row) > 9 and row[9] is not None
    }


_PERIOD_ROLL = b'["E","PERIOD_ROLL"'


_GONE = object()  # a reservation hash that no longer exists


class _NeedMore(Exception):
    """A page read past the end of the index window it was given: fetch a larger one."""


def _budget_from_packed(scope: str, unit: str, packed: str, caps: str | None) -> BudgetRow:
    """A budget from its field in the slot's budgets hash (common.lua ``parse_budget``)."""
    a, s, r, d, o, x, st = packed.split(",", 6)
    return BudgetRow(
        scope,
        Unit(unit),
        scope_tenant(scope),
        int(a),
        int(s),
        int(r),
        int(d),
        int(o),
        x == "1",
        st,
        _caps(caps) if caps else None,
    )


def _row_from_hash(rid: str, f: list[Any]) -> list[Any]:
    """A reservation hash's RFIELDS (common.lua) as ``reservation_json`` would send them."""
    status, tenant, unit, amount, budgeted, created, expires, grace, policy, committed, finalized, ext, info, cmeta = (
        None if v is None else _str(v) for v in f
    )
    return [
        rid, status, tenant, unit, int(amount or 0), budgeted or "", int(created or 0), int(expires or 0),
        int(grace or 0), policy, None if committed is None else int(committed),
        None if finalized is None else int(finalized), int(ext or 0), from_json(info) if info else None,
        from_json(cmeta) if cmeta else None,
    ]  # fmt: skip


def _lex_after(member: str | None, descending: bool) -> tuple[str, str]:
    """ZRANGE ... BYLEX bounds for "strictly after ``member``" in the given direction."""
    if descending:
        return ("(" + member if member is not None else "+"), "-"
    return ("(" + member if member is not None else "-"), "+"


_RFIELDS = (
    "status", "tenant", "unit", "amount", "budgeted", "created", "expires", "grace", "policy",
    "committed", "finalized", "ext", "info", "cmeta",
)  # fmt: skip


def _reservation_tag(reservation_id: str) -> str | None:
    """The hash tag a reservation id carries, or None when it is not one of ours."""
    if not reservation_id.startswith("rsv_"):
        return None
    tenant, sep, suffix = reservation_id[4:].rpartition("_")
    if not _HEX32.fullmatch(suffix):
        return None
    if not sep:
        return NO_TENANT_TAG
    return tenant if is_identifier(tenant) else None


def _new_reservation_id(tenant: str | None) -> str:
    rid = rules.new_reservation_id()  # rsv_<32 hex>
    return f"rsv_{tenant}_{rid[4:]}" if tenant else rid


# ---- the core: everything but I/O -------------------------------------------------------------


class _RedisCore:
    """Keys, arguments, replies and the flow of each operation. The shells only send and receive."""

    url: str

    def __init__(
        self,
        *,
        url: str,
        prefix: str,
        clock: Callable[[], int] | None,
        include_balances: bool,
        limits: TenantLimits = DEFAULT_LIMITS,
    ) -> None:
        if not prefix or "{" in prefix or "}" in prefix:
            raise InvalidRequest(f"invalid Redis key prefix {prefix!r}: non-empty, without braces")
        self.url = url
        self.prefix = prefix
        self._clock = clock
        #: Put Balance snapshots into reserve/commit/release/event responses (as TransactionalLedger).
        self.include_balances = include_balances
        self._global = self._base(GLOBAL_TAG)
        self._registry = self._global + "tenants"
        #: tag -> (policy version, scope -> policy JSON or None): see ``_gated``
        self._policies: dict[str, tuple[str, dict[str, str | None]]] = {}
        #: What one tenant may make the ledger keep (see ``cycles.ledger.limits``).
        self.limits = limits
        self._rate = RateLimiter(limits.max_reservations_per_second)

    def _base(self, tag: str) -> str:
        return f"{self.prefix}:{{{tag}}}:"

    def _now(self) -> str:
        return "" if self._clock is None else str(int(self._clock()))

    def _call(self, name: str, tag: str, *args: str | int, key: str | None = None) -> _Call:
        base = self._base(tag)
        keys = (base,) if key is None else (base, base + key)
        return _Call(_SCRIPTS[name], keys, (self._now(), *args))

    def _flag(self) -> str:
        return "1" if self.include_balances else "0"

    def _rolling(self, flow: _Flow[T]) -> _Flow[T]:
        """Run ``flow``; when a script refuses with PERIOD_ROLL (a recurring budget's period ended),
        compute the new windows here (``periods``: time zones), roll them over with ``roll.lua``
        and send the same step again. Only at period boundaries; otherwise a pass-through."""
        try:
            step = next(flow)
        except StopIteration as stop:  # a flow that had nothing to ask (an empty range)
            return cast(T, stop.value)
        rolls = 0
        while True:
            reply = yield step
            calls = self._roll_calls(step, reply) if rolls < 8 else []
            if calls:
                rolls += 1
                yield calls
                continue
            try:
                step = flow.send(reply)
            except StopIteration as stop:
                return cast(T, stop.value)

    def _gated(
        self,
        tag: str,
        scopes: list[str],
        subject: Subject,
        action: Action,
        call: Callable[[str, str, bool, policies.Resolved], _Call],
        reserving: bool = False,
    ) -> _Flow[tuple[Any, CyclesError | None, bool, policies.Resolved]]:
        """Send a reserve/decide script with the quota counters planned over this client's cached
        policies of the slot -- the path's per-scope policies and the named policies of its
        candidate patterns (``policies.resolve``, then ``rules.gate``) -- refreshing the cache when
        the script says they are stale (POLICY). Returns the script's raw reply or the
        quota/access/rate denial, whether the tenant's observe_mode is OBSERVE, and what the named
        policies give the reservation, all as of the policy version the script confirmed."""
        named = ["pat|" + p for p in policies.anchor_candidates(scopes)] if subject.tenant else []
        for _ in range(6):
            cached = self._policies.get(tag)
            version, plan, observes = "", "", False
            resolved = policies.NO_POLICIES
            counters: list[quotas.Counter] = []
            if cached is not None and all(s in cached[1] for s in scopes):
                version, docs = cached
                missing = [f for f in named if f not in docs]
                if missing:  # the named candidates, read with the version they belong to
                    reply = yield _Command(("HMGET", self._base(tag) + "policy", "~v", *missing))
                    got = dict(zip(missing, [None if d is None else _str(d) for d in reply[1:]], strict=True))
                    if reply[0] is not None and _str(reply[0]) == version:
                        docs.update(got)
                    else:
                        self._policies[tag] = ("" if reply[0] is None else _str(reply[0]), got)
                    continue
                scoped = {s: quotas.load_policy(s, d) for s in scopes if (d := docs[s]) is not None}
                observes = quotas.tenant_observes(scoped, subject)
                now_ms = self._now_ms()
                resolved = policies.resolve({f[4:]: docs[f] for f in named}, scoped, scopes, now_ms)
                verdict = rules.Verdict(scopes)
                try:
                    denial = rules.gate(resolved, subject, action, now_ms, reserving, None, verdict)
                except InvalidRequest as exc:  # no run_id for a per_run quota: as current as a denial?
                    denial = exc
                counters = verdict.counters
                if denial is not None:  # decided here: confirm the policies are current
                    current = yield _Command(("HGET", self._base(tag) + "policy", "~v"))
                    if current is not None and _str(current) == version:
                        if isinstance(denial, InvalidRequest):
                            raise denial
                        return None, denial, observes, resolved
                    self._policies.pop(tag, None)
                    continue
                plan = to_json([c.wire() for c in counters]).decode() if counters else ""
            raw = yield call(version, plan, observes, resolved)
            data = raw.encode() if isinstance(raw, str) else raw
            if data.startswith(b'["E","POLICY"'):
                _, _, new_version, docs_list = from_json(data)
                known = cached[1] if cached is not None and cached[0] == new_version else {}
                self._policies[tag] = (new_version, {**known, **dict(zip(scopes, docs_list, strict=True))})
                continue
            if data.startswith(b'["E","QUOTA"'):
                counts = from_json(data)[2]
                return None, quotas.violation(counters, counts), observes, resolved
            if counters and data.endswith(b"]]]"):  # reserve.lua's fifth element: thresholds reached
                reply = from_json(data)
                for index, used in reply[4] if len(reply) > 4 else ():
                    quotas.note_threshold(counters[index], used)
            return raw, None, observes, resolved
        raise InternalError("the scope policies kept changing while a reservation was evaluated")

    def _now_ms(self) -> int:
        return int(self._clock()) if self._clock is not None else time.time_ns() // 1_000_000

    def _update_policy(self, scope: str, edit: quotas.PolicyEdit) -> _Flow[quotas.ScopePolicy]:
        parse_scope(scope)
        tag = scope_tenant(scope) or NO_TENANT_TAG
        for _ in range(8):
            current = yield _Command(("HGET", self._base(tag) + "policy", scope))
            text = _str(current) if current is not None else None
            policy = quotas.load_policy(scope, text) if text else quotas.ScopePolicy(scope=scope)
            new = quotas.apply_edit(policy, edit)
            _, raw = yield [
                _Command(("SADD", self._registry, tag)),
                self._call("policy_put", tag, scope, text or "", "" if new.is_empty() else new.dumps()),
            ]
            if not _str(raw).startswith('["E"'):
                self._policies.pop(tag, None)
                return quotas.load_policy(scope, new.dumps())
        raise LedgerUnavailable("the policy of this scope kept changing under concurrent updates; retry")

    def _list_policies(self, tenant: str | None) -> _Flow[list[quotas.ScopePolicy]]:
        if tenant is None:
            tags = yield from self._tags()
        else:
            tags = [tenant] if tenant else []
        if not tags:
            return []
        replies = yield [_Command(("HGETALL", self._base(t) + "policy")) for t in tags]
        out = []
        for reply in replies:
            items = reply.items() if isinstance(reply, dict) else zip(reply[::2], reply[1::2], strict=True)
            for field, text in items:
                scope = _str(field)
                if scope != "~v" and "|" not in scope and (tenant is None or scope_tenant(scope) == tenant):
                    out.append(quotas.load_policy(scope, _str(text)))
        return sorted(out, key=lambda p: p.scope)

    def _list_counters(
        self, query: quota_counters.CounterQuery, tenant: str | None
    ) -> _Flow[quota_counters.CounterPage]:
        """counters.list_counters over the slot's name index (QINDEX in common.lua): a batch of
        names in key order, then their values, until the page is complete."""
        owner = quota_counters.effective_tenant(query.tenant, tenant)
        pager = quota_counters.Pager(query, owner, self._now_ms())
        base = self._base(owner)
        batch = min(query.limit + 1, 256)
        for prefix in quota_counters.tenant_ranges(owner, query.scope):
            start = pager.start(prefix)
            low = "(" + start if start is not None else "[" + prefix
            high = "[" + prefix + "\U0010ffff"
            while True:
                names = yield _Command(("ZRANGEBYLEX", base + "qix", low, high, "LIMIT", "0", str(batch)))
                if not names:
                    break
                values = yield _Command(("MGET", *(base + "q:" + _str(n) for n in names)))
                for name, value in zip(names, values, strict=True):
                    if value is not None and pager.feed(_str(name), _str(value)):
                        return pager.page()
                if len(names) < batch:
                    break
                low = "(" + _str(names[-1])
        return pager.page()

    def _reset_counter(
        self, req: quota_counters.CounterResetRequest, tenant: str | None
    ) -> _Flow[quota_counters.CounterReset]:
        owner = quota_counters.effective_tenant(req.tenant_id, tenant)
        name = quota_counters.counter_name(req, owner)
        raw = yield self._call("counter_reset", owner, name, "1" if req.window == "per_run" else "0")
        reply = from_json(raw)
        if reply[0] == "E":
            raise quota_counters.not_found(req)
        previous, text = reply[2]
        value = quota_counters.CounterValue.loads(text)
        return quota_counters.CounterReset(
            counter=quota_counters.reset_state(name, value, req, reply[1]), previous_used=int(previous)
        )

    # -- named policies: "pat|<pattern>" fields of the tenant's policy hash (written by policy_put,
    # which bumps the version every cached plan is checked against); "<p>:{g}:npid" id -> tenant.

    def _named_of(self, tenant: str) -> _Flow[list[policies.NamedPolicy]]:
        _, named = yield from self._named_at_version(tenant)
        return named

    def _named_at_version(self, tenant: str) -> _Flow[tuple[str, list[policies.NamedPolicy]]]:
        """The tenant's named policies and the version of its policy hash they were read at."""
        reply = yield _Command(("HGETALL", self._base(tenant) + "policy"))
        items = list(reply.items() if isinstance(reply, dict) else zip(reply[::2], reply[1::2], strict=True))
        out = [p for f, text in items if _str(f).startswith("pat|") for p in policies.load_list(_str(text))]
        version = next((_str(text) for f, text in items if _str(f) == "~v"), "")
        return version, sorted(out, key=lambda p: (p.created_at, p.policy_id))

    def _get_named_policy(self, policy_id: str) -> _Flow[policies.NamedPolicy]:
        tenant = yield _Command(("HGET", self._global + "npid", policy_id))
        if tenant is not None:
            for p in (yield from self._named_of(_str(tenant))):
                if p.policy_id == policy_id:
                    return p
        raise NotFound(f"policy {policy_id} not found", details={"policy_id": policy_id})

    def _put_named_policy(self, policy: policies.NamedPolicy, create: bool) -> _Flow[policies.NamedPolicy]:
        tag = policy.tenant_id
        field = "pat|" + policy.scope_pattern
        if not create:
            yield from self._get_named_policy(policy.policy_id)
        for _ in range(8):
            # unique names: checked against every policy of the tenant at one version, written
            # only if no policy of the tenant changed since (policy_put's version check)
            version, named = yield from self._named_at_version(tag)
            policies.check_unique_name(named, policy)
            current = yield _Command(("HGET", self._base(tag) + "policy", field))
            text = _str(current) if current is not None else ""
            new = policies.put_in_list(text or None, policy)
            _, _, raw = yield [
                _Command(("SADD", self._registry, tag)),
                _Command(("HSET", self._global + "npid", policy.policy_id, tag)),
                self._call("policy_put", tag, field, text, new, "=" + version),
            ]
            if not _str(raw).startswith('["E"'):
                self._policies.pop(tag, None)
                return policy
        raise LedgerUnavailable("the policies of this pattern kept changing under concurrent updates; retry")

    def _roll_calls(self, step: _Step, reply: Any) -> list[_Call | _Command]:
        pairs = list(zip(step, reply, strict=True)) if isinstance(step, list) else [(step, reply)]
        calls: list[_Call | _Command] = []
        for one, raw in pairs:
            if not isinstance(one, _Call) or not isinstance(raw, bytes | str):
                continue
            data = raw.encode() if isinstance(raw, str) else raw
            if not data.startswith(_PERIOD_ROLL):
                continue
            _, _, now_ms, *due = from_json(data)
            args: list[str | int] = [self._now()]
            for field, stored in zip(due[::2], due[1::2], strict=True):
                state = periods.PeriodState(*stored)
                start, end = state.next_window(now_ms)
                args += [field, state.end_ms, start, end, state.periods_passed(start) - 1]
            calls.append(_Call(_SCRIPTS["roll"], (one.keys[0],), tuple(args)))
        return calls

    @staticmethod
    def _balances_of(rows: list[list[Any]] | None, unit: Unit) -> list[Balance] | None:
        return None if rows is None else [_budget(r, unit).to_balance() for r in rows]

    # -- runtime plane --

    def _reserve(self, req: ReservationCreateRequest, tenant: str | None) -> _Flow[ReservationCreateResponse]:
        rules.check_subject_tenant(req.subject, tenant)
        custom_kinds.check(req.action.kind)
        _check_amount(req.estimate)
        subject = req.subject
        tag = subject.tenant or NO_TENANT_TAG
        scopes = derive_scopes(subject)
        unit = req.estimate.unit
        idem_tenant = rules.idempotency_tenant(tenant, subject.tenant)
        owner = tenant if tenant is not None else subject.tenant
        rid_new, digest, info = _new_reservation_id(subject.tenant), rules.fingerprint(req), _info(req)
        pct = quotas.headroom_pct(req.action) if req.action.tags else 0
        check_metadata(self.limits, req.metadata)
        if not req.dry_run:
            self._rate.take(owner)

        def call(version: str, plan: str, tenant_observes: bool, named: policies.Resolved) -> _Call:
            dry = req.dry_run or quotas.observing(req.observe_mode, tenant_observes)
            return self._call(
                "reserve",
                tag,
                unit.value,
                req.estimate.amount,
                named.ttl(req.ttl_ms),
                req.grace_period_ms,
                (named.overage or req.overage_policy).value,
                "1" if dry else "0",
                rid_new,
                digest,
                _opt(owner),
                info,
                self._flag(),
                version,
                plan,
                pct,
                self.limits.max_active_reservations,
                *scopes,
                key=f"i:reserve:{idem_tenant}:{req.idempotency_key}",
            )

        raw, quota_denial, tenant_observes, named = yield from self._gated(
            tag, scopes, subject, req.action, call, reserving=not req.dry_run
        )
        observe = quotas.observing(req.observe_mode, tenant_observes)
        if quota_denial is not None:
            if not (req.dry_run or observe):
                raise quota_denial
            denied = rules.denied_dry_run(req, scopes, quota_denial)
            if observe:
                quotas.record_observation(req, denied, tenant)
            return denied
        reply = _open(
            raw,
            lambda: _Context(
                scopes,
                unit,
                idempotency_key=req.idempotency_key,
                endpoint="reserve",
                owner=owner,
                active_limit=self.limits.max_active_reservations,
            ),
        )
        rid, expires_at, rows, denial, caps_list = reply.payload
        caps = rules.merge_caps([named.caps, _merge(caps_list)]) if denial is None else None
        if denial is not None:
            decision = Decision.DENY
        else:
            decision = Decision.ALLOW_WITH_CAPS if caps is not None else Decision.ALLOW
        if rid is None:  # dry run: balances always (rules does the same)
            dry_response = trusted(
                ReservationCreateResponse,
                decision=decision,
                affected_scopes=scopes,
                scope_path=scopes[-1],
                caps=caps,
                balances=self._balances_of(rows, unit) or None,
                reason_code=_REASON.get(denial[0], denial[0]) if denial is not None else None,
                reserved=req.estimate if denial is None else None,
                deny_detail=_deny_detail(denial, scopes, unit),
            )
            if observe and not reply.replay:
                quotas.record_observation(req, dry_response, tenant)
            return dry_response
        if reply.extra is not None and not reply.replay:
            # Publish the slot's earliest deadline to the sweep index. Best effort: a lost update is
            # repaired by the next reserve within a second, or by the sweep's round-robin.
            yield _Call(_SCRIPTS["touch"], (self._global,), ("", tag, reply.extra), best_effort=True)
        ttl = _ttl_left(reply.extra, expires_at, reply.now_ms) if reply.replay else named.ttl(req.ttl_ms)
        return trusted(
            ReservationCreateResponse,
            decision=decision,
            reservation_id=rid,
            reserved=req.estimate,
            expires_at_ms=expires_at,
            remaining_ttl_ms=ttl,
            scope_path=scopes[-1],
            affected_scopes=scopes,
            caps=caps,
            balances=self._balances_of(rows, unit),
        )

    def _decide(self, req: DecisionRequest, tenant: str | None) -> _Flow[DecisionResponse]:
        rules.check_subject_tenant(req.subject, tenant)
        custom_kinds.check(req.action.kind)
        _check_amount(req.estimate)
        subject = req.subject
        scopes = derive_scopes(subject)
        unit = req.estimate.unit
        idem_tenant = rules.idempotency_tenant(tenant, subject.tenant)
        tag = subject.tenant or NO_TENANT_TAG
        digest = rules.fingerprint(req)
        pct = quotas.headroom_pct(req.action) if req.action.tags else 0

        def call(version: str, plan: str, tenant_observes: bool, named: policies.Resolved) -> _Call:
            return self._call(
                "decide",
                tag,
                unit.value,
                req.estimate.amount,
                digest,
                version,
                plan,
                pct,
                *scopes,
                key=f"i:decide:{idem_tenant}:{req.idempotency_key}",
            )

        raw, quota_denial, _, named = yield from self._gated(tag, scopes, subject, req.action, call)
        if quota_denial is not None:
            return rules.denied_decision(scopes, quota_denial)
        reply = _open(raw, lambda: _Context(scopes, unit, idempotency_key=req.idempotency_key, endpoint="decide"))
        caps_list, denial = reply.payload
        if denial is not None:
            return trusted(
                DecisionResponse,
                decision=Decision.DENY,
                caps=None,
                reason_code=_REASON.get(denial[0], denial[0]),
                affected_scopes=scopes,
                deny_detail=_deny_detail(denial, scopes, unit),
            )
        caps = rules.merge_caps([named.caps, _merge(caps_list)])
        return trusted(
            DecisionResponse,
            decision=Decision.ALLOW_WITH_CAPS if caps is not None else Decision.ALLOW,
            caps=caps,
            reason_code=None,
            affected_scopes=scopes,
        )

    def _settle_call(
        self, name: str, reservation_id: str, tenant: str | None, key: str, digest: str, *args: str | int
    ) -> _Call:
        tag = _reservation_tag(reservation_id)
        if tag is None:
            raise _reservation_not_found(reservation_id)
        return self._call(name, tag, reservation_id, _opt(tenant), key, digest, *args)

    def _commit(self, reservation_id: str, req: CommitRequest, tenant: str | None) -> _Flow[CommitResponse]:
        _check_amount(req.actual)
        check_metadata(self.limits, req.metadata, "commit metadata")
        raw = yield self._settle_call(
            "commit",
            reservation_id,
            tenant,
            req.idempotency_key,
            rules.fingerprint(req, reservation_id),
            req.actual.unit.value,
            req.actual.amount,
            _json(req.metadata),
            self._flag(),
        )
        reply = _open(
            raw,
            lambda: _Context(
                unit=req.actual.unit,
                reservation_id=reservation_id,
                idempotency_key=req.idempotency_key,
                endpoint="commit",
            ),
        )
        charged, held, unit_value, rows = reply.payload
        unit = Unit(unit_value)
        released = held - req.actual.amount
        return trusted(
            CommitResponse,
            status="COMMITTED",
            charged=trusted(Amount, unit=unit, amount=charged),
            released=trusted(Amount, unit=unit, amount=released) if released > 0 else None,
            balances=self._balances_of(rows, unit),
        )

    def _release(self, reservation_id: str, req: ReleaseRequest, tenant: str | None) -> _Flow[ReleaseResponse]:
        raw = yield self._settle_call(
            "release",
            reservation_id,
            tenant,
            req.idempotency_key,
            rules.fingerprint(req, reservation_id),
            self._flag(),
        )
        reply = _open(
            raw,
            lambda: _Context(reservation_id=reservation_id, idempotency_key=req.idempotency_key, endpoint="release"),
        )
        amount, unit_value, rows = reply.payload
        unit = Unit(unit_value)
        return trusted(
            ReleaseResponse,
            status="RELEASED",
            released=trusted(Amount, unit=unit, amount=amount),
            balances=self._balances_of(rows, unit),
        )

    def _extend(
        self, reservation_id: str, req: ReservationExtendRequest, tenant: str | None
    ) -> _Flow[ReservationExtendResponse]:
        raw = yield self._settle_call(
            "extend",
            reservation_id,
            tenant,
            req.idempotency_key,
            rules.fingerprint(req, reservation_id),
            req.extend_by_ms,
        )
        reply = _open(
            raw,
            lambda: _Context(reservation_id=reservation_id, idempotency_key=req.idempotency_key, endpoint="extend"),
        )
        (expires_at,) = reply.payload
        ttl = _ttl_left(reply.extra, expires_at, reply.now_ms) if reply.replay else expires_at - reply.now_ms
        return trusted(ReservationExtendResponse, status="ACTIVE", expires_at_ms=expires_at, remaining_ttl_ms=ttl)

    def _event(self, req: EventCreateRequest, tenant: str | None) -> _Flow[EventCreateResponse]:
        rules.check_subject_tenant(req.subject, tenant)
        custom_kinds.check(req.action.kind)
        _check_amount(req.actual)
        subject = req.subject
        scopes = derive_scopes(subject)
        unit = req.actual.unit
        idem_tenant = rules.idempotency_tenant(tenant, subject.tenant)
        raw = yield self._call(
            "event",
            subject.tenant or NO_TENANT_TAG,
            unit.value,
            req.actual.amount,
            req.overage_policy.value,
            rules.fingerprint(req),
            rules.new_event_id(),
            self._flag(),
            *scopes,
            key=f"i:event:{idem_tenant}:{req.idempotency_key}",
        )
        reply = _open(raw, lambda: _Context(scopes, unit, idempotency_key=req.idempotency_key, endpoint="event"))
        event_id, charged, rows = reply.payload
        return trusted(
            EventCreateResponse,
            status="APPLIED",
            event_id=event_id,
            charged=trusted(Amount, unit=unit, amount=charged),
            balances=self._balances_of(rows, unit),
        )

    # -- reads: plain commands over the indexes (no script walks a tenant); rules answers over a
    # snapshot of what was read, showing overdue reservations as EXPIRED without writing --

    def _get_reservation(self, reservation_id: str, tenant: str | None) -> _Flow[ReservationDetail]:
        tag = _reservation_tag(reservation_id)
        if tag is None:
            raise _reservation_not_found(reservation_id)
        raw = yield self._call("get_reservation", tag, reservation_id, _opt(tenant))
        reply = _open(raw, lambda: _Context(reservation_id=reservation_id))
        row = self._parse_row(reply.payload)
        if row is None:  # unreadable (logged): as on SQLite, which quarantines it, there is no such row
            raise _reservation_not_found(reservation_id)
        summary = row.to_summary(ReservationDetail)
        assert isinstance(summary, ReservationDetail)
        return summary

    def _tags(self) -> _Flow[list[str]]:
        members = yield _Command(("SMEMBERS", self._registry))
        return sorted(_str(m) for m in members)

    def _budget_snapshot(self, tags: list[str]) -> _Flow[_Snapshot]:
        if not tags:
            return _Snapshot(0)
        raws = yield [self._call("snapshot_budgets", t) for t in tags]
        replies = [_open(r) for r in raws]
        budgets = [_budget(row, Unit(unit)) for reply in replies for unit, row in reply.payload]
        meta = _periods_of(pair for reply in replies for pair in reply.payload)
        return _Snapshot(min(r.now_ms for r in replies), budgets, meta=meta)

    def _balances(self, query: BalanceQuery, tenant: str | None) -> _Flow[BalanceResponse]:
        checked = rules.balances(_Snapshot(0), query, tenant)  # the rules' own checks of the query and cursor
        if not query.matchable():
            return checked
        effective = tenant if tenant is not None else query.tenant
        if effective is None:  # an operator's query across every tenant: all slots, in full
            tags = yield from self._tags()
            snapshot = yield from self._budget_snapshot(tags)
            return rules.balances(snapshot, query, tenant)
        if not effective:
            return checked
        # One tenant: a window of its sorted budget index after the cursor, as large as the page
        # needs (grown only when filters drop rows). Plain reads: no script walks the tenant.
        base = self._base(effective)
        yield from self._backfill_budget_index(base)
        after = peek_position(query.cursor, (str, str))
        want = query.limit + 1
        while True:
            lo, hi = _lex_after(None if after is None else f"{after[0]}\0{after[1]}", False)
            members = yield _Command(("ZRANGE", base + "bix", lo, hi, "BYLEX", "LIMIT", "0", str(want)))
            keys = [_str(m).split("\0", 1) for m in members]
            budgets: list[BudgetRow] = []
            meta: dict[str, str] = {}  # recurring budgets' periods, so a page shows the current one
            if keys:
                suffixes = ("", "|caps", "|period")
                fields = [f"{scope}|{unit}{suffix}" for scope, unit in keys for suffix in suffixes]
                values = yield _Command(("HMGET", base + "budgets", *fields))
                for i, (scope, unit) in enumerate(keys):
                    packed, caps, period = values[3 * i : 3 * i + 3]
                    if packed is not None:
                        budgets.append(_budget_from_packed(scope, unit, _str(packed), caps and _str(caps)))
                    if period is not None:
                        meta[periods.meta_key(scope, unit)] = _str(period)
            now_ms = (yield from self._server_now()) if meta else 0  # the clock matters to periods only
            snapshot = _Snapshot(now_ms, budgets, complete=len(members) < want, meta=meta)
            try:
                return rules.balances(snapshot, query, tenant)
            except _NeedMore:
                want = min(want * 4, SCAN_BUDGET + 1)

    def _backfill_budget_index(self, base: str) -> _Flow[None]:
        """Budgets created before the index existed are added to it once per slot."""
        if (yield _Command(("EXISTS", base + "bixv"))):
            return
        names = yield _Command(("HKEYS", base + "budgets"))
        members = []
        for name in names:
            scope, sep, unit = _str(name).rpartition("|")
            if sep and unit in Unit.__members__:
                members += ["0", f"{scope}\0{unit}"]
        if members:
            yield _Command(("ZADD", base + "bix", *members))
        yield _Command(("SET", base + "bixv", "1"))

    def _list_reservations(self, query: ReservationQuery, tenant: str | None) -> _Flow[ReservationListResponse]:
        checked = rules.list_reservations(_Snapshot(0), query, tenant)  # the rules' own checks of the query
        if not query.matchable():
            return checked
        effective = tenant if tenant is not None else (query.tenant or None)
        if effective is None or (query.sort_by or "created_at_ms") != "created_at_ms":
            # Every tenant (an operator's query), or an order no index keeps: the slots in full.
            if effective is None:
                tags = yield from self._tags()
            else:
                tags = [effective, NO_TENANT_TAG]
            if not tags:
                return checked
            # Plain reads of each slot's rows (its time index, then the rows in batches): the work
            # is the client's, and no script holds Redis for the length of a tenant.
            ranges = yield [_Command(("ZRANGE", self._base(t) + "idx", "0", "-1")) for t in tags]
            targets = [(self._base(t), _str(rid)) for t, ids in zip(tags, ranges, strict=True) for rid in ids]
            now_ms, found = yield from self._read_rows(targets)
            rows = [row for row in found if row is not None]
            return rules.list_reservations(_Snapshot(now_ms, (), rows), query, tenant)
        # One tenant, newest or oldest first: its rows are in two slots (its own, and the tenant-less
        # one for subjects without a tenant), each with a sorted index per owner. Read a window of
        # both after the cursor, as large as the page needs; plain reads, no script.
        indexes = [self._base(effective), self._base(NO_TENANT_TAG)]
        for base in indexes:
            yield from self._backfill_reservation_index(base)
        after = peek_position(query.cursor, (int, str))
        descending = query.sort_dir == "desc"
        lo, hi = _lex_after(None if after is None else f"{after[0]:013d}:{after[1]}", descending)
        rev = ("REV",) if descending else ()
        want = query.limit + 1
        while True:
            found = yield [
                _Command(("ZRANGE", base + "ix:" + effective, lo, hi, "BYLEX", *rev, "LIMIT", "0", str(want)))
                for base in indexes
            ]
            merged = sorted(
                ((_str(m), base) for base, members in zip(indexes, found, strict=True) for m in members),
                reverse=descending,
            )[:want]
            complete = all(len(members) < want for members in found)
            snapshot = yield from self._reservation_window(merged, "ix:" + effective, complete)
            try:
                return rules.list_reservations(snapshot, query, tenant)
            except _NeedMore:
                want = min(want * 4, SCAN_BUDGET + 1)

    def _reservation_window(self, members: list[tuple[str, str]], index: str, complete: bool) -> _Flow[_Snapshot]:
        now_ms, found = yield from self._read_rows([(base, m[14:]) for m, base in members])
        stale: list[_Call | _Command] = [
            _Command(("ZREM", base + index, member))  # the hash is gone (its key TTL ran out first)
            for (member, base), row in zip(members, found, strict=True)
            if row is _GONE
        ]
        if stale:
            yield stale
        rows = [row for row in found if isinstance(row, ReservationRow)]
        return _Snapshot(now_ms, (), rows, complete=complete)

    def _read_rows(self, targets: list[tuple[str, str]]) -> _Flow[tuple[int, list[Any]]]:
        """The reservation rows ``(slot base, id)``, in order, read with pipelined HMGETs in batches
        (``_GONE`` for a missing hash, ``None`` for one that cannot be read), and the server time."""
        now_ms = yield from self._server_now()
        found: list[Any] = []
        for start in range(0, len(targets), 500):
            chunk = targets[start : start + 500]
            replies = yield [_Command(("HMGET", base + "r:" + rid, *_RFIELDS)) for base, rid in chunk]
            for (_, rid), fields in zip(chunk, replies, strict=True):
                found.append(_GONE if fields[0] is None else self._parse_row(_row_from_hash(rid, fields)))
        return now_ms, found

    def _server_now(self) -> _Flow[int]:
        """The ledger's clock: the injected one, else Redis's TIME (the clock its scripts use)."""
        if self._clock is not None:
            return int(self._clock())
        t = yield _Command(("TIME",))
        return int(_str(t[0])) * 1000 + int(_str(t[1])) // 1000

    def _parse_row(self, raw: list[Any]) -> ReservationRow | None:
        """A stored reservation, or None (logged) when it cannot be read back: one bad row must
        not fail every listing of its tenant."""
        try:
            return _reservation(raw)
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            logger.error("unreadable reservation %s skipped: %s", raw[0] if raw else "?", type(exc).__name__)
            return None

    def _backfill_reservation_index(self, base: str) -> _Flow[None]:
        """Reservations made before the listing index existed are added to it once per slot."""
        if (yield _Command(("EXISTS", base + "ixv"))):
            return
        ids = [_str(r) for r in (yield _Command(("ZRANGE", base + "idx", "0", "-1")))]
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            fields = yield [_Command(("HMGET", base + "r:" + rid, "tenant", "created")) for rid in chunk]
            for rid, (owner, created) in zip(chunk, fields, strict=True):
                if created is not None:
                    owner_key = base + "ix:" + (_str(owner) if owner is not None else "")
                    yield _Command(("ZADD", owner_key, "0", f"{int(_str(created)):013d}:{rid}"))
        yield _Command(("SET", base + "ixv", "1"))

    # -- operator plane --

    def _set_budget(
        self,
        scope: str,
        amount: Amount,
        overdraft_limit: Amount | None,
        caps: Caps | None,
        spec: PeriodSpec | None = None,
    ) -> _Flow[Balance]:
        parse_scope(scope)
        if overdraft_limit is not None and overdraft_limit.unit != amount.unit:
            raise UnitMismatch("overdraft_limit must be in the budget's unit")
        _check_amount(amount, overdraft_limit)
        tag = scope_tenant(scope) or NO_TENANT_TAG
        if caps is None:
            caps_arg = ""
        else:
            caps_arg = "null" if caps.is_empty() else caps.model_dump_json(exclude_none=True)
        _, raw = yield [
            _Command(("SADD", self._registry, tag)),  # first, so the registry covers every slot with budgets
            self._call(
                "set_budget",
                tag,
                scope,
                amount.unit.value,
                amount.amount,
                "" if overdraft_limit is None else overdraft_limit.amount,
                caps_arg,
                _period_arg(spec, amount.amount, self._clock),
            ),
        ]
        reply = _open(raw, lambda: _Context(scope=scope))
        return _balance(reply.payload, amount.unit)

    def _set_overdraft_limit(self, scope: str, limit: Amount) -> _Flow[Balance]:
        parse_scope(scope)
        _check_amount(limit)
        if limit.amount < 0:
            raise InvalidRequest("overdraft_limit must not be negative")
        tag = scope_tenant(scope) or NO_TENANT_TAG
        raw = yield self._call("overdraft", tag, scope, limit.unit.value, limit.amount)
        reply = _open(raw, lambda: _Context([scope], limit.unit, scope=scope))
        return _balance(reply.payload, limit.unit)

    def _fund_budget(self, scope: str, amount: Amount) -> _Flow[Balance]:
        parse_scope(scope)
        _check_amount(amount)
        raw = yield self._call("fund", scope_tenant(scope) or NO_TENANT_TAG, scope, amount.unit.value, amount.amount)
        reply = _open(raw, lambda: _Context([scope], amount.unit, scope=scope))
        return _balance(reply.payload, amount.unit)

    def _fund(
        self,
        scope: str,
        unit: Unit,
        operation: funding.FundingOperation | str,
        amount: Amount,
        spent: Amount | None,
        idempotency_key: str | None,
    ) -> _Flow[funding.FundingResult]:
        """``rules.fund`` in one script (lua/funding.lua): no lease, no read-then-write."""
        req = funding.check_request(scope, unit, operation, amount, spent, idempotency_key)
        parse_scope(scope)
        _check_amount(amount, spent)
        tenant = scope_tenant(scope)
        raw = yield self._call(
            "funding",
            tenant or NO_TENANT_TAG,
            scope,
            req.unit.value,
            req.operation.value,
            amount.amount,
            "" if spent is None else spent.amount,
            idempotency_key or "",
            rules.fingerprint(req),
            rules.idempotency_tenant(None, tenant),
        )
        reply = _open(
            raw,
            lambda: _Context(
                [scope], req.unit, scope=scope, idempotency_key=idempotency_key or "", endpoint=funding.ENDPOINT
            ),
        )
        funded_at, before, after = reply.payload
        return funding.FundingResult(
            operation=req.operation,
            scope=scope,
            unit=req.unit,
            before=_plain_balance(before, req.unit),
            after=_plain_balance(after, req.unit),
            funded_at_ms=funded_at,
            replayed=reply.replay,
        )

    def _set_budget_status(self, scope: str, status: str, unit: Unit | None) -> _Flow[list[Balance]]:
        if status not in rules.BUDGET_STATUSES:
            raise InvalidRequest(f"status must be one of {', '.join(rules.BUDGET_STATUSES)}")
        parse_scope(scope)
        units = [unit] if unit is not None else list(_UNIT_ORDER)
        raw = yield self._call(
            "set_status", scope_tenant(scope) or NO_TENANT_TAG, scope, status, *(u.value for u in units)
        )
        reply = _open(raw, lambda: _Context(scope=scope))
        return [_budget(row, Unit(u)).to_budget() for u, row in reply.payload]

    def _delete_budget(self, scope: str, unit: Unit | None, force: bool) -> _Flow[list[Balance]]:
        parse_scope(scope)
        units = [unit] if unit is not None else list(_UNIT_ORDER)
        raw = yield self._call(
            "delete_budget",
            scope_tenant(scope) or NO_TENANT_TAG,
            scope,
            "1" if force else "0",
            *(u.value for u in units),
        )
        reply = _open(raw, lambda: _Context(scope=scope))
        return [_budget(row, Unit(u)).to_budget() for u, row in reply.payload]

    def _get_budget(self, scope: str, unit: Unit | None) -> _Flow[Balance]:
        parse_scope(scope)
        units = [unit] if unit is not None else list(_UNIT_ORDER)
        raw = yield self._call("get_budget", scope_tenant(scope) or NO_TENANT_TAG, scope, *(u.value for u in units))
        reply = _open(raw, lambda: _Context(scope=scope))
        budgets = [_budget(row, Unit(u)) for u, row in reply.payload]
        return rules.get_budget(_Snapshot(reply.now_ms, budgets, meta=_periods_of(reply.payload)), scope, unit)

    def _list_budgets(self, tenant: str | None) -> _Flow[list[Balance]]:
        if tenant is None:
            tags = yield from self._tags()
        else:
            tags = [tenant] if tenant else []
        snapshot = yield from self._budget_snapshot(tags)
        return rules.list_budgets(snapshot, tenant)

    def _sweep(self, limit: int) -> _Flow[int]:
        raw = yield _Call(_SCRIPTS["due_tags"], (self._global,), (self._now(), max(1, limit), SWEEP_ROUND_ROBIN))
        due, others = _open(raw).payload
        expired = 0
        seen = set()
        for tag, version in due:
            seen.add(tag)
            count, next_deadline = yield from self._sweep_slot(tag, limit - expired)
            expired += count
            yield _Call(
                _SCRIPTS["cas"],
                (self._global,),
                (self._now(), tag, version, "" if next_deadline is None else next_deadline),
            )
        for tag in others:
            tag = _str(tag)
            if tag in seen:
                continue
            count, next_deadline = yield from self._sweep_slot(tag, limit - expired)
            expired += count
            if next_deadline is not None:
                yield _Call(_SCRIPTS["touch"], (self._global,), (self._now(), tag, next_deadline))
        return expired

    def _sweep_slot(self, tag: str, limit: int) -> _Flow[tuple[int, Any]]:
        """Expire up to ``limit`` in one slot, ``SWEEP_BATCH`` per script: Redis runs one script at a
        time, so a slot with thousands due must not hold every other client for their length."""
        expired, next_deadline = 0, None
        while True:
            batch = max(0, min(SWEEP_BATCH, limit - expired))
            raw = yield self._call("sweep_slot", tag, batch)
            count, next_deadline = _open(raw).payload
            expired += count
            if count < batch or batch == 0:
                return expired, next_deadline


# ---- URL and client options ----------------------------------------------------------------


_LIMIT_OPTIONS = frozenset(f.name for f in dataclasses.fields(TenantLimits))


@dataclass(slots=True)
class _Options:
    url: str  # for redis-py, without our own query options
    display_url: str  # password masked
    prefix: str
    cluster: bool
    include_balances: bool
    multiplex: bool
    retries: int
    client_kwargs: dict[str, Any]
    limits: TenantLimits


def _parse_url(url: str, options: dict[str, Any], retry_class: type[Any]) -> _Options:
    parts = urlsplit(url)
    ours: dict[str, str] = {}
    theirs: list[tuple[str, str]] = []
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k in ("prefix", "cluster", "include_balances", "retries", "multiplex") or k in _LIMIT_OPTIONS:
            ours[k] = v
        else:
            theirs.append((k, v))
    prefix = str(options.pop("prefix", ours.get("prefix", DEFAULT_PREFIX)))
    cluster = _flag_option(options.pop("cluster", ours.get("cluster", False)))
    include_balances = _flag_option(options.pop("include_balances", ours.get("include_balances", False)))
    clean = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(theirs), parts.fragment))
    netloc = parts.netloc
    if parts.password:
        netloc = netloc.replace(":" + parts.password + "@", ":***@", 1)
    display = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    retries = int(options.pop("retries", ours.get("retries", DEFAULT_RETRIES)))
    kwargs: dict[str, Any] = {
        "socket_timeout": 5.0,
        "socket_connect_timeout": 2.0,
        # Retrying a script after a lost connection is safe: each is idempotent by request key.
        "retry": retry_class(ExponentialWithJitterBackoff(base=0.01, cap=0.5), retries),
    }
    kwargs.update(options)
    multiplex = _flag_option(options.pop("multiplex", ours.get("multiplex", True)))
    limits = options.pop("limits", None) or limits_from_query(ours)
    return _Options(clean, display, prefix, cluster, include_balances, multiplex, retries, kwargs, limits)


def _flag_option(value: object) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 6379}"


# ---- the synchronous shell ------------------------------------------------------------------


class RedisLedger(_RedisCore, Ledger):
    """The ledger over a redis-py client (thread-safe; one connection pool per process)."""

    def __init__(
        self,
        client: Any,
        *,
        url: str = "redis://",
        prefix: str = DEFAULT_PREFIX,
        clock: Callable[[], int] | None = None,
        include_balances: bool = False,
        limits: TenantLimits = DEFAULT_LIMITS,
    ) -> None:
        super().__init__(url=url, prefix=prefix, clock=clock, include_balances=include_balances, limits=limits)
        self._client = client
        self._where = _where(url)

    def _run(self, flow: _Flow[T]) -> T:
        flow = self._rolling(flow)
        try:
            step = next(flow)
            while True:
                step = flow.send(self._execute(step))
        except StopIteration as stop:
            return cast(T, stop.value)

    def _execute(self, step: _Step) -> Any:
        try:
            if isinstance(step, list):
                return self._pipeline(step)
            return self._one(step)
        except redis_errors.RedisError as exc:
            if isinstance(step, _Call) and step.best_effort:
                return None
            raise _unavailable(exc, self._where) from exc

    def _one(self, step: _Call | _Command) -> Any:
        client = self._client
        if isinstance(step, _Command):
            return client.execute_command(*step.args)
        try:
            return client.evalsha(step.script.sha, len(step.keys), *step.keys, *step.args)
        except redis_errors.NoScriptError:
            client.script_load(step.script.source)
            return client.evalsha(step.script.sha, len(step.keys), *step.keys, *step.args)

    def _pipeline(self, steps: list[_Call | _Command]) -> list[Any]:
        if isinstance(self._client, redis.RedisCluster):  # its pipelines refuse EVALSHA: one by one
            return [self._one(step) for step in steps]
        with self._client.pipeline(transaction=False) as pipe:
            for step in steps:
                if isinstance(step, _Command):
                    pipe.execute_command(*step.args)
                else:
                    pipe.evalsha(step.script.sha, len(step.keys), *step.keys, *step.args)
            results: list[Any] = pipe.execute(raise_on_error=False)
        for i, result in enumerate(results):
            if isinstance(result, redis_errors.NoScriptError):
                results[i] = self._one(steps[i])
            elif isinstance(result, Exception):
                raise result
        return results

    def reserve(self, req: ReservationCreateRequest, *, tenant: str | None = None) -> ReservationCreateResponse:
        return self._run(self._reserve(req, tenant))

    def commit(self, reservation_id: str, req: CommitRequest, *, tenant: str | None = None) -> CommitResponse:
        return self._run(self._commit(reservation_id, req, tenant))

    def release(self, reservation_id: str, req: ReleaseRequest, *, tenant: str | None = None) -> ReleaseResponse:
        return self._run(self._release(reservation_id, req, tenant))

    def extend(
        self, reservation_id: str, req: ReservationExtendRequest, *, tenant: str | None = None
    ) -> ReservationExtendResponse:
        return self._run(self._extend(reservation_id, req, tenant))

    def decide(self, req: DecisionRequest, *, tenant: str | None = None) -> DecisionResponse:
        return self._run(self._decide(req, tenant))

    def event(self, req: EventCreateRequest, *, tenant: str | None = None) -> EventCreateResponse:
        return self._run(self._event(req, tenant))

    def balances(self, query: BalanceQuery, *, tenant: str | None = None) -> BalanceResponse:
        return self._run(self._balances(query, tenant))

    def get_reservation(self, reservation_id: str, *, tenant: str | None = None) -> ReservationDetail:
        return self._run(self._get_reservation(reservation_id, tenant))

    def list_reservations(self, query: ReservationQuery, *, tenant: str | None = None) -> ReservationListResponse:
        return self._run(self._list_reservations(query, tenant))

    def set_budget(
        self,
        scope: str,
        amount: Amount,
        *,
        overdraft_limit: Amount | None = None,
        caps: Caps | None = None,
        period: PeriodSpec | None = None,
    ) -> Balance:
        return self._run(self._set_budget(scope, amount, overdraft_limit, caps, period))

    def fund_budget(self, scope: str, amount: Amount) -> Balance:
        return self._run(self._fund_budget(scope, amount))

    def set_overdraft_limit(self, scope: str, limit: Amount) -> Balance:
        return self._run(self._set_overdraft_limit(scope, limit))

    def fund(
        self,
        scope: str,
        unit: Unit,
        operation: funding.FundingOperation | str,
        amount: Amount,
        *,
        spent: Amount | None = None,
        idempotency_key: str | None = None,
    ) -> funding.FundingResult:
        return self._run(self._fund(scope, unit, operation, amount, spent, idempotency_key))

    def set_budget_status(self, scope: str, status: str, *, unit: Unit | None = None) -> list[Balance]:
        return self._run(self._set_budget_status(scope, status, unit))

    def delete_budget(self, scope: str, *, unit: Unit | None = None, force: bool = False) -> list[Balance]:
        return self._run(self._delete_budget(scope, unit, force))

    def get_budget(self, scope: str, *, unit: Unit | None = None) -> Balance:
        return self._run(self._get_budget(scope, unit))

    def list_budgets(self, *, tenant: str | None = None) -> list[Balance]:
        return self._run(self._list_budgets(tenant))

    def update_policy(self, scope: str, edit: quotas.PolicyEdit) -> quotas.ScopePolicy:
        return self._run(self._update_policy(scope, edit))

    def list_policies(self, *, tenant: str | None = None) -> list[quotas.ScopePolicy]:
        return self._run(self._list_policies(tenant))

    def list_quota_counters(
        self, query: quota_counters.CounterQuery, *, tenant: str | None = None
    ) -> quota_counters.CounterPage:
        return self._run(self._list_counters(query, tenant))

    def reset_quota_counter(
        self, req: quota_counters.CounterResetRequest, *, tenant: str | None = None
    ) -> quota_counters.CounterReset:
        return self._run(self._reset_counter(req, tenant))

    def put_named_policy(self, policy: policies.NamedPolicy, *, create: bool) -> policies.NamedPolicy:
        return self._run(self._put_named_policy(policy, create))

    def get_named_policy(self, policy_id: str) -> policies.NamedPolicy:
        return self._run(self._get_named_policy(policy_id))

    def list_named_policies(self, *, tenant: str) -> list[policies.NamedPolicy]:
        return self._run(self._named_of(tenant))

    def sweep(self, limit: int = 1000) -> int:
        return self._run(self._sweep(limit))

    def close(self) -> None:
        self._client.close()


# ---- the asynchronous shell -----------------------------------------------------------------


def _pack(args: Sequence[str | int]) -> bytes:
    """One command in RESP, for the multiplexer (redis-py's packer costs ~1 us per argument)."""
    texts = [a if a.__class__ is str else str(a) for a in args]
    body = "".join([f"${len(t)}\r\n{t}\r\n" for t in texts])
    if body.isascii():  # then the lengths in characters are lengths in bytes
        return f"*{len(texts)}\r\n{body}".encode()
    out = [b"*%d\r\n" % len(texts)]
    for text in texts:
        data = text.encode()
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


class _Incomplete(Exception):
    """The buffer ends inside a reply: read more."""


_PUSH = object()  # an out-of-band RESP3 push message: it answers no command
_ERRORS: dict[str, type[redis_errors.ResponseError]] = {
    "NOSCRIPT": redis_errors.NoScriptError,
    "READONLY": redis_errors.ReadOnlyError,
    "OOM": redis_errors.OutOfMemoryError,
    "TRYAGAIN": redis_errors.TryAgainError,
    "CLUSTERDOWN": redis_errors.ClusterDownError,
    "MASTERDOWN": redis_errors.MasterDownError,
}


def _reply_error(text: str) -> Exception:
    """An error reply as the exception redis-py would raise for it."""
    code = text.split(" ", 1)[0]
    if code == "LOADING":
        return redis_errors.BusyLoadingError(text)
    cls = _ERRORS.get(code)
    return cls(text[len(code) + 1 :]) if cls is not None else redis_errors.ResponseError(text)


def _parse(buf: bytearray, pos: int) -> tuple[Any, int]:
    """One RESP2/RESP3 reply from ``buf[pos:]``: (value, end). Raises _Incomplete."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind = buf[pos]
    line = bytes(buf[pos + 1 : end])
    nxt = end + 2
    if kind in b"$!=":  # bulk string, bulk error, verbatim string
        size = int(line)
        if size < 0:
            return None, nxt
        stop = nxt + size
        if len(buf) < stop + 2:
            raise _Incomplete
        data = bytes(buf[nxt:stop])
        if kind == 0x21:  # !
            return _reply_error(data.decode()), stop + 2
        return (data[4:] if kind == 0x3D else data), stop + 2  # =: "txt:" prefix
    if kind == 0x2B:  # + simple string
        return line, nxt
    if kind == 0x2D:  # - error
        return _reply_error(line.decode()), nxt
    if kind in b":(":  # integer, big number
        return int(line), nxt
    if kind in b"*~>%|":  # array, set, push, map, attribute
        count = int(line)
        if count < 0:
            return None, nxt
        items = []
        for _ in range(count * 2 if kind in b"%|" else count):
            item, nxt = _parse(buf, nxt)
            items.append(item)
        if kind == 0x7C:  # | attributes precede the reply they describe
            return _parse(buf, nxt)
        if kind == 0x3E:  # >
            return _PUSH, nxt
        return (dict(zip(items[::2], items[1::2], strict=True)) if kind == 0x25 else items), nxt
    if kind == 0x5F:  # _ null
        return None, nxt
    if kind == 0x23:  # # boolean
        return line == b"t", nxt
    if kind == 0x2C:  # , double
        return float(line), nxt
    raise redis_errors.InvalidResponse(f"unexpected RESP reply type {chr(kind)!r}")


class _Multiplexer:
    """Auto-pipelining over one connection, as ioredis and Lettuce do it.

    Commands the event loop's tasks issue in the same turn leave in one write (every
    ``EARLY_FLUSH`` commands, so that Redis works on one part while Python builds the next); the
    replies come back in order and go to their callers first-in first-out. Under concurrency this
    costs a fraction of redis-py's per-command path (pool checkout, retry wrapper, packing), while
    each caller still sends one request and gets one reply. redis-py does the connecting (AUTH,
    SELECT, TLS) and parses the replies. A lost connection fails every command in flight on it with
    ``ConnectionError``; ``execute`` resends up to ``retries`` times, which is safe because every
    Cycles script is idempotent.
    """

    EARLY_FLUSH = 8

    def __init__(self, pool: Any, retries: int) -> None:
        self._pool = pool
        self._retries = retries
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: Any = None
        self._connecting = False
        self._idle: asyncio.Future[None] | None = None
        self._queue: list[tuple[bytes, asyncio.Future[Any]]] = []  # not sent yet
        self._sent: collections.deque[asyncio.Future[Any]] = collections.deque()  # awaiting replies
        self._flushing = False
        self._tasks: set[asyncio.Task[None]] = set()

    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # first use, or another event loop: the old loop's state is void
            self._loop, self._conn, self._connecting, self._idle = loop, None, False, None
            self._queue, self._sent, self._flushing = [], collections.deque(), False
        return loop

    async def execute(self, packed: bytes) -> Any:
        attempt = 0
        while True:
            loop = self._bind()
            future: asyncio.Future[Any] = loop.create_future()
            queue = self._queue
            queue.append((packed, future))
            if self._conn is not None and (len(queue) >= self.EARLY_FLUSH or not self._sent):
                self._flush()  # a full batch, or an idle connection: no reason to wait for the turn's end
            elif not self._flushing:
                self._flushing = True
                loop.call_soon(self._flush)
            try:
                return await future
            except (redis_errors.ConnectionError, redis_errors.TimeoutError):
                if attempt >= self._retries:
                    raise
                attempt += 1
                await asyncio.sleep(min(0.5, 0.01 * 2**attempt))

    def _flush(self) -> None:
        self._flushing = False
        if not self._queue:
            return
        conn = self._conn
        if conn is None:
            if not self._connecting:
                self._connecting = True
                self._spawn(self._connect())
            return
        batch, self._queue = self._queue, []
        self._sent.extend(f for _, f in batch)
        if self._idle is not None and not self._idle.done():
            self._idle.set_result(None)
        data = b"".join(p for p, _ in batch)
        writer = getattr(conn, "_writer", None)
        if writer is None:  # not the redis-py internals we know: its public (async) send
            self._spawn(self._send(conn, data))
            return
        try:
            writer.write(data)  # buffered by the transport, never blocks
        except (OSError, RuntimeError) as exc:  # RuntimeError: the transport is already closed
            self._broken(conn, exc)

    async def _send(self, conn: Any, data: bytes) -> None:
        try:
            await conn.send_packed_command(data, check_health=False)
        except (OSError, redis_errors.RedisError) as exc:
            self._broken(conn, exc)

    async def _connect(self) -> None:
        try:
            conn = self._pool.make_connection()
            await conn.connect()
        except BaseException as exc:
            self._connecting = False
            queued, self._queue = self._queue, []
            error = _as_connection_error(exc)
            for _, future in queued:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
            return
        self._connecting = False
        self._conn = conn
        self._spawn(self._read(conn))
        self._flush()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read(self, conn: Any) -> None:
        """Read what has arrived, hand out every complete reply in it, repeat while any is due."""
        stream = getattr(conn, "_reader", None)  # redis-py's asyncio.StreamReader for the socket
        timeout = conn.socket_timeout
        buf = bytearray()
        try:
            while conn is self._conn:
                sent = self._sent
                if not sent:
                    self._idle = asyncio.get_running_loop().create_future()
                    await self._idle
                    continue
                if stream is None:  # not the redis-py internals we know: one reply at a time
                    try:
                        reply: Any = await conn.read_response()
                    except redis_errors.ResponseError as exc:  # read whole: still in step
                        reply = exc
                    self._answer(reply)
                    continue
                pos = answered = 0
                while sent:
                    try:
                        reply, pos = _parse(buf, pos)
                    except _Incomplete:
                        break
                    if reply is not _PUSH:
                        self._answer(reply)
                        answered += 1
                        if answered % self.EARLY_FLUSH == 0:
                            # Let those callers run and send their next commands, so Redis works on
                            # them while we hand out the rest, instead of taking turns with Python.
                            await asyncio.sleep(0)
                del buf[:pos]
                if sent:
                    try:
                        async with asyncio.timeout(timeout):
                            data = await stream.read(65536)
                    except TimeoutError:
                        raise redis_errors.TimeoutError(
                            f"Timeout reading from Redis (socket_timeout {timeout} s)"
                        ) from None
                    if not data:
                        raise redis_errors.ConnectionError("Connection closed by server.")
                    buf += data
        except BaseException as exc:
            self._broken(conn, exc)
            if not isinstance(exc, Exception | asyncio.CancelledError):
                raise

    def _answer(self, reply: Any) -> None:
        future = self._sent.popleft()
        if future.done():  # its caller gave up (cancelled): the reply is dropped
            return
        if isinstance(reply, Exception):
            future.set_exception(reply)
        else:
            future.set_result(reply)

    def _broken(self, conn: Any, exc: BaseException) -> None:
        """The connection is unusable: fail what is in flight on it; the next command reconnects."""
        if conn is None or conn is not self._conn:
            return
        self._conn = None
        sent, self._sent = self._sent, collections.deque()
        error = _as_connection_error(exc)
        for future in sent:
            if not future.done():
                future.set_exception(error)
        if self._idle is not None and not self._idle.done():
            self._idle.set_result(None)  # lets the reader see it is no longer current, and end
        self._spawn(conn.disconnect(nowait=True))

    async def aclose(self) -> None:
        self._broken(self._conn, redis_errors.ConnectionError("the ledger was closed"))
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        await self._pool.disconnect()


def _as_connection_error(exc: BaseException) -> Exception:
    if isinstance(exc, redis_errors.ConnectionError | redis_errors.TimeoutError):
        return exc
    return redis_errors.ConnectionError(f"connection lost: {type(exc).__name__}: {exc}")


class AsyncRedisLedger(_RedisCore, AsyncLedger):
    """The ledger over redis.asyncio: auto-pipelined on one connection per event loop for a
    standalone server; through the redis-py client itself for a cluster (or ``multiplex=false``)."""

    def __init__(
        self,
        client: Any,
        *,
        url: str = "redis://",
        prefix: str = DEFAULT_PREFIX,
        clock: Callable[[], int] | None = None,
        include_balances: bool = False,
        multiplex: bool = True,
        retries: int = DEFAULT_RETRIES,
        limits: TenantLimits = DEFAULT_LIMITS,
    ) -> None:
        super().__init__(url=url, prefix=prefix, clock=clock, include_balances=include_balances, limits=limits)
        self._client = client
        self._where = _where(url)
        pool = getattr(client, "connection_pool", None)
        self._mux = _Multiplexer(pool, retries) if multiplex and pool is not None else None

    async def _run(self, flow: _Flow[T]) -> T:
        flow = self._rolling(flow)
        try:
            step = next(flow)
            while True:
                step = flow.send(await self._execute(step))
        except StopIteration as stop:
            return cast(T, stop.value)

    async def _execute(self, step: _Step) -> Any:
        try:
            if isinstance(step, list):  # concurrent: the multiplexer sends them in one write
                return list(await asyncio.gather(*(self._one(s) for s in step)))
            return await self._one(step)
        except redis_errors.RedisError as exc:
            if isinstance(step, _Call) and step.best_effort:
                return None
            raise _unavailable(exc, self._where) from exc

    async def _one(self, step: _Call | _Command) -> Any:
        mux, client = self._mux, self._client
        if isinstance(step, _Command):
            return await (mux.execute(_pack(step.args)) if mux else client.execute_command(*step.args))
        script = step.script
        args = ("EVALSHA", script.sha, len(step.keys), *step.keys, *step.args)
        try:
            return await (mux.execute(_pack(args)) if mux else client.execute_command(*args))
        except redis_errors.NoScriptError:
            if mux is not None:
                await mux.execute(_pack(("SCRIPT", "LOAD", script.source)))
                return await mux.execute(_pack(args))
            await client.script_load(script.source)  # a cluster client loads it on every primary
            return await client.execute_command(*args)

    async def reserve(self, req: ReservationCreateRequest, *, tenant: str | None = None) -> ReservationCreateResponse:
        return await self._run(self._reserve(req, tenant))

    async def commit(self, reservation_id: str, req: CommitRequest, *, tenant: str | None = None) -> CommitResponse:
        return await self._run(self._commit(reservation_id, req, tenant))

    async def release(self, reservation_id: str, req: ReleaseRequest, *, tenant: str | None = None) -> ReleaseResponse:
        return await self._run(self._release(reservation_id, req, tenant))

    async def extend(
        self, reservation_id: str, req: ReservationExtendRequest, *, tenant: str | None = None
    ) -> ReservationExtendResponse:
        return await self._run(self._extend(reservation_id, req, tenant))

    async def decide(self, req: DecisionRequest, *, tenant: str | None = None) -> DecisionResponse:
        return await self._run(self._decide(req, tenant))

    async def event(self, req: EventCreateRequest, *, tenant: str | None = None) -> EventCreateResponse:
        return await self._run(self._event(req, tenant))

    async def balances(self, query: BalanceQuery, *, tenant: str | None = None) -> BalanceResponse:
        return await self._run(self._balances(query, tenant))

    async def get_reservation(self, reservation_id: str, *, tenant: str | None = None) -> ReservationDetail:
        return await self._run(self._get_reservation(reservation_id, tenant))

    async def list_reservations(self, query: ReservationQuery, *, tenant: str | None = None) -> ReservationListResponse:
        return await self._run(self._list_reservations(query, tenant))

    async def set_budget(
        self,
        scope: str,
        amount: Amount,
        *,
        overdraft_limit: Amount | None = None,
        caps: Caps | None = None,
        period: PeriodSpec | None = None,
    ) -> Balance:
        return await self._run(self._set_budget(scope, amount, overdraft_limit, caps, period))

    async def fund_budget(self, scope: str, amount: Amount) -> Balance:
        return await self._run(self._fund_budget(scope, amount))

    async def set_overdraft_limit(self, scope: str, limit: Amount) -> Balance:
        return await self._run(self._set_overdraft_limit(scope, limit))

    async def fund(
        self,
        scope: str,
        unit: Unit,
        operation: funding.FundingOperation | str,
        amount: Amount,
        *,
        spent: Amount | None = None,
        idempotency_key: str | None = None,
    ) -> funding.FundingResult:
        return await self._run(self._fund(scope, unit, operation, amount, spent, idempotency_key))

    async def set_budget_status(self, scope: str, status: str, *, unit: Unit | None = None) -> list[Balance]:
        return await self._run(self._set_budget_status(scope, status, unit))

    async def delete_budget(self, scope: str, *, unit: Unit | None = None, force: bool = False) -> list[Balance]:
        return await self._run(self._delete_budget(scope, unit, force))

    async def get_budget(self, scope: str, *, unit: Unit | None = None) -> Balance:
        return await self._run(self._get_budget(scope, unit))

    async def list_budgets(self, *, tenant: str | None = None) -> list[Balance]:
        return await self._run(self._list_budgets(tenant))

    async def update_policy(self, scope: str, edit: quotas.PolicyEdit) -> quotas.ScopePolicy:
        return await self._run(self._update_policy(scope, edit))

    async def list_policies(self, *, tenant: str | None = None) -> list[quotas.ScopePolicy]:
        return await self._run(self._list_policies(tenant))

    async def list_quota_counters(
        self, query: quota_counters.CounterQuery, *, tenant: str | None = None
    ) -> quota_counters.CounterPage:
        return await self._run(self._list_counters(query, tenant))

    async def reset_quota_counter(
        self, req: quota_counters.CounterResetRequest, *, tenant: str | None = None
    ) -> quota_counters.CounterReset:
        return await self._run(self._reset_counter(req, tenant))

    async def put_named_policy(self, policy: policies.NamedPolicy, *, create: bool) -> policies.NamedPolicy:
        return await self._run(self._put_named_policy(policy, create))

    async def get_named_policy(self, policy_id: str) -> policies.NamedPolicy:
        return await self._run(self._get_named_policy(policy_id))

    async def list_named_policies(self, *, tenant: str) -> list[policies.NamedPolicy]:
        return await self._run(self._named_of(tenant))

    async def sweep(self, limit: int = 1000) -> int:
        return await self._run(self._sweep(limit))

    async def aclose(self) -> None:
        if self._mux is not None:
            await self._mux.aclose()
        await self._client.aclose()


# ---- opening by URL -------------------------------------------------------------------------


def open_redis(url: str = "redis://127.0.0.1:6379/0", **options: Any) -> RedisLedger:
    """``redis://host:6379/0?prefix=cycles``; options: ``prefix``, ``cluster``, ``clock`` (tests),
    ``client`` (an existing redis-py client), anything else goes to redis-py."""
    clock = options.pop("clock", None)
    client = options.pop("client", None)
    opts = _parse_url(url, options, Retry)
    if client is None:
        if opts.cluster:
            client = redis.RedisCluster.from_url(opts.url, **opts.client_kwargs)
        else:
            client = redis.Redis.from_url(opts.url, **opts.client_kwargs)
    return RedisLedger(
        client,
        url=opts.display_url,
        prefix=opts.prefix,
        clock=clock,
        include_balances=opts.include_balances,
        limits=opts.limits,
    )


def open_async_redis(url: str = "redis://127.0.0.1:6379/0", **options: Any) -> AsyncRedisLedger:
    """The async twin of ``open_redis`` (redis.asyncio)."""
    clock = options.pop("clock", None)
    client = options.pop("client", None)
    opts = _parse_url(url, options, AsyncRetry)
    if client is None:
        if opts.cluster:
            client = redis.asyncio.RedisCluster.from_url(opts.url, **opts.client_kwargs)
        else:
            client = redis.asyncio.Redis.from_url(opts.url, **opts.client_kwargs)
    return AsyncRedisLedger(
        client,
        url=opts.display_url,
        prefix=opts.prefix,
        clock=clock,
        include_balances=opts.include_balances,
        multiplex=opts.multiplex,
        retries=opts.retries,
        limits=opts.limits,
    )
