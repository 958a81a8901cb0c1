"""The same random operations against memory, SQLite and Redis give the same answers.

One fake clock drives all three ledgers (Redis scripts take it instead of TIME), so timestamps,
expiry and remaining_ttl_ms must agree exactly; only generated ids differ, and they are replaced by
their order of appearance (R0, R1, ... / E0, E1, ...) before comparing. Every response, every error
(code, message, details) and every balance must be identical.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from cycles.errors import CyclesError
from cycles.ledger.base import BalanceQuery, Ledger, ReservationQuery
from cycles.ledger.memory import MemoryLedger
from cycles.ledger.redis import open_redis
from cycles.ledger.sqlite import SqliteLedger
from cycles.models import (
    Action,
    Amount,
    Caps,
    CommitOveragePolicy,
    CommitRequest,
    DecisionRequest,
    EventCreateRequest,
    ReleaseRequest,
    ReservationCreateRequest,
    ReservationExtendRequest,
    ReservationStatus,
    Subject,
    Unit,
)
from tests.redis.backend import drop_prefix, new_prefix, redis_url, require_redis

T0 = 1_700_000_000_000
ACTION = Action("llm.completion", "m")
SCOPES = [
    "tenant:t1",
    "tenant:t1/workflow:w1",
    "tenant:t1/workflow:w1/agent:a1",
    "tenant:t1/agent:a2",
    "tenant:t2",
    "tenant:t2/agent:a1",
    "workflow:w1",
    "workflow:w1/agent:a1",
]
SUBJECTS = [
    Subject(tenant="t1"),
    Subject(tenant="t1", workflow="w1", agent="a1"),
    Subject(tenant="t1", agent="a2"),
    Subject(tenant="t2", agent="a1"),
    Subject(workflow="w1", agent="a1"),
    Subject(workflow="w1"),
    Subject(tenant="t3"),  # never has a budget
]
UNITS = [Unit.TOKENS, Unit.CREDITS]
CAPS = [
    None,
    Caps(),
    Caps(max_tokens=100),
    Caps(tool_denylist=["x"]),
    Caps(tool_allowlist=["a", "b"], max_tokens=50),
]

units = st.sampled_from(UNITS)
amounts = st.integers(0, 60)
keys = st.sampled_from(["k0", "k1", "k2", "k3", "k4", "k5"])
policies = st.sampled_from(list(CommitOveragePolicy))
refs = st.integers(0, 50)
# An authenticated tenant, sometimes: only with subjects of a tenant (a tenant-less subject under an
# authenticated tenant shares idempotency keys across Redis slots differently; see redis.py).
callers = st.sampled_from([None, None, None, "t1"])

set_op = st.tuples(
    st.just("set"),
    st.sampled_from(SCOPES),
    units,
    st.integers(0, 200),
    st.one_of(st.none(), st.integers(0, 40)),
    st.sampled_from(range(len(CAPS))),
)
reserve_op = st.tuples(
    st.just("reserve"),
    st.sampled_from(range(len(SUBJECTS))),
    units,
    amounts,
    st.sampled_from([1000, 3000]),
    st.sampled_from([0, 1000]),
    policies,
    st.booleans(),
    keys,
    callers,
)
commit_op = st.tuples(st.just("commit"), refs, units, amounts, keys, callers)
tick_op = st.tuples(st.just("tick"), st.sampled_from([1000, 2500, 6000]))

ops = st.one_of(
    set_op,
    reserve_op,
    reserve_op,
    reserve_op,
    commit_op,
    commit_op,
    tick_op,
    tick_op,
    st.tuples(st.just("fund"), st.sampled_from(SCOPES), units, st.integers(0, 80)),
    st.tuples(
        st.just("funding"),
        st.sampled_from(SCOPES),
        units,
        st.sampled_from(["CREDIT", "DEBIT", "RESET", "RESET_SPENT", "REPAY_DEBT"]),
        st.integers(0, 80),
        st.one_of(st.none(), st.integers(0, 80)),
        st.one_of(st.none(), keys),
    ),
    st.tuples(st.just("status"), st.sampled_from(SCOPES), st.sampled_from(["ACTIVE", "FROZEN", "CLOSED"]), units),
    st.tuples(st.just("delete"), st.sampled_from(SCOPES), st.one_of(st.none(), units), st.booleans()),
    st.tuples(st.just("release"), refs, keys, callers),
    st.tuples(st.just("extend"), refs, st.sampled_from([1000, 5000]), keys),
    st.tuples(st.just("event"), st.sampled_from(range(len(SUBJECTS))), units, amounts, policies, keys),
    st.tuples(st.just("decide"), st.sampled_from(range(len(SUBJECTS))), units, amounts, keys),
    st.tuples(st.just("get_res"), refs, callers),
    st.tuples(
        st.just("list_res"),
        st.sampled_from([None, "t1", "t2"]),
        st.one_of(st.none(), st.sampled_from(list(ReservationStatus))),
    ),
    st.tuples(st.just("balances"), st.sampled_from(["t1", "t2"]), st.sampled_from([None, "w1"])),
    st.tuples(st.just("get_budget"), st.sampled_from(SCOPES), units),
    st.tuples(st.just("list_budgets"), st.sampled_from([None, "t1", "t2"])),
    st.tuples(st.just("sweep")),
)
# Budgets first (most scopes funded in the main unit), then the mix of operations.
programs = st.tuples(st.lists(set_op, min_size=4, max_size=12), st.lists(ops, min_size=10, max_size=80)).map(
    lambda p: p[0] + p[1]
)


class _Backend:
    def __init__(self, name: str, ledger: Ledger) -> None:
        self.name = name
        self.ledger = ledger
        self.reservations: list[str] = []  # in order of creation
        self.ids: dict[str, str] = {}  # generated id -> stable label
        self.steps = 0

    def label(self, value: str, kind: str) -> str:
        if value not in self.ids:
            self.ids[value] = f"{kind}{sum(1 for v in self.ids.values() if v[0] == kind)}"
        return self.ids[value]

    def normalize(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self.normalize(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.normalize(v) for v in value]
        if isinstance(value, str):
            for generated in re.findall(r"(?:rsv|evt)_[A-Za-z0-9_.-]*[0-9a-f]{32}", value):
                value = value.replace(generated, self.label(generated, "R" if generated[0] == "r" else "E"))
        return value

    def run(self, op: tuple[Any, ...], clock: list[int]) -> Any:
        return self.run_with(_apply, op)

    def run_with(self, apply: Callable[[_Backend, tuple[Any, ...]], Any], op: tuple[Any, ...]) -> Any:
        try:
            result = apply(self, op)
        except CyclesError as exc:
            return ("error", exc.code, self.normalize(exc.message), self.normalize(exc.details))
        if isinstance(result, BaseModel):
            dumped = result.model_dump(mode="json", exclude_none=True)
            if "reservations" in dumped:  # equal creation times tie-break on ids, which differ
                dumped["reservations"] = sorted(
                    (self.normalize(r) for r in dumped["reservations"]),
                    key=lambda r: json.dumps(r, sort_keys=True),
                )
            return ("ok", self.normalize(dumped))
        if isinstance(result, list) and result and isinstance(result[0], dict):
            return ("ok", result)
        if isinstance(result, list):
            dumped_list = [b.model_dump(mode="json", exclude_none=True) for b in result]
            return ("ok", sorted(dumped_list, key=lambda b: (b["scope"], b["remaining"]["unit"])))
        return ("ok", result)


def _ref(backend: _Backend, ref: int) -> str | None:
    return backend.reservations[ref % len(backend.reservations)] if backend.reservations else None


def _apply(b: _Backend, op: tuple[Any, ...]) -> Any:
    ledger = b.ledger
    kind = op[0]
    if kind == "set":
        _, scope, unit, amount, overdraft, caps = op
        return ledger.set_budget(
            scope,
            Amount(unit=unit, amount=amount),
            overdraft_limit=None if overdraft is None else Amount(unit=unit, amount=overdraft),
            caps=CAPS[caps],
        )
    if kind == "fund":
        _, scope, unit, amount = op
        return ledger.fund_budget(scope, Amount(unit=unit, amount=amount))
    if kind == "funding":  # the governance operations: rules.fund against lua/funding.lua
        _, scope, unit, operation, amount, spent, key = op
        return ledger.fund(
            scope,
            unit,
            operation,
            Amount(unit=unit, amount=amount),
            spent=None if spent is None else Amount(unit=unit, amount=spent),
            idempotency_key=key,
        )
    if kind == "status":
        _, scope, status, unit = op
        return ledger.set_budget_status(scope, status, unit=unit)
    if kind == "delete":
        _, scope, unit, force = op
        return ledger.delete_budget(scope, unit=unit, force=force)
    if kind == "reserve":
        _, subject, unit, amount, ttl, grace, policy, dry, key, caller = op
        req = ReservationCreateRequest(
            idempotency_key=key,
            subject=SUBJECTS[subject],
            action=ACTION,
            estimate=Amount(unit=unit, amount=amount),
            ttl_ms=ttl,
            grace_period_ms=grace,
            overage_policy=policy,
            dry_run=dry,
        )
        if caller is not None and SUBJECTS[subject].tenant is None:
            caller = None
        r = ledger.reserve(req, tenant=caller)
        if r.reservation_id and r.reservation_id not in b.reservations:
            b.reservations.append(r.reservation_id)
        return r
    if kind in ("commit", "release", "extend", "get_res"):
        rid = _ref(b, op[1])
        if rid is None:
            return "no reservation yet"
        if kind == "commit":
            _, _, unit, amount, key, caller = op
            return ledger.commit(
                rid,
                CommitRequest(idempotency_key=key, actual=Amount(unit=unit, amount=amount)),
                tenant=caller,
            )
        if kind == "release":
            _, _, key, caller = op
            return ledger.release(rid, ReleaseRequest(idempotency_key=key), tenant=caller)
        if kind == "extend":
            _, _, by, key = op
            return ledger.extend(rid, ReservationExtendRequest(idempotency_key=key, extend_by_ms=by))
        return ledger.get_reservation(rid, tenant=op[2])
    if kind == "event":
        _, subject, unit, amount, policy, key = op
        return ledger.event(
            EventCreateRequest(
                idempotency_key=key,
                subject=SUBJECTS[subject],
                action=ACTION,
                actual=Amount(unit=unit, amount=amount),
                overage_policy=policy,
            )
        )
    if kind == "decide":
        _, subject, unit, amount, key = op
        return ledger.decide(
            DecisionRequest(
                idempotency_key=key,
                subject=SUBJECTS[subject],
                action=ACTION,
                estimate=Amount(unit=unit, amount=amount),
            )
        )
    if kind == "list_res":
        _, tenant, status = op
        return ledger.list_reservations(ReservationQuery(tenant=tenant, status=status, limit=200))
    if kind == "balances":
        _, tenant, workflow = op
        return ledger.balances(BalanceQuery(tenant=tenant, workflow=workflow, limit=200))
    if kind == "get_budget":
        _, scope, unit = op
        return ledger.get_budget(scope, unit=unit)
    if kind == "list_budgets":
        return ledger.list_budgets(tenant=op[1])
    if kind == "sweep":
        ledger.sweep()
        # The count differs by design: memory/SQLite expire lazily before every write (uncounted),
        # so their sweep() often finds nothing left. The effect is compared by the next reads.
        return "swept"
    raise AssertionError(kind)


def _backends(tmp: Path, clock: Callable[[], int], prefix: str) -> list[_Backend]:
    return [
        _Backend("memory", MemoryLedger(clock=clock, include_balances=True)),
        _Backend("sqlite", SqliteLedger(str(tmp / "ledger.db"), clock=clock, include_balances=True)),
        _Backend("redis", open_redis(redis_url(prefix), clock=clock, include_balances=True)),
    ]


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(programs)
def test_memory_sqlite_and_redis_answer_alike(program: list[tuple[Any, ...]]) -> None:
    _compare(program, _apply, T0)


#: the steps memory and SQLite serve without a write transaction (no housekeeping)
_READS = frozenset({"list_res", "balances", "sweep"})


def _compare(
    program: list[tuple[Any, ...]],
    apply: Callable[[_Backend, tuple[Any, ...]], Any],
    t0: int,
    max_run_ms: int | None = None,
    memory_retention_ms: int | None = None,
) -> None:
    """Run ``program`` on every backend under one clock and compare every answer."""
    require_redis()
    clock = [t0]
    prefix = new_prefix()
    with tempfile.TemporaryDirectory() as tmp:
        backends = _backends(Path(tmp), lambda: clock[0], prefix)
        if memory_retention_ms is not None:
            backends[0].ledger = MemoryLedger(
                clock=lambda: clock[0], include_balances=True, retention_ms=memory_retention_ms
            )
        for b in backends[:2]:
            b.ledger.lazy_sweep_interval_ms = 10**15  # type: ignore[attr-defined]  # swept below instead
        next_sweep = t0
        try:
            for step, op in enumerate(program):
                if op[0] == "tick":
                    if max_run_ms is None or clock[0] + op[1] - t0 < max_run_ms:
                        clock[0] += op[1]
                    continue
                # memory and SQLite sweep every tenant with the first write of each second (embedded,
                # nothing else would); a Redis deployment has the server's sweeper for that. When
                # another tenant's overdue hold goes back is no part of the contract (only that
                # tenant's reservations draw on its budgets, and they expire it first), so every
                # backend sweeps here at the same moments, as that housekeeping would.
                if op[0] not in _READS and clock[0] >= next_sweep:
                    next_sweep = clock[0] + 1000
                    for b in backends:
                        b.ledger.sweep(limit=100)
                outcomes = {b.name: b.run_with(apply, op) for b in backends}
                assert outcomes["memory"] == outcomes["sqlite"], (step, op, "memory vs sqlite", outcomes)
                assert outcomes["redis"] == outcomes["memory"], (step, op, "redis vs memory", outcomes)
                result = outcomes["memory"]
                reason = result[1].get("reason_code") if result[0] == "ok" and isinstance(result[1], dict) else None
                event(f"{op[0]}: {result[1] if result[0] == 'error' else reason or 'ok'}")
            if clock[0] >= next_sweep:  # list_budgets is a write there too
                for b in backends:
                    b.ledger.sweep(limit=100)
            final = {b.name: b.run(("list_budgets", None), clock) for b in backends}
            assert final["redis"] == final["memory"] == final["sqlite"]
        finally:
            for b in backends:
                b.ledger.close()
            drop_prefix(prefix)


# ---- recurring budgets, quotas, access lists, loop guard, priorities ------------------------

Q_SUBJECTS = [
    Subject(tenant="t1", dimensions={"run_id": "r1"}),
    Subject(tenant="t1", workflow="w1", agent="a1", dimensions={"run_id": "r1"}),
    Subject(tenant="t1", workflow="w1", dimensions={"run_id": "r2"}),
    Subject(tenant="t1", agent="a2"),  # no run_id: a per_run quota that applies is a 400
    Subject(tenant="t2", agent="a1", dimensions={"run_id": "r1"}),
]
Q_ACTIONS = [
    Action("message.email.send", "smtp"),
    Action("http.post", "hook", policy_keys={"host": "api.x.com"}),
    Action("web.search", "q", tags=["priority:low"]),
    Action("code.exec", "sh", tags=["priority:high"]),
    Action("tool.call", "lookup", policy_keys={"custom": {"args_fingerprint": "f1"}}),
    Action("llm.completion", "m", tags=["priority:bulk"]),
]
Q_KINDS = ["message.email.send", "http.post", "web.search", "code.exec", "tool.call", "llm.completion"]
Q_SCOPES = ["tenant:t1", "tenant:t1/workflow:w1", "tenant:t1/workflow:w1/agent:a1", "tenant:t2"]
PERIODS = [None, ("day", "Europe/Berlin"), ("hour", None), ("90s", None), ("month", "America/New_York"), ("none", None)]
WINDOWS = ["per_run", "per_minute_tumbling", "per_hour_tumbling", "per_day_tumbling", "per_tenant_per_day"]

period_set_op = st.tuples(
    st.just("pset"),
    st.sampled_from(Q_SCOPES),
    st.integers(0, 200),
    st.sampled_from(range(len(PERIODS))),
    st.sampled_from([None, "NONE", "CARRY_FORWARD", "CAP_AT_ALLOCATED"]),
    st.one_of(st.none(), st.integers(0, 40)),
)
quota_op = st.tuples(
    st.just("quota"),
    st.sampled_from(Q_SCOPES),
    st.one_of(
        *[
            st.tuples(st.just("kind"), st.sampled_from(Q_KINDS), st.integers(1, 3), st.sampled_from(WINDOWS))
            for _ in range(4)
        ],
        st.tuples(
            st.just("risk"),
            st.sampled_from(["external_side_effect", "read_only", "side_effect", "high_risk"]),
            st.integers(1, 4),
            st.sampled_from(WINDOWS),
        ),
        st.tuples(st.just("host"), st.just("http.post"), st.integers(1, 3), st.just("per_day_tumbling")),
        st.tuples(st.just("delete"), st.sampled_from(Q_KINDS), st.just(0), st.sampled_from(WINDOWS)),
        st.tuples(st.just("deny"), st.sampled_from(Q_KINDS), st.just(0), st.just("")),
        st.tuples(st.just("allow"), st.sampled_from(Q_KINDS), st.just(0), st.just("")),
        st.tuples(st.just("clear"), st.just(""), st.just(0), st.just("")),
        st.tuples(st.just("loop"), st.just(""), st.integers(1, 3), st.just("per_run")),
        st.tuples(st.just("observe"), st.sampled_from(["OBSERVE", "ENFORCE"]), st.just(0), st.just("")),
    ),
)
q_reserve_op = st.tuples(
    st.just("qreserve"),
    st.sampled_from([0, 0, 1, 2, 3, 4]),
    st.sampled_from([0, 0, 0, 1, 2, 3, 4, 4, 5]),
    st.integers(0, 8),
    st.booleans(),
    st.sampled_from([None, None, None, "OBSERVE"]),
    keys,
)
q_ops = st.one_of(
    period_set_op,
    quota_op,
    quota_op,
    *[q_reserve_op.map(tuple) for _ in range(10)],  # distinct objects: one_of weighs each once
    st.tuples(st.just("commit"), refs, st.just(Unit.TOKENS), amounts, keys, st.just(None)),
    st.tuples(st.just("release"), refs, keys, st.just(None)),
    st.tuples(st.just("qdecide"), st.sampled_from(range(len(Q_SUBJECTS))), st.sampled_from(range(len(Q_ACTIONS)))),
    st.tuples(st.just("tick"), st.sampled_from([1000, 61_000, 3_600_000, 4 * 3_600_000])),
    st.tuples(st.just("fund"), st.sampled_from(Q_SCOPES), st.just(Unit.TOKENS), st.integers(0, 80)),
    st.tuples(st.just("get_budget"), st.sampled_from(Q_SCOPES), st.just(Unit.TOKENS)),
    st.tuples(st.just("list_budgets"), st.sampled_from([None, "t1"])),
    st.tuples(st.just("policies"), st.sampled_from([None, "t1", "t2"])),
    st.tuples(st.just("sweep")),
)
q_programs = st.tuples(
    st.lists(period_set_op, min_size=3, max_size=8),
    st.lists(quota_op, min_size=2, max_size=6),
    st.lists(q_ops, min_size=10, max_size=60),
).map(lambda p: p[0] + p[1] + p[2])


# 20:00 UTC on 30 November: within the 23 hours a program may run, Berlin's day and New York's
# month end, hours and 90 s periods pass. (Less than a day: every backend then keeps every record.)
T0_Q = 1_701_374_400_000
MAX_RUN_MS = 23 * 3_600_000


def _apply_q(b: _Backend, op: tuple[Any, ...]) -> Any:
    """Idempotency keys are unique here, so that the generated programs test quotas and periods
    rather than key reuse (the other test covers that)."""
    from cycles.ledger.periods import spec
    from cycles.ledger.quotas import PolicyEdit

    ledger = b.ledger
    kind = op[0]
    b.steps += 1
    unique = f"q{b.steps}"
    if kind in ("commit", "release"):
        op = (*op[:-2], unique, op[-1])
    if kind == "pset":
        _, scope, amount, period, rollover, overdraft = op
        p = PERIODS[period]
        return ledger.set_budget(
            scope,
            Amount(unit=Unit.TOKENS, amount=amount),
            overdraft_limit=None if overdraft is None else Amount(unit=Unit.TOKENS, amount=overdraft),
            period=None if p is None else spec(p[0], p[1], None if p[0] == "none" else rollover),
        )
    if kind == "quota":
        _, scope, (what, target, n, window) = op
        if what in ("kind", "risk", "host"):
            field = "risk_class" if what == "risk" else "action_kind"
            extra = {"host_allowlist": ["api.x.com"]} if what == "host" else {}
            quota = {field: target, "max_calls": n, "window": window, **extra}
            edit = PolicyEdit.model_validate({"set_quota": quota})
        elif what == "delete":
            edit = PolicyEdit.model_validate(
                {"delete_quota": {"action_kind": target, "max_calls": 1, "window": window}}
            )
        elif what in ("deny", "allow"):
            edit = PolicyEdit.model_validate({f"{what.replace('deny', 'deni')}ed_action_kinds": [target]})
        elif what == "clear":
            edit = PolicyEdit(allowed_action_kinds=[], denied_action_kinds=[])
        elif what == "loop":
            edit = PolicyEdit.model_validate({"loop_guard": {"max_repeats": n, "window": window}})
        else:
            edit = PolicyEdit.model_validate({"observe_mode": target})
        return ledger.update_policy(scope, edit)
    if kind == "qreserve":
        _, subject, action, amount, dry, observe, _key = op
        r = ledger.reserve(
            ReservationCreateRequest(
                idempotency_key=unique,
                subject=Q_SUBJECTS[subject],
                action=Q_ACTIONS[action],
                estimate=Amount(unit=Unit.TOKENS, amount=amount),
                ttl_ms=120_000,
                dry_run=dry,
                observe_mode=observe,
            )
        )
        if r.reservation_id and r.reservation_id not in b.reservations:
            b.reservations.append(r.reservation_id)
        return r
    if kind == "qdecide":
        _, subject, action = op
        return ledger.decide(
            DecisionRequest(
                idempotency_key=unique,
                subject=Q_SUBJECTS[subject],
                action=Q_ACTIONS[action],
                estimate=Amount(unit=Unit.TOKENS, amount=1),
            )
        )
    if kind == "policies":
        return [p.model_dump(mode="json", exclude_none=True) for p in ledger.list_policies(tenant=op[1])]
    return _apply(b, op)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(q_programs)
def test_periods_and_quotas_answer_alike(program: list[tuple[Any, ...]]) -> None:
    _compare(program, _apply_q, T0_Q, max_run_ms=MAX_RUN_MS, memory_retention_ms=86_400_000)
