"""Action quotas and action-kind access control (cycles-action-kinds / protocol-extensions v0.1.26),
written once.

A scope may carry a *policy*: count quotas per action kind or per risk class and window
(``per_run``, ``per_minute_tumbling``, ``per_hour_tumbling``, ``per_day_tumbling``,
``per_tenant_per_day``), and an allow- or denylist of action kinds. A reservation is evaluated in the
normative order -- access control, risk-class quotas, per-kind quotas, then the budget -- and its
counters move atomically with the budget: a denied reservation counts nothing.

Which rules apply: for each step, the most specific scope of the subject's path that has a rule
for it (an access list; a quota for the action's risk class; a quota for the action kind), as the
spec's SCOPE DERIVATION FOR QUOTAS says. Counters are kept per (that scope, kind or risk class,
window, window key); ``per_tenant_per_day`` counts at the tenant. Tumbling windows are UTC calendar
buckets; ``per_run`` is keyed on ``Subject.dimensions["run_id"]`` (400 INVALID_REQUEST when a per_run
quota applies and there is none). Per the PER_RUN COUNTER LIFECYCLE, a per_run count is given back
when its reservation is released or expires, and a per_run counter lives ``per_run_counter_ttl_ms``
after its last increment; tumbling windows are never given back (the window decides).

``plan`` is pure: memory and SQLite run it inside their transaction over the stored policies;
redis.py runs it over policies it caches by version, and the Lua script checks that version, the
counters and the budget in one atomic step.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from cycles.errors import (
    ActionKindDenied,
    ActionKindNotAllowed,
    ActionQuotaExceeded,
    CyclesError,
    InvalidRequest,
    LimitExceeded,
    LoopDetected,
    PriorityHeadroomExceeded,
)
from cycles.models import Action, Subject

__all__ = [
    "RISK_CLASSES",
    "WINDOWS",
    "Counter",
    "PolicyEdit",
    "Quota",
    "ScopePolicy",
    "apply_edit",
    "plan",
    "risk_class_of",
    "violation",
]

RiskClass = Literal["read_only", "local_mutation", "side_effect", "external_side_effect", "high_risk"]
ObserveMode = Literal["DISABLED", "OBSERVE", "ENFORCE"]
Window = Literal["per_run", "per_minute_tumbling", "per_hour_tumbling", "per_day_tumbling", "per_tenant_per_day"]
RISK_CLASSES: tuple[str, ...] = ("read_only", "local_mutation", "side_effect", "external_side_effect", "high_risk")
WINDOWS: tuple[str, ...] = (
    "per_run",
    "per_minute_tumbling",
    "per_hour_tumbling",
    "per_day_tumbling",
    "per_tenant_per_day",
)
DEFAULT_RUN_TTL_MS = 86_400_000
#: The runtime extensions this library implements. HTTP clients announce it in ``X-Cycles-Extensions``;
#: the server then adds ``deny_detail`` to DENY bodies (clients of the v0 shapes, whose models
#: forbid unknown fields, get the v0 body; 409 errors carry it in ``details`` for everyone).
EXTENSIONS_VERSION = "0.1.26"
_BUCKET_MS = {
    "per_minute_tumbling": 60_000,
    "per_hour_tumbling": 3_600_000,
    "per_day_tumbling": 86_400_000,
    "per_tenant_per_day": 86_400_000,
}
# Cleanup TTLs the spec recommends; they never define the window (the bucket does).
_CLEANUP_MS = {
    "per_minute_tumbling": 120_000,
    "per_hour_tumbling": 3_660_000,
    "per_day_tumbling": 90_000_000,
    "per_tenant_per_day": 90_000_000,
}
_BUCKET_FORMAT = {
    "per_minute_tumbling": "%Y-%m-%dT%H:%M",
    "per_hour_tumbling": "%Y-%m-%dT%H",
    "per_day_tumbling": "%Y-%m-%d",
    "per_tenant_per_day": "%Y-%m-%d",
}

# The built-in registry's risk classes (x-action-kind-registry, v0.1.26). Unregistered kinds are
# side_effect; custom.* kinds have the class they were declared with (ledger/custom_kinds.py).
KIND_RISK: dict[str, str] = {
    "llm.completion": "side_effect",
    "llm.embedding": "read_only",
    "llm.structured_output": "side_effect",
    "agent.spawn": "side_effect",
    "agent.delegate": "side_effect",
    "agent.message": "side_effect",
    "agent.human_escalation": "external_side_effect",
    "web.search": "read_only",
    "http.get": "read_only",
    "http.post": "external_side_effect",
    "http.put": "external_side_effect",
    "http.delete": "external_side_effect",
    "http.graphql": "side_effect",
    "message.email.send": "external_side_effect",
    "message.slack.post": "external_side_effect",
    "message.sms.send": "external_side_effect",
    "message.chat.post": "external_side_effect",
    "db.query": "read_only",
    "db.write": "side_effect",
    "db.schema_change": "high_risk",
    "crm.record.read": "read_only",
    "crm.record.write": "side_effect",
    "crm.record.delete": "external_side_effect",
    "file.read": "read_only",
    "file.write": "local_mutation",
    "file.delete": "side_effect",
    "code.exec": "high_risk",
    "code.deploy": "high_risk",
    "code.lint": "read_only",
    "vector.query": "read_only",
    "vector.upsert": "side_effect",
    "vector.delete": "side_effect",
    "memory.read": "read_only",
    "memory.write": "local_mutation",
    "memory.delete": "side_effect",
    "reasoning.plan": "side_effect",
    "reasoning.reflect": "side_effect",
    "calendar.read": "read_only",
    "calendar.write": "external_side_effect",
    "payment.charge": "high_risk",
    "payment.refund": "high_risk",
    "image.generate": "external_side_effect",
    "image.edit": "external_side_effect",
    "video.generate": "high_risk",
    "video.transcode": "side_effect",
    "audio.generate": "external_side_effect",
    "audio.transcribe": "read_only",
    "vision.analyze": "side_effect",
    "vision.ocr": "side_effect",
    "vision.parse_document": "side_effect",
    "social.post.create": "external_side_effect",
    "social.post.delete": "external_side_effect",
    "social.dm.send": "external_side_effect",
    "notification.push.send": "external_side_effect",
    "notification.webhook.trigger": "external_side_effect",
    "storage.upload": "side_effect",
    "storage.download": "read_only",
    "storage.delete": "side_effect",
    "document.create": "side_effect",
    "document.edit": "side_effect",
    "document.share": "external_side_effect",
    "unknown.call": "side_effect",
}

Kind = Annotated[str, StringConstraints(min_length=1, max_length=64)]


def risk_class_of(kind: str) -> str:
    found = KIND_RISK.get(kind)
    if found is not None:
        return found
    if kind.startswith("custom."):  # the declared class, or a 400 (custom_kinds imports this module)
        from cycles.ledger import custom_kinds

        custom_kinds.check(kind)
        declared = custom_kinds.declared(kind)
        assert declared is not None
        return declared.risk_class
    return "side_effect"


class Quota(BaseModel):
    """One count quota: ``action_kind`` (ActionQuota) or ``risk_class`` (RiskClassQuota), not both.
    ``scope`` is where it is set (filled in on reads)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    action_kind: Kind | None = None
    risk_class: RiskClass | None = None
    max_calls: Annotated[int, Field(ge=1, le=100_000, strict=True)]
    window: Window
    per_run_counter_ttl_ms: Annotated[int, Field(ge=60_000, le=604_800_000)] | None = None
    host_allowlist: list[Annotated[str, StringConstraints(max_length=253)]] | None = None
    recipient_domain_allowlist: list[Annotated[str, StringConstraints(max_length=253)]] | None = None
    resource_type_allowlist: list[Annotated[str, StringConstraints(max_length=128)]] | None = None
    #: share of max_calls at which a quota.threshold_approaching event is announced (default 0.80)
    threshold_pct: Annotated[float, Field(ge=0.01, le=0.99, allow_inf_nan=False)] | None = None
    scope: str | None = None

    @model_validator(mode="after")
    def _check(self) -> Quota:
        if (self.action_kind is None) == (self.risk_class is None):
            raise ValueError("a quota names exactly one of action_kind and risk_class")
        if self.per_run_counter_ttl_ms is not None and self.window != "per_run":
            raise ValueError("per_run_counter_ttl_ms is only for window=per_run")
        if self.risk_class is not None and self._allowlists():
            raise ValueError("host/recipient_domain/resource_type allowlists apply to action_kind quotas only")
        return self

    def _allowlists(self) -> list[tuple[str, list[str]]]:
        return [
            (field, values)
            for field, values in (
                ("host", self.host_allowlist),
                ("recipient_domain", self.recipient_domain_allowlist),
                ("resource_type", self.resource_type_allowlist),
            )
            if values
        ]

    @property
    def target(self) -> str:
        """What it counts: the action kind, or ``__risk__:<class>``."""
        return self.action_kind if self.action_kind is not None else f"__risk__:{self.risk_class}"

    def selects(self, action: Action) -> bool:
        """The POLICY KEYS rule: a non-empty allowlist applies only when the key is present and listed."""
        keys = action.policy_keys or {}
        return all(keys.get(field) in values for field, values in self._allowlists())


class LoopGuard(BaseModel):
    """Cap identical steps: the same action kind with the same arguments fingerprint
    (``args_fingerprint``) at most ``max_repeats`` times per run (or per tumbling window)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_repeats: Annotated[int, Field(ge=1, le=100_000, strict=True)]
    window: Window = "per_run"


FINGERPRINT_KEY = "args_fingerprint"  # in Action.policy_keys["custom"]


def args_fingerprint(name: str, args: Any) -> str:
    """Tool name + canonical (sorted-key JSON) arguments, hashed: equal calls, equal fingerprints.

    Arguments given as JSON text (the raw ``arguments`` of an OpenAI tool call) are parsed first,
    so every adapter and the MCP gate agree whether a framework hands over the text or the object."""
    if isinstance(args, str | bytes):
        with contextlib.suppress(ValueError):  # plain text: hashed as it is
            args = json.loads(args)
    body = json.dumps([name, args], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:32]


def with_args_fingerprint(action: Action, args: Any) -> Action:
    """``action`` carrying the fingerprint of its arguments, for a loop guard to compare."""
    keys = dict(action.policy_keys or {})
    keys["custom"] = {**(keys.get("custom") or {}), FINGERPRINT_KEY: args_fingerprint(action.name, args)}
    return action.model_copy(update={"policy_keys": keys})


def _fingerprint_of(action: Action) -> str | None:
    custom = (action.policy_keys or {}).get("custom")
    value = custom.get(FINGERPRINT_KEY) if isinstance(custom, dict) else None
    return value if isinstance(value, str) and value else None


class ScopePolicy(BaseModel):
    """The quotas and action-kind lists set on one scope."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scope: str
    quotas: list[Quota] = Field(default_factory=list)
    allowed_action_kinds: list[Kind] = Field(default_factory=list)
    denied_action_kinds: list[Kind] = Field(default_factory=list)
    #: Tenant.observe_mode (governance extensions), kept on the tenant's own scope ("tenant:<t>").
    observe_mode: ObserveMode | None = None
    loop_guard: LoopGuard | None = None

    def is_empty(self) -> bool:
        return not (
            self.quotas or self.allowed_action_kinds or self.denied_action_kinds or self.observe_mode or self.loop_guard
        )

    def dumps(self) -> str:
        return self.model_dump_json(exclude={"scope"}, exclude_none=True)

    @classmethod
    def loads(cls, scope: str, text: str) -> ScopePolicy:
        data = json.loads(text)
        quotas = [Quota.model_validate({**q, "scope": scope}) for q in data.get("quotas", ())]
        return cls(
            scope=scope,
            quotas=quotas,
            allowed_action_kinds=data.get("allowed_action_kinds", []),
            denied_action_kinds=data.get("denied_action_kinds", []),
            observe_mode=data.get("observe_mode"),
            loop_guard=data.get("loop_guard"),
        )


class PolicyEdit(BaseModel):
    """One change to a scope's policy: set (replace by kind/class and window) or delete a quota,
    or replace the allow- or denylist (``[]`` clears it)."""

    model_config = ConfigDict(extra="forbid")

    set_quota: Quota | None = None
    delete_quota: Quota | None = None  # matched on action_kind / risk_class and window; max_calls ignored
    allowed_action_kinds: Annotated[list[Kind], Field(max_length=200)] | None = None
    denied_action_kinds: Annotated[list[Kind], Field(max_length=200)] | None = None
    observe_mode: ObserveMode | None = None  # on a tenant scope only
    loop_guard: LoopGuard | Literal["off"] | None = None


def apply_edit(policy: ScopePolicy, edit: PolicyEdit) -> ScopePolicy:
    """The policy after ``edit``; raises NotFound-like InvalidRequest/NotFound before any write."""
    from cycles.errors import NotFound

    quotas = list(policy.quotas)
    if edit.set_quota is not None:
        new = edit.set_quota.model_copy(update={"scope": None})
        quotas = [q for q in quotas if (q.target, q.window) != (new.target, new.window)] + [new]
        kind_quotas = sum(1 for q in quotas if q.action_kind is not None)
        if kind_quotas > 50 or len(quotas) - kind_quotas > 20:  # the governance spec's maxItems
            raise InvalidRequest("a scope holds at most 50 action-kind quotas and 20 risk-class quotas")
    if edit.delete_quota is not None:
        gone = (edit.delete_quota.target, edit.delete_quota.window)
        kept = [q for q in quotas if (q.target, q.window) != gone]
        if len(kept) == len(quotas):
            raise NotFound(f"no {gone[0]} {gone[1]} quota on {policy.scope}", details={"scope": policy.scope})
        quotas = kept
    allowed = policy.allowed_action_kinds if edit.allowed_action_kinds is None else edit.allowed_action_kinds
    denied = policy.denied_action_kinds if edit.denied_action_kinds is None else edit.denied_action_kinds
    if allowed and denied:
        raise InvalidRequest("allowed_action_kinds and denied_action_kinds are mutually exclusive on a scope")
    observe = policy.observe_mode
    if edit.observe_mode is not None:
        if "/" in policy.scope or not policy.scope.startswith("tenant:"):
            raise InvalidRequest("observe_mode is a tenant setting: set it on tenant:<name>")
        observe = None if edit.observe_mode == "ENFORCE" else edit.observe_mode
    loop = policy.loop_guard
    if edit.loop_guard is not None:
        loop = None if edit.loop_guard == "off" else edit.loop_guard
    return ScopePolicy(
        scope=policy.scope,
        quotas=[q.model_copy(update={"scope": None}) for q in quotas],
        allowed_action_kinds=list(allowed),
        denied_action_kinds=list(denied),
        observe_mode=observe,
        loop_guard=loop,
    )


def meta_key(scope: str) -> str:
    return f"policy|{scope}"


@functools.lru_cache(maxsize=4096)
def load_policy(scope: str, text: str) -> ScopePolicy:
    """A stored policy (cached by its text: the reserve path reads it on every call)."""
    return ScopePolicy.loads(scope, text)


# ---- priority headroom ----------------------------------------------------------------------
# A reservation may carry a priority as an action tag ("priority:low"); untagged ones have none.
# A prioritised reservation is granted only if, after it, each budget on its path still has at
# least that priority's share of its allocation left: background work cannot starve critical work.
PRIORITY_HEADROOM_PCT: dict[str, int] = {"critical": 0, "high": 10, "normal": 25, "low": 50, "bulk": 70}


def headroom_pct(action: Action) -> int:
    for tag in action.tags or ():
        if tag.startswith("priority:"):
            pct = PRIORITY_HEADROOM_PCT.get(tag[len("priority:") :])
            if pct is None:
                raise InvalidRequest(
                    f"unknown priority {tag!r}: use priority:" + ", priority:".join(PRIORITY_HEADROOM_PCT)
                )
            return pct
    return 0


def headroom_denial(scope: str, unit: str, remaining: int, requested: int, pct: int) -> PriorityHeadroomExceeded:
    priority = next(p for p, v in PRIORITY_HEADROOM_PCT.items() if v == pct)
    detail = {
        "reason_code": "PRIORITY_HEADROOM",
        "blocked_by_scope": scope,
        "budget_remaining": remaining,
        "suggested_fix": (
            f"{priority} work keeps {pct}% of {scope} for higher priorities: raise the action's priority, "
            f"or fund {scope}"
        ),
    }
    return PriorityHeadroomExceeded(
        f"{priority} priority: {scope} keeps {pct}% of its allocation as headroom for higher priorities",
        details={
            "scope": scope,
            "unit": unit,
            "remaining": remaining,
            "requested": requested,
            "headroom_pct": pct,
            "deny_detail": detail,
        },
    )


# ---- observe mode (protocol extensions: OBSERVE MODE EVALUATION RULES) ----------------------

observe_log = logging.getLogger("cycles.observe")


def tenant_observes(policies: Mapping[str, ScopePolicy], subject: Subject) -> bool:
    tenant = policies.get(f"tenant:{subject.tenant}") if subject.tenant else None
    return tenant is not None and tenant.observe_mode == "OBSERVE"


def observing(requested: str | None, tenant_observes: bool) -> bool:
    """PRECEDENCE: the request's observe_mode, else the tenant's if OBSERVE, else ENFORCE."""
    if requested is not None:
        return requested == "OBSERVE"
    return tenant_observes


def record_observation(req: Any, response: Any, tenant: str | None) -> dict[str, Any]:
    """The reservation.observed_denied / observed_allowed event of an OBSERVE evaluation, logged
    on ``cycles.observe`` (payloads as EventDataObservedDenied / EventDataObservedAllowed)."""
    scope = response.scope_path or (response.affected_scopes or [""])[-1]
    data: dict[str, Any] = {
        "scope": scope,
        "unit": req.estimate.unit.value,
        "action": req.action.model_dump(mode="json", exclude_none=True),
        "subject": req.subject.model_dump(mode="json", exclude_none=True),
        "estimated_amount": req.estimate.amount,
        "observe_mode": "OBSERVE",
    }
    if response.deny_detail is not None:
        event_type = "reservation.observed_denied"
        data["deny_detail"] = response.deny_detail
        data["would_have_blocked_at"] = response.deny_detail.get("blocked_by_scope", scope)
    else:
        event_type = "reservation.observed_allowed"
        data["decision"] = response.decision.value
        if response.caps is not None:
            data["caps_applied"] = response.caps.model_dump(mode="json", exclude_none=True)
    tenant_id = tenant or req.subject.tenant
    event: dict[str, Any] = {"event_type": event_type, "tenant_id": tenant_id, "data": data}
    detail = response.deny_detail or {}
    run_id = (req.subject.dimensions or {}).get("run_id")
    if response.deny_detail is not None:  # CORRELATION WITH reservation.denied: a deterministic hash
        window_key = (detail.get("quota_violation") or {}).get("window_key", "")
        parts = [tenant_id or "", scope, req.action.kind, window_key, detail.get("reason_code", "")]
    else:  # observed_allowed: correlate a run's events, or none without a run_id
        parts = [tenant_id or "", scope, run_id] if run_id else []
    if parts:
        event["correlation_id"] = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]
    observe_log.info("%s %s %s", event_type, scope, json.dumps(data, separators=(",", ":")), extra={"cycles": event})
    return event


# ---- evaluation -----------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Counter:
    """One counter a reservation must fit under and, when granted, increments."""

    key: str  # "<scope>|<kind or __risk__:class>|<window>|<bucket>"
    limit: int
    ttl_ms: int  # cleanup TTL, refreshed on increment
    per_run: bool  # given back on release and expiry
    quota: Quota  # for a loop guard: max_calls = max_repeats, action_kind = the kind

    scope: str
    window_key: str
    action_kind: str
    loop: bool = False  # a loop-guard counter (step 3b): repeats count even when released
    rate: bool = False  # a named policy's reservation rate limit (policies.rate_counter): 429, not DENY

    def wire(self) -> list[Any]:
        """What the Redis script needs: key, limit, ttl, per_run, threshold count (0: none)."""
        return [self.key, self.limit, self.ttl_ms, 1 if self.per_run else 0, self.threshold() or 0]

    def threshold(self) -> int | None:
        """The count at which the quota's threshold_pct is reached (``None`` for a loop guard)."""
        if self.loop:
            return None
        pct = self.quota.threshold_pct or DEFAULT_THRESHOLD_PCT
        return max(1, math.ceil(round(pct * self.limit, 9)))  # 0.7 * 10 is 7.000000000000001


# ---- quota.threshold_approaching (protocol extensions: EventDataQuotaThresholdApproaching) -------
# A counter announces its threshold once per window instance: the first increment that reaches it
# marks the counter (counters.CounterValue.alerted; cleared when the window starts over or on a
# reset), so a per_run count given back and counted again does not announce twice. The ledger
# appends each crossing to ``threshold_crossings`` when the caller set it (the server does, and
# turns them into events), and logs it on ``cycles.quota``.
DEFAULT_THRESHOLD_PCT = 0.80
threshold_crossings: ContextVar[list[dict[str, Any]] | None] = ContextVar("cycles_quota_thresholds", default=None)
threshold_log = logging.getLogger("cycles.quota")


def note_threshold(c: Counter, used: int) -> None:
    q = c.quota
    data: dict[str, Any] = {
        "scope": c.scope,
        "action_kind": "__risk__" if q.risk_class is not None else c.action_kind,
        "window": q.window,
        "window_key": c.window_key,
        "used": used,
        "limit": c.limit,
        "threshold_pct": q.threshold_pct or DEFAULT_THRESHOLD_PCT,
    }
    if q.risk_class is not None:
        data["risk_class"] = q.risk_class
    found = threshold_crossings.get()
    if found is not None:
        found.append(data)
    threshold_log.info("quota.threshold_approaching %s", json.dumps(data, separators=(",", ":")))


def _bucket(window: str, now_ms: int) -> tuple[str, str]:
    """(key part, window_key as the spec writes it) of a tumbling window at ``now_ms`` (UTC)."""
    index = now_ms // _BUCKET_MS[window]
    return str(index), bucket_label(window, index)


def bucket_label(window: str, index: int) -> str:
    """The window_key of a tumbling window's bucket (``2026-04-09T14`` for an hour)."""
    return datetime.fromtimestamp(index * _BUCKET_MS[window] / 1000, UTC).strftime(_BUCKET_FORMAT[window])


def bucket_end(window: str, index: int) -> int:
    """When the bucket's window ends (epoch ms)."""
    return (index + 1) * _BUCKET_MS[window]


def bucket_index(window: str, label: str) -> int:
    """The bucket a window_key names; ``InvalidRequest`` unless it is written as the spec writes it."""
    try:
        at = datetime.strptime(label, _BUCKET_FORMAT[window]).replace(tzinfo=UTC)
    except ValueError as exc:
        raise InvalidRequest(
            f"window_key {label[:64]!r} is not a {window} bucket ({_BUCKET_FORMAT[window]}, UTC)"
        ) from exc
    index = int(at.timestamp() * 1000) // _BUCKET_MS[window]
    if bucket_label(window, index) != label:
        raise InvalidRequest(f"window_key {label[:64]!r} is not a {window} bucket as the listing writes it")
    return index


def plan(
    policies: Mapping[str, ScopePolicy],
    scopes: Sequence[str],
    subject: Subject,
    action: Action,
    now_ms: int,
) -> tuple[CyclesError | None, list[Counter]]:
    """Steps 1-3 of the RESERVATION EVALUATION ORDER over the policies of the subject's scopes:
    an access denial (nothing to count), or the counters to check, risk-class ones first."""
    if not policies:
        return None, []
    return plan_ranked([(s, policies[s]) for s in reversed(scopes) if s in policies], subject, action, now_ms)


def plan_ranked(
    ranked: Sequence[tuple[str, ScopePolicy]],
    subject: Subject,
    action: Action,
    now_ms: int,
) -> tuple[CyclesError | None, list[Counter]]:
    """``plan`` over policies already in precedence order (the first that has a rule for a step
    decides it): the most specific scope first, or the named policies' ranking (policies.resolve)."""
    kind = action.kind
    for scope, p in ranked:  # step 1: the first policy with an access list decides
        if p.denied_action_kinds:
            if kind in p.denied_action_kinds:
                return ActionKindDenied(
                    f"action kind {kind} is denied on {scope}",
                    details=_access_detail("ACTION_KIND_DENIED", scope, f"Remove {kind} from denied_action_kinds"),
                ), []
            break
        if p.allowed_action_kinds:
            if kind not in p.allowed_action_kinds:
                return ActionKindNotAllowed(
                    f"action kind {kind} is not in the allowed action kinds of {scope}",
                    details=_access_detail("ACTION_KIND_NOT_ALLOWED", scope, f"Add {kind} to allowed_action_kinds"),
                ), []
            break
    counters: list[Counter] = []
    risk: str | None = None
    if any(q.risk_class is not None for _, p in ranked for q in p.quotas):
        risk = risk_class_of(kind)
        for scope, p in ranked:  # step 2
            rules = [q for q in p.quotas if q.risk_class == risk]
            if rules:
                counters += [_counter(q, scope, subject, kind, now_ms) for q in rules]
                break
    for scope, p in ranked:  # step 3
        rules = [q for q in p.quotas if q.action_kind == kind]
        if rules:
            counters += [_counter(q, scope, subject, kind, now_ms) for q in rules if q.selects(action)]
            break
    fingerprint = _fingerprint_of(action)
    guard = next((p for _, p in ranked if p.loop_guard is not None), None)
    if fingerprint and guard is not None and guard.loop_guard is not None:  # step 3b: identical steps
        lg = guard.loop_guard
        if lg.window != "per_run" or (subject.dimensions or {}).get("run_id"):
            q = Quota(action_kind=kind, max_calls=lg.max_repeats, window=lg.window, scope=guard.scope)
            c = _counter(q, guard.scope, subject, kind, now_ms)
            counters.append(
                Counter(
                    f"{guard.scope}|__loop__:{kind}:{fingerprint}|{lg.window}|{c.key.rsplit('|', 1)[1]}",
                    c.limit,
                    c.ttl_ms,
                    False,
                    q,
                    c.scope,
                    c.window_key,
                    kind,
                    loop=True,
                )
            )
    return None, counters


def _counter(q: Quota, scope: str, subject: Subject, kind: str, now_ms: int) -> Counter:
    if q.window == "per_run":
        run_id = (subject.dimensions or {}).get("run_id")
        if not run_id:
            raise InvalidRequest(
                f"a per_run quota on {scope} applies to {q.target}: subject.dimensions.run_id is required",
                details={"scope": scope, "window": "per_run"},
            )
        part, label = run_id, run_id
        ttl = q.per_run_counter_ttl_ms or DEFAULT_RUN_TTL_MS
    else:
        part, label = _bucket(q.window, now_ms)
        ttl = _CLEANUP_MS[q.window]
    if q.window == "per_tenant_per_day" and subject.tenant:
        scope = f"tenant:{subject.tenant}"
    key = f"{scope}|{q.target}|{q.window}|{part}"
    return Counter(key, q.max_calls, ttl, q.window == "per_run", q, scope, label, kind)


def violation(counters: Sequence[Counter], counts: Sequence[int]) -> ActionQuotaExceeded | LimitExceeded | None:
    """The denial for the first step (risk class, then kind) with a counter at its limit: of its
    violated counters, the one with the least headroom."""
    for step in ("rate", "risk", "kind", "loop"):
        over = [
            (c.limit - n, i)
            for i, (c, n) in enumerate(zip(counters, counts, strict=True))
            if _step(c) == step and n >= c.limit
        ]
        if over:
            c = counters[min(over)[1]]
            used = counts[min(over)[1]]
            if c.rate:
                return _rate_denial(c, used)
            return _loop_denial(c, used) if c.loop else _quota_denial(c, used)
    return None


def _step(c: Counter) -> str:
    if c.rate:
        return "rate"
    return "loop" if c.loop else ("risk" if c.quota.risk_class is not None else "kind")


def _rate_denial(c: Counter, used: int) -> LimitExceeded:
    """429 LIMIT_EXCEEDED (protocol v0: server-side rate limiting), not a budget decision."""
    return LimitExceeded(
        f"rate limit: {used} of {c.limit} reservations per minute used on {c.scope} ({c.window_key})",
        details={"scope": c.scope, "limit": c.limit, "used": used, "window_key": c.window_key},
        retry_after_s=60,  # at most: the window is the UTC minute in window_key
    )


def _loop_denial(c: Counter, used: int) -> LoopDetected:
    detail = {
        "reason_code": "LOOP_DETECTED",
        "quota_violation": {
            "action_kind": c.action_kind,
            "window": c.quota.window,
            "window_key": c.window_key,
            "used": used,
            "limit": c.limit,
            "scope": c.scope,
        },
        "blocked_by_scope": c.scope,
        "suggested_fix": (
            f"The same {c.action_kind} call with the same arguments ran {used} times ({c.quota.window} "
            f"{c.window_key}): change the arguments or the approach, or raise the loop guard on {c.scope}"
        )[:512],
    }
    return LoopDetected(
        f"loop detected: identical {c.action_kind} step repeated {used} times (limit {c.limit}) in {c.window_key}",
        details={"scope": c.scope, "deny_detail": detail},
    )


def _quota_denial(c: Counter, used: int) -> ActionQuotaExceeded:
    q = c.quota
    what = q.action_kind or f"{q.risk_class} actions"
    qv: dict[str, Any] = {
        "action_kind": c.action_kind,
        "window": q.window,
        "window_key": c.window_key,
        "used": used,
        "limit": c.limit,
        "scope": c.scope,
    }
    if q.risk_class is not None:
        qv["risk_class"] = q.risk_class
    fix = f"Raise the {what} quota on {q.scope or c.scope} above {c.limit} {q.window}" + (
        " or start a new run" if q.window == "per_run" else f" or wait for the next window after {c.window_key}"
    )
    detail = {
        "reason_code": "ACTION_QUOTA_EXCEEDED",
        "quota_violation": qv,
        "blocked_by_scope": c.scope,
        "suggested_fix": fix[:512],
    }
    return ActionQuotaExceeded(
        f"{what}: {used} of {c.limit} calls used in window {q.window} ({c.window_key}) on {c.scope}",
        details={"scope": c.scope, "deny_detail": detail},
    )


def _access_detail(code: str, scope: str, fix: str) -> dict[str, Any]:
    return {"scope": scope, "deny_detail": {"reason_code": code, "blocked_by_scope": scope, "suggested_fix": fix}}
