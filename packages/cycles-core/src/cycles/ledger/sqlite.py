"""``sqlite:///path/ledger.db``: the embedded default. Many threads and processes, one file.

Concurrency. Every operation is one ``BEGIN IMMEDIATE`` transaction, so SQLite itself never lets
two writers interleave and no budget can be oversubscribed. SQLite's own busy handler, though,
sleeps in growing steps when the write lock is taken, which under 2-4 contending processes stalls
writers for 0.5-1.6 s. So writers first queue on an ``flock`` of ``<db>.lock`` (and a thread lock
inside the process): the kernel wakes the next waiter the moment the holder is done, which keeps
the p99 in the low milliseconds. ``busy_timeout`` stays as a fallback for processes that do not
take the lock (the ``sqlite3`` shell, an older Cycles).

Durability. WAL journal. ``synchronous=NORMAL`` (the default here): a transaction is durable once
``COMMIT`` returns as far as a *process* crash goes -- a killed process loses nothing committed --
but the last transactions before an OS crash or power loss may roll back (the database stays
consistent). ``?synchronous=FULL`` fsyncs the WAL on every commit: durable against power loss too,
at roughly 5x the cost per transaction on this class of machine. See ``bench/bench_core.py``.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import BaseModel

from cycles.errors import CyclesError, InvalidRequest, LedgerUnavailable
from cycles.ledger import rules
from cycles.ledger.base import TransactionalLedger
from cycles.ledger.limits import DEFAULT_LIMITS, TenantLimits, limits_from_query
from cycles.ledger.paging import ReservationScan
from cycles.ledger.rules import BudgetRow, IdempotencyRecord, ReservationRow
from cycles.models import Action, Caps, CommitOveragePolicy, ReservationStatus, Subject, Unit

try:  # POSIX; elsewhere SQLite's busy handler alone serialises writers
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = ["SqliteLedger", "open_sqlite"]

T = TypeVar("T")

logger = logging.getLogger("cycles.ledger")

#: How often the background thread runs a PASSIVE WAL checkpoint.
CHECKPOINT_INTERVAL_S = 0.1
#: SQLite's own checkpoint (inside a commit) only once the WAL is this large (40 MB): a safety net
#: for when the background thread is not running.
WAL_AUTOCHECKPOINT_PAGES = 10_000
#: The background thread restarts the WAL (briefly under the writers' lock) once it is this large.
WAL_RESTART_PAGES = 1000
#: ``PRAGMA application_id`` of every Cycles ledger ("CYCL"): how a file is recognised as one, and
#: another program's SQLite database is refused instead of getting our tables added to it.
APPLICATION_ID = 0x4359434C
#: ``PRAGMA user_version`` (and ``meta.schema_version``): the layout of the tables below.
# 2: the kv table (recurring budgets, quotas); 3: ACTIVE counts, quarantine, paging indexes.
SCHEMA_VERSION = 3
_OUR_TABLES = frozenset({"meta", "budgets", "reservations", "idempotency"})  # what a v1 ledger has
# Tables other Cycles stores keep in the ledger's file (API keys; events, audit and their documents),
# which may be created before the ledger's own: a file holding only these is still a new ledger.
_KEY_STORE_TABLES = frozenset({"api_keys", "cycles_records", "cycles_kv", "cycles_docs"})

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS budgets (
    scope TEXT NOT NULL,
    unit TEXT NOT NULL,
    tenant TEXT,
    allocated INTEGER NOT NULL,
    spent INTEGER NOT NULL,
    reserved INTEGER NOT NULL,
    debt INTEGER NOT NULL,
    overdraft_limit INTEGER NOT NULL,
    is_over_limit INTEGER NOT NULL,
    status TEXT NOT NULL,
    caps TEXT,
    PRIMARY KEY (scope, unit)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS budgets_tenant ON budgets (tenant);
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT PRIMARY KEY,
    tenant TEXT,
    status TEXT NOT NULL,
    subject TEXT NOT NULL,
    action TEXT NOT NULL,
    unit TEXT NOT NULL,
    amount INTEGER NOT NULL,
    budgeted_scopes TEXT NOT NULL,
    affected_scopes TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    grace_period_ms INTEGER NOT NULL,
    deadline_ms INTEGER NOT NULL,
    overage_policy TEXT NOT NULL,
    idempotency_key TEXT,
    committed INTEGER,
    finalized_at_ms INTEGER,
    extensions INTEGER NOT NULL,
    metadata TEXT,
    committed_metadata TEXT
);
CREATE INDEX IF NOT EXISTS reservations_due ON reservations (deadline_ms) WHERE status = 'ACTIVE';
CREATE INDEX IF NOT EXISTS reservations_page ON reservations (tenant, created_at_ms, id);
CREATE INDEX IF NOT EXISTS reservations_status_page ON reservations (tenant, status, created_at_ms, id);
CREATE INDEX IF NOT EXISTS reservations_time ON reservations (created_at_ms, id);
CREATE INDEX IF NOT EXISTS reservations_done ON reservations (coalesce(finalized_at_ms, deadline_ms))
    WHERE status != 'ACTIVE';
CREATE TABLE IF NOT EXISTS idempotency (
    tenant TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    response TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant, endpoint, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_age ON idempotency (created_at_ms);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS budgets_page ON budgets (tenant, scope, unit);
CREATE TABLE IF NOT EXISTS active_counts (owner TEXT PRIMARY KEY, active INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quarantine (
    id TEXT NOT NULL,
    tenant TEXT,
    reason TEXT NOT NULL,
    row TEXT NOT NULL,
    quarantined_at_ms INTEGER NOT NULL
);
"""

#: version N -> the statements that take a ledger from version N to N + 1, run in order at open.
#: New tables and indexes come from SCHEMA's IF NOT EXISTS (run first); these change or seed what exists.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (),  # 1 -> 2: the kv table only
    2: (  # 2 -> 3: counts for the ACTIVE limit, seeded from the rows an older version wrote
        "DROP INDEX IF EXISTS reservations_tenant",
        "INSERT OR REPLACE INTO active_counts SELECT coalesce(tenant, ''), count(*) FROM reservations "
        "WHERE status = 'ACTIVE' GROUP BY 1",
    ),
}
_COUNT_ACTIVE = (
    "INSERT INTO active_counts VALUES (?, ?) ON CONFLICT (owner) "
    "DO UPDATE SET active = max(0, active + excluded.active)"
)

_BUDGET_COLS = "scope, unit, tenant, allocated, spent, reserved, debt, overdraft_limit, is_over_limit, status, caps"
_UPSERT_BUDGET = (
    f"INSERT INTO budgets ({_BUDGET_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?) "
    "ON CONFLICT (scope, unit) DO UPDATE SET allocated=excluded.allocated, spent=excluded.spent, "
    "reserved=excluded.reserved, debt=excluded.debt, overdraft_limit=excluded.overdraft_limit, "
    "is_over_limit=excluded.is_over_limit, status=excluded.status, caps=excluded.caps"
)
_RES_COLS = (
    "id, tenant, status, subject, action, unit, amount, budgeted_scopes, affected_scopes, created_at_ms, "
    "expires_at_ms, grace_period_ms, deadline_ms, overage_policy, idempotency_key, committed, "
    "finalized_at_ms, extensions, metadata, committed_metadata"
)
_INSERT_RES = f"INSERT OR REPLACE INTO reservations ({_RES_COLS}) VALUES ({','.join('?' * 20)})"
# Settling changes only these columns; rewriting the JSON ones every time would double the work.
_UPDATE_RES = (
    "UPDATE reservations SET status=?, expires_at_ms=?, deadline_ms=?, committed=?, finalized_at_ms=?, "
    "extensions=?, committed_metadata=? WHERE id=?"
)


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _budget_from(row: tuple[Any, ...]) -> BudgetRow:
    return BudgetRow(
        row[0],
        Unit(row[1]),
        row[2],
        row[3],
        row[4],
        row[5],
        row[6],
        row[7],
        bool(row[8]),
        row[9],
        Caps.model_validate_json(row[10]) if row[10] else None,
    )


def _budget_params(b: BudgetRow) -> tuple[Any, ...]:
    caps = b.caps.model_dump_json(exclude_none=True) if b.caps is not None else None
    return (
        b.scope,
        b.unit.value,
        b.tenant,
        b.allocated,
        b.spent,
        b.reserved,
        b.debt,
        b.overdraft_limit,
        int(b.is_over_limit),
        b.status,
        caps,
    )


def _reservation_from(row: tuple[Any, ...]) -> ReservationRow:
    return ReservationRow(
        reservation_id=row[0],
        tenant=row[1],
        status=ReservationStatus(row[2]),
        subject=Subject.model_validate_json(row[3]),
        action=Action.model_validate_json(row[4]),
        unit=Unit(row[5]),
        amount=row[6],
        budgeted_scopes=json.loads(row[7]),
        affected_scopes=json.loads(row[8]),
        created_at_ms=row[9],
        expires_at_ms=row[10],
        grace_period_ms=row[11],
        overage_policy=CommitOveragePolicy(row[13]),
        idempotency_key=row[14],
        committed=row[15],
        finalized_at_ms=row[16],
        extensions=row[17],
        metadata=json.loads(row[18]) if row[18] else None,
        committed_metadata=json.loads(row[19]) if row[19] else None,
    )


#: A reservation's JSON columns, serialised by ``SqliteLedger._write`` before the write lock.
_serialised = threading.local()

#: Rows moved to the quarantine table by this process (see ``_SqliteTxn._parse``).
quarantined_rows = 0
_UNPARSEABLE = (ValueError, TypeError, KeyError, IndexError)


class _SqliteTxn:
    __slots__ = (
        "_budgets",
        "_db",
        "_new_reservations",
        "_reservations",
        "_stored_status",
        "include_balances",
        "limits",
        "now_ms",
        "writable",
    )

    def __init__(
        self,
        db: sqlite3.Connection,
        now_ms: int,
        include_balances: bool,
        limits: TenantLimits = DEFAULT_LIMITS,
        writable: bool = True,
    ) -> None:
        self._db = db
        self.now_ms = now_ms
        self.include_balances = include_balances
        self.limits = limits
        self.writable = writable
        self._budgets: dict[tuple[str, Unit], BudgetRow | None] = {}
        self._reservations: dict[str, ReservationRow | None] = {}
        self._new_reservations: set[str] = set()
        self._stored_status: dict[str, ReservationStatus] = {}  # as read: ACTIVE -> finished is counted

    def _parse(self, raw: tuple[Any, ...]) -> ReservationRow | None:
        """A stored row, or ``None`` when it cannot be read back (written by a buggy or older
        writer, or edited by hand). Such a row must not stop a sweep or another tenant's request:
        in a write transaction it moves to the ``quarantine`` table (its hold on the budgets given
        back) and is logged; a read skips it."""
        try:
            row = _reservation_from(raw)
        except _UNPARSEABLE as exc:
            self._quarantine(raw, exc)
            return None
        self._stored_status.setdefault(row.reservation_id, row.status)
        return row

    def _quarantine(self, raw: tuple[Any, ...], exc: Exception) -> None:
        global quarantined_rows
        rid, owner, status = raw[0], raw[1], raw[2]
        reason = f"{type(exc).__name__}: {exc}"[:2000]
        logger.error(
            "unreadable reservation row %s (tenant %r) %s: %s",
            rid,
            owner,
            "quarantined" if self.writable else "skipped",
            reason.splitlines()[0],
            extra={"cycles": {"reservation_id": rid, "tenant": owner}},
        )
        if not self.writable:
            return
        quarantined_rows += 1
        self._db.execute(
            "INSERT INTO quarantine VALUES (?,?,?,?,?)",
            (rid, owner, reason, json.dumps(list(raw), default=str), self.now_ms),
        )
        if status == "ACTIVE":  # give its hold back, from the columns that are plain values
            try:
                scopes, unit, amount = json.loads(raw[7]), Unit(raw[5]), int(raw[6])
            except _UNPARSEABLE:
                scopes, unit, amount = [], Unit.TOKENS, 0
            for budget in self.get_budgets([s for s in scopes if isinstance(s, str)], unit):
                budget.reserved = max(0, budget.reserved - amount)
                self.put_budget(budget)
            self._db.execute(_COUNT_ACTIVE, (owner or "", -1))
        self._db.execute("DELETE FROM reservations WHERE id=?", (rid,))
        self._reservations[rid] = None

    def get_budget(self, scope: str, unit: Unit) -> BudgetRow | None:
        key = (scope, unit)
        if key not in self._budgets:
            row = self._db.execute(
                f"SELECT {_BUDGET_COLS} FROM budgets WHERE scope=? AND unit=?", (scope, unit.value)
            ).fetchone()
            self._budgets[key] = _budget_from(row) if row else None
        return self._budgets[key]

    def get_budgets(self, scopes: Sequence[str], unit: Unit) -> list[BudgetRow]:
        missing = [s for s in scopes if (s, unit) not in self._budgets]
        if missing:  # one query for all derived scopes instead of one per scope
            for s in missing:
                self._budgets[(s, unit)] = None
            marks = ",".join("?" * len(missing))
            for row in self._db.execute(
                f"SELECT {_BUDGET_COLS} FROM budgets WHERE unit=? AND scope IN ({marks})", (unit.value, *missing)
            ):
                budget = _budget_from(row)
                self._budgets[(budget.scope, unit)] = budget
        return [b for s in scopes if (b := self._budgets[(s, unit)]) is not None]

    def budget_units(self, scope: str) -> list[Unit]:
        return [Unit(r[0]) for r in self._db.execute("SELECT unit FROM budgets WHERE scope=?", (scope,))]

    def put_budget(self, row: BudgetRow) -> None:
        self._budgets[(row.scope, row.unit)] = row
        self._db.execute(_UPSERT_BUDGET, _budget_params(row))

    def delete_budget(self, scope: str, unit: Unit) -> None:
        self._budgets[(scope, unit)] = None
        self._db.execute("DELETE FROM budgets WHERE scope=? AND unit=?", (scope, unit.value))

    def iter_budgets(self, tenant: str | None, all_tenants: bool) -> Iterator[BudgetRow]:
        if all_tenants:
            cursor = self._db.execute(f"SELECT {_BUDGET_COLS} FROM budgets")
        else:
            cursor = self._db.execute(f"SELECT {_BUDGET_COLS} FROM budgets WHERE tenant IS ?", (tenant,))
        for row in cursor.fetchall():
            yield _budget_from(row)

    def get_reservation(self, reservation_id: str) -> ReservationRow | None:
        if reservation_id not in self._reservations:
            row = self._db.execute(f"SELECT {_RES_COLS} FROM reservations WHERE id=?", (reservation_id,)).fetchone()
            self._reservations[reservation_id] = self._parse(row) if row else None
        return self._reservations[reservation_id]

    def put_reservation(self, row: ReservationRow) -> None:
        known = self._reservations.get(row.reservation_id)
        self._reservations[row.reservation_id] = row
        before = self._stored_status.get(row.reservation_id)
        if before is not row.status:
            self._stored_status[row.reservation_id] = row.status
            if before is None and row.status is ReservationStatus.ACTIVE:
                self._db.execute(_COUNT_ACTIVE, (row.tenant or "", 1))
            elif before is ReservationStatus.ACTIVE:
                self._db.execute(_COUNT_ACTIVE, (row.tenant or "", -1))
        if known is not None and row.reservation_id not in self._new_reservations:
            self._db.execute(
                _UPDATE_RES,
                (
                    row.status.value,
                    row.expires_at_ms,
                    row.deadline_ms,
                    row.committed,
                    row.finalized_at_ms,
                    row.extensions,
                    _dumps(row.committed_metadata),
                    row.reservation_id,
                ),
            )
            return
        self._new_reservations.add(row.reservation_id)
        ready = getattr(_serialised, "reserve", None)  # computed before the write lock (SqliteLedger._write)
        if ready is not None and ready[0] is row.subject and ready[1] is row.action and ready[2] is row.metadata:
            subject_json, action_json, metadata_json = ready[3:]
        else:
            subject_json = row.subject.model_dump_json(exclude_none=True)
            action_json = row.action.model_dump_json(exclude_none=True)
            metadata_json = _dumps(row.metadata)
        self._db.execute(
            _INSERT_RES,
            (
                row.reservation_id,
                row.tenant,
                row.status.value,
                subject_json,
                action_json,
                row.unit.value,
                row.amount,
                json.dumps(row.budgeted_scopes),
                json.dumps(row.affected_scopes),
                row.created_at_ms,
                row.expires_at_ms,
                row.grace_period_ms,
                row.deadline_ms,
                row.overage_policy.value,
                row.idempotency_key,
                row.committed,
                row.finalized_at_ms,
                row.extensions,
                metadata_json,
                _dumps(row.committed_metadata),
            ),
        )

    def iter_reservations(self, tenant: str | None, all_tenants: bool) -> Iterator[ReservationRow]:
        if all_tenants:
            cursor = self._db.execute(f"SELECT {_RES_COLS} FROM reservations")
        else:
            cursor = self._db.execute(f"SELECT {_RES_COLS} FROM reservations WHERE tenant IS ?", (tenant,))
        for raw in cursor.fetchall():
            row = self._parse(raw)
            if row is None:
                continue
            self._reservations.setdefault(row.reservation_id, row)
            cached = self._reservations[row.reservation_id]
            if cached is not None:
                yield cached

    def page_reservations(self, scan: ReservationScan) -> Iterator[ReservationRow]:
        where: list[str] = []
        params: list[Any] = []
        if not scan.all_tenants:
            where.append("tenant IS ?")
            params.append(scan.tenant)
        if scan.statuses is not None:
            where.append(f"status IN ({','.join('?' * len(scan.statuses))})")
            params.extend(s.value for s in scan.statuses)
        order, cmp = ("DESC", "<") if scan.descending else ("ASC", ">")
        position = scan.after
        chunk = 64  # rows come off the index in small batches: a full page reads one or two
        while True:
            clauses = [*where, f"(created_at_ms, id) {cmp} (?, ?)"] if position is not None else where
            sql = f"SELECT {_RES_COLS} FROM reservations {'WHERE ' + ' AND '.join(clauses) if clauses else ''} "
            sql += f"ORDER BY created_at_ms {order}, id {order} LIMIT ?"
            raws = self._db.execute(sql, (*params, *(position or ()), chunk)).fetchall()
            for raw in raws:
                row = self._parse(raw)
                if row is not None:
                    yield row
            if len(raws) < chunk:
                return
            position = (raws[-1][9], raws[-1][0])
            chunk = min(chunk * 4, 1024)

    def page_budgets(self, tenant: str | None, all_tenants: bool, after: tuple[str, str] | None) -> Iterator[BudgetRow]:
        where = [] if all_tenants else ["tenant IS ?"]
        params: list[Any] = [] if all_tenants else [tenant]
        position = after
        chunk = 64
        while True:
            clauses = [*where, "(scope, unit) > (?, ?)"] if position is not None else where
            sql = f"SELECT {_BUDGET_COLS} FROM budgets {'WHERE ' + ' AND '.join(clauses) if clauses else ''} "
            sql += "ORDER BY scope, unit LIMIT ?"
            raws = self._db.execute(sql, (*params, *(position or ()), chunk)).fetchall()
            for raw in raws:
                yield _budget_from(raw)
            if len(raws) < chunk:
                return
            position = (raws[-1][0], raws[-1][1])
            chunk = min(chunk * 4, 1024)

    def active_reservations(self, owner: str | None) -> int:
        found = self._db.execute("SELECT active FROM active_counts WHERE owner=?", (owner or "",)).fetchone()
        return int(found[0]) if found else 0

    def due_reservations(
        self, now_ms: int, limit: int, tenant: str | rules.AllTenants | None = rules.ALL_TENANTS
    ) -> list[str]:
        due = "SELECT id, tenant FROM reservations WHERE status='ACTIVE' AND deadline_ms < ? ORDER BY deadline_ms"
        if isinstance(tenant, rules.AllTenants):
            return [r[0] for r in self._db.execute(due + " LIMIT ?", (now_ms, limit))]
        # One tenant's among the earliest due (at most 5 x limit looked at, as memory:// does): another
        # tenant's pile of dead holds never makes this tenant's write scan it. "IS": NULL is no tenant.
        rows = self._db.execute(
            f"SELECT id FROM ({due} LIMIT ?) WHERE tenant IS ? LIMIT ?", (now_ms, 5 * limit, tenant, limit)
        )
        return [r[0] for r in rows]

    def get_idempotency(self, tenant: str, endpoint: str, key: str) -> IdempotencyRecord | None:
        row = self._db.execute(
            "SELECT fingerprint, response, created_at_ms FROM idempotency WHERE tenant=? AND endpoint=? AND key=?",
            (tenant, endpoint, key),
        ).fetchone()
        return IdempotencyRecord(row[0], json.loads(row[1]), row[2]) if row else None

    def put_idempotency(self, tenant: str, endpoint: str, key: str, record: IdempotencyRecord) -> None:
        digest = record.fingerprint if isinstance(record.fingerprint, str) else record.fingerprint.digest
        response = record.response
        body = response.model_dump_json(exclude_none=True) if isinstance(response, BaseModel) else _dumps(response)
        self._db.execute(
            "INSERT OR REPLACE INTO idempotency VALUES (?,?,?,?,?,?)",
            (tenant, endpoint, key, digest, body, record.created_at_ms),
        )

    def get_meta(self, keys: Sequence[str]) -> dict[str, str]:
        if not keys:
            return {}
        marks = ",".join("?" * len(keys))
        return dict(self._db.execute(f"SELECT key, value FROM kv WHERE key IN ({marks})", tuple(keys)).fetchall())

    def put_meta(self, key: str, value: str | None) -> None:
        if value is None:
            self._db.execute("DELETE FROM kv WHERE key=?", (key,))
        else:
            self._db.execute("INSERT OR REPLACE INTO kv VALUES (?,?)", (key, value))

    def scan_meta(self, prefix: str, limit: int | None = None, *, after: str | None = None) -> list[tuple[str, str]]:
        # One lower bound, so the index seeks to it (two would leave SQLite scanning from the first).
        low, op = (after, ">") if after is not None and after >= prefix else (prefix, ">=")
        return self._db.execute(
            f"SELECT key, value FROM kv WHERE key {op} ? AND key < ? ORDER BY key LIMIT ?",
            (low, prefix + "\U0010ffff", -1 if limit is None else limit),
        ).fetchall()

    def purge(self, older_than_ms: int, limit: int) -> int:
        a = self._db.execute(
            "DELETE FROM idempotency WHERE (tenant, endpoint, key) IN "
            "(SELECT tenant, endpoint, key FROM idempotency WHERE created_at_ms < ? LIMIT ?)",
            (older_than_ms, limit),
        ).rowcount
        b = self._db.execute(  # uses the reservations_done index: no scan of live rows
            "DELETE FROM reservations WHERE id IN (SELECT id FROM reservations WHERE status != 'ACTIVE' "
            "AND coalesce(finalized_at_ms, deadline_ms) < ? LIMIT ?)",
            (older_than_ms, limit),
        ).rowcount
        return a + b


def connect(path: str, busy_timeout_ms: int, synchronous: str = "NORMAL") -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL journal (shared by the
    ledger and the stores that keep their tables in its file)."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_ms / 1000)
    db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    _schema_version(db, path)  # refuses another program's database before writing anything (even WAL)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    return db


class SqliteLedger(TransactionalLedger):
    def __init__(
        self,
        path: str,
        *,
        synchronous: str = "NORMAL",
        busy_timeout_ms: int = 10_000,
        clock: Callable[[], int] | None = None,
        include_balances: bool = False,
        retention_ms: int = rules.IDEMPOTENCY_RETENTION_MS,
        limits: TenantLimits = DEFAULT_LIMITS,
        checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S,
    ) -> None:
        super().__init__(clock, include_balances, retention_ms, limits)
        synchronous = synchronous.upper()
        if synchronous not in ("NORMAL", "FULL", "EXTRA"):
            raise InvalidRequest("synchronous must be NORMAL, FULL or EXTRA")
        self.path = path
        self.url = f"sqlite:///{path}"
        self.synchronous = synchronous
        self._busy_timeout_ms = busy_timeout_ms
        self._thread_lock = threading.Lock()
        self._pid = -1
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._readers = threading.local()
        self._all_readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._checkpoint_interval_s = checkpoint_interval_s
        self._checkpointer: _Checkpointer | None = None
        if path != ":memory:":
            _prepare_path(path)
        try:
            self._connect()
        except sqlite3.Error as exc:
            self.close()
            raise _open_failure(path, exc) from exc
        except OSError as exc:
            self.close()
            raise LedgerUnavailable(
                f"cannot write next to the SQLite ledger ({exc.filename or path}: {exc.strerror or exc}): "
                "use a directory you can write to"
            ) from exc
        except BaseException:
            self.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        """(Re)open the connection; also after a fork, where an inherited connection is unsafe."""
        if self._db is not None and self._pid == os.getpid():
            return self._db
        self._pid = os.getpid()
        db = self._db = connect(self.path, self._busy_timeout_ms, self.synchronous)
        db.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")  # a safety net: see _Checkpointer
        if fcntl is not None and self.path != ":memory:":
            self._lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        with self._locked():
            db.execute("BEGIN IMMEDIATE")
            try:
                _install_schema(db, self.path)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return db

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            fd = self._lock_fd
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)

    def _reader(self) -> sqlite3.Connection:
        """This thread's read connection. Reads run in their own (deferred) transactions: in WAL mode
        they see a consistent snapshot and never wait for, nor hold up, the writers' lock."""
        pid = os.getpid()
        db: sqlite3.Connection | None = getattr(self._readers, "db", None)
        if db is None or getattr(self._readers, "pid", None) != pid:
            db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=self._busy_timeout_ms / 1000
            )
            db.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_ms)}")
            db.execute("PRAGMA query_only=1")
            self._readers.db, self._readers.pid = db, pid
            with self._readers_lock:  # not the writers' lock: a read never waits for a writer
                self._all_readers.append(db)
        return db

    def _ensure_checkpointer(self) -> None:
        c = self._checkpointer
        if self.path == ":memory:" or self._checkpoint_interval_s <= 0 or (c is not None and c.pid == os.getpid()):
            return
        with self._readers_lock:
            if self._checkpointer is None or self._checkpointer.pid != os.getpid():
                self._checkpointer = _Checkpointer(
                    self.path, self._checkpoint_interval_s, self._busy_timeout_ms, self._locked
                )
                self._checkpointer.start()

    def count_active(self) -> int:
        """The sum of the per-tenant ACTIVE counts (one row per tenant, not per reservation)."""
        with self._transaction(write=False) as txn:
            found = txn._db.execute("SELECT coalesce(sum(active), 0) FROM active_counts").fetchone()
        return int(found[0])

    def checkpoint(self) -> None:
        """A PASSIVE WAL checkpoint now, outside any writer's transaction (it never blocks writers)."""
        if self.path != ":memory:":
            self._reader().execute("PRAGMA wal_checkpoint(PASSIVE)")

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[_SqliteTxn]:
        if not write and self.path != ":memory:":
            reader = self._reader()
            reader.execute("BEGIN")
            try:
                yield _SqliteTxn(reader, self._clock(), self.include_balances, self.limits, writable=False)
            finally:
                reader.execute("COMMIT")
            return
        db = self._connect()
        self._ensure_checkpointer()
        with self._locked():
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise LedgerUnavailable(f"SQLite ledger {self.path} is locked: {exc}") from exc
            txn = _SqliteTxn(db, self._clock(), self.include_balances, self.limits)
            try:
                yield txn
            except CyclesError:
                db.execute("COMMIT")  # a refusal keeps the expiries it discovered; rules wrote nothing else
                raise
            except BaseException:
                db.execute("ROLLBACK")
                raise
            else:
                try:
                    db.execute("COMMIT")
                except sqlite3.OperationalError as exc:
                    db.execute("ROLLBACK")
                    raise LedgerUnavailable(f"SQLite commit failed: {exc}") from exc

    def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """Writers queue for one lock: the request's digest (and a reservation's JSON columns) are
        computed before joining the queue, so the lock is held for the SQL alone."""
        if fn is rules.reserve:
            req = args[0]
            _serialised.reserve = (
                req.subject,
                req.action,
                req.metadata,
                req.subject.model_dump_json(exclude_none=True),
                req.action.model_dump_json(exclude_none=True),
                _dumps(req.metadata),
            )
            try:
                with rules.prepared_digest(req):
                    return super()._write(fn, *args)
            finally:
                _serialised.reserve = None
        if fn in _KEYED_FIRST:
            with rules.prepared_digest(args[0]):
                return super()._write(fn, *args)
        if fn in _KEYED_BY_ID:
            with rules.prepared_digest(args[1], args[0]):
                return super()._write(fn, *args)
        return super()._write(fn, *args)

    def sweep(self, limit: int = 1000) -> int:
        expired = super().sweep(limit)
        self.checkpoint()
        return expired

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        with self._readers_lock:
            for reader in self._all_readers:
                if self._pid == os.getpid():
                    reader.close()
            self._all_readers.clear()
            self._readers = threading.local()
        with self._thread_lock:
            if self._db is not None and self._pid == os.getpid():
                self._db.close()
            self._db = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None


def _prepare_path(path: str) -> None:
    target = Path(path).expanduser()
    if target.is_dir():
        raise InvalidRequest(f"{path} is a directory: name the ledger file, e.g. sqlite:///{target / 'ledger.db'}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LedgerUnavailable(
            f"cannot create the directory {target.parent} for the SQLite ledger ({exc.strerror or exc}): set "
            "CYCLES_HOME to a directory you can write to, or pass --ledger sqlite:///writable/path.db"
        ) from exc


def _open_failure(path: str, exc: sqlite3.Error) -> CyclesError:
    """What a failure to open ``path`` means for the person who named it."""
    text = str(exc)
    if "readonly" in text or "read-only" in text:
        return LedgerUnavailable(
            f"SQLite ledger {path} is read-only ({text}): Cycles writes to its ledger; make the file and its "
            "directory writable, or use another ledger"
        )
    if "not a database" in text or "malformed" in text:
        return LedgerUnavailable(
            f"{path} is not a readable SQLite database ({text}): it is corrupt or another kind of file; "
            "point --ledger at a Cycles ledger (or a new file), or restore it from a backup"
        )
    return LedgerUnavailable(f"cannot open SQLite ledger {path}: {text}")


def _schema_version(db: sqlite3.Connection, path: str) -> int:
    """The file's schema version: 0 for a new (empty) file, N for a Cycles ledger; raises for any
    other database. Ledgers written before the marker existed (our tables, no application_id) are
    recognised by their tables and ``meta.schema_version``."""
    app_id = db.execute("PRAGMA application_id").fetchone()[0]
    version = db.execute("PRAGMA user_version").fetchone()[0]
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if app_id == APPLICATION_ID:
        found = version
    elif app_id == 0 and tables <= _KEY_STORE_TABLES:
        return 0
    elif app_id == 0 and tables >= _OUR_TABLES:
        row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        found = int(row[0]) if row else 1
    else:
        owner = f"application_id {app_id:#x}" if app_id else f"tables {', '.join(sorted(tables)[:5])}"
        raise InvalidRequest(
            f"{path} is another program's SQLite database ({owner}), not a Cycles ledger: Cycles leaves it "
            "untouched; give --ledger a new file or an existing Cycles ledger"
        )
    if found > SCHEMA_VERSION:
        raise InvalidRequest(
            f"{path} was written by a newer Cycles (schema {found}, this one knows {SCHEMA_VERSION}): "
            "upgrade cycles-core"
        )
    return int(found)


def _install_schema(db: sqlite3.Connection, path: str) -> None:
    """Inside the open transaction: create a new ledger, or migrate an older one, and stamp it."""
    version = _schema_version(db, path)  # again: another process may have set the file up meanwhile
    for statement in SCHEMA.split(";"):  # IF NOT EXISTS: new tables and indexes of any version
        if statement.strip():
            db.execute(statement)
    if version:
        for step in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS.get(step, ()):
                db.execute(statement)
    db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    db.execute(f"PRAGMA application_id={APPLICATION_ID}")
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


class _Checkpointer(threading.Thread):
    """Passive WAL checkpoints from a background thread, so that no writer pays for one inside its
    transaction: SQLite's auto-checkpoint runs inside whichever commit crosses the threshold (issue
    11 measured one process's reserve+commit p99 at 5.1 ms with it, 0.68 ms without). PASSIVE never
    waits for readers or writers; it copies what it can and tries again next time."""

    def __init__(
        self, path: str, interval_s: float, busy_timeout_ms: int, locked: Callable[[], AbstractContextManager[None]]
    ) -> None:
        super().__init__(name=f"cycles-sqlite-checkpoint:{path}", daemon=True)
        self.path, self.interval_s, self.pid = path, interval_s, os.getpid()
        self._busy_timeout_ms = busy_timeout_ms
        self._locked = locked
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_ms)}")
        except sqlite3.Error:  # pragma: no cover - the ledger itself would have failed first
            return
        try:
            while not self._stop_event.wait(self.interval_s):
                try:
                    self.checkpoint(db)
                except sqlite3.Error as exc:  # busy, or the file went away: next time
                    logger.debug("WAL checkpoint skipped: %s", exc)
        finally:
            db.close()

    def checkpoint(self, db: sqlite3.Connection) -> None:
        """Copy the WAL back without any lock. Under steady writes the WAL then seldom restarts by
        itself and its file grows; once it is past ``WAL_RESTART_PAGES`` the remaining frames are
        copied under the writers' lock and the WAL truncated (a short hold: the passive pass just
        did nearly all the work)."""
        _busy, frames, _copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if frames >= WAL_RESTART_PAGES:
            with self._locked():
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive() and self.pid == os.getpid() and threading.current_thread() is not self:
            self.join(timeout=5)


# Operations whose request is fingerprinted: (request, ...) and (reservation_id, request, ...).
_KEYED_FIRST = frozenset({rules.reserve, rules.decide, rules.event})
_KEYED_BY_ID = frozenset({rules.commit, rules.release, rules.extend})


def open_sqlite(url: str, **options: Any) -> SqliteLedger:
    """``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``, ``?synchronous=FULL``."""
    parts = urlsplit(url)
    raw = url[len("sqlite://") :].split("?", 1)[0]
    if not raw.startswith("/") or len(raw) < 2:
        raise InvalidRequest(f"sqlite URL needs a path: sqlite:///ledger.db or sqlite:////abs/ledger.db, got {url!r}")
    path = unquote(raw[1:])
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if "synchronous" in query:
        options.setdefault("synchronous", query["synchronous"])
    if "busy_timeout_ms" in query:
        options.setdefault("busy_timeout_ms", int(query["busy_timeout_ms"]))
    if "retention_ms" in query:
        options.setdefault("retention_ms", int(query["retention_ms"]))
    options.setdefault("limits", limits_from_query(query))
    return SqliteLedger(path, **options)
