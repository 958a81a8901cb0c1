"""Named policies (governance admin spec v0.1.25 ``Policy``, with the quota and access-list fields of
the governance extensions v0.1.26), written once: the model, scope patterns, precedence, and what a
reservation gets from the policies that match it.

A named policy belongs to one tenant and applies to the scopes its ``scope_pattern`` matches,
within that tenant only (a tenant's ``agent:*`` never reaches another tenant's agents):

============================  ===========================================================
``tenant:acme/workspace:eng``  that scope (and, like a budget, what is below it)
``tenant:acme/workspace:eng/*``  every scope below it
``agent:*``                    every scope at the agent level (and below it)
``*/agent:summarizer``         that agent wherever it sits (and below it)
``*``                          every scope of the tenant
============================  ===========================================================

A reservation is matched against each scope of its path, so the policies that can apply are found
by looking up O(depth) candidate patterns (``candidates``) in an index keyed by pattern, never by
scanning every policy. Of the matching policies that are ACTIVE and inside their effective window,
the spec's PRIORITY decides (higher first), then specificity (a pattern anchored deeper, then a more
literal pattern), then the policy id. Following the spec's MULTI-POLICY SEMANTICS, policies are not
merged: for each aspect -- caps, commit overage policy, the TTL ceiling, the reservation rate limit,
the access list, the quota rules of one action kind or risk class -- the first policy in that order
that sets it decides. A policy's quota counters live at its *anchor*, the scope its pattern names
(``tenant:acme/*``: ``tenant:acme``; ``agent:*``: the agent that matched; ``*``: the tenant).

Evaluation reuses the action-quota machinery (``quotas.plan``): a policy's quotas and access lists
become a ``ScopePolicy`` at its anchor, ranked with the per-scope policies of ``cy.quotas`` (which
count as priority-0 exact patterns); the reservation rate limit is one more counter. So memory and
SQLite apply it inside their transaction, and Redis through the version-checked plan its scripts
confirm atomically (see ``ledger/redis.py``).
"""

from __future__ import annotations

import functools
import json
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from cycles.errors import DuplicateResource, InvalidRequest
from cycles.identifiers import is_identifier
from cycles.ledger import quotas
from cycles.models import Caps, CommitOveragePolicy
from cycles.scopes import LEVELS, parse_scope

__all__ = [
    "NamedPolicy",
    "PolicyPatch",
    "Resolved",
    "anchor_candidates",
    "check_pattern",
    "matches",
    "resolve",
]

_RANK = {"exact": 3, "suffix": 2, "prefix": 1, "level": 1, "any": 0}
RATE_WINDOW_MS = 60_000
_RATE_CLEANUP_MS = 120_000
MAX_POLICIES_PER_PATTERN = 100


class TtlOverride(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    default_ttl_ms: Annotated[int, Field(ge=1000, le=86_400_000, strict=True)] | None = None
    max_ttl_ms: Annotated[int, Field(ge=1000, le=86_400_000, strict=True)] | None = None
    max_extensions: Annotated[int, Field(ge=0, strict=True)] | None = None


class RateLimits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_reservations_per_minute: Annotated[int, Field(ge=1, strict=True)] | None = None
    max_commits_per_minute: Annotated[int, Field(ge=1, strict=True)] | None = None


Kind = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Status = Literal["ACTIVE", "DISABLED"]


class _Editable(BaseModel):
    """The fields PATCH may change (absent: unchanged; lists replace, ``[]`` clears)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None
    description: Annotated[str, StringConstraints(max_length=1024)] | None = None
    priority: Annotated[int, Field(ge=0, le=2**31 - 1, strict=True)] | None = None
    caps: Caps | None = None
    commit_overage_policy: CommitOveragePolicy | None = None
    reservation_ttl_override: TtlOverride | None = None
    rate_limits: RateLimits | None = None
    effective_from: datetime | None = None
    effective_until: datetime | None = None
    action_quotas: Annotated[list[quotas.Quota], Field(max_length=50)] | None = None
    risk_class_quotas: Annotated[list[quotas.Quota], Field(max_length=20)] | None = None
    allowed_action_kinds: Annotated[list[Kind], Field(max_length=200)] | None = None
    denied_action_kinds: Annotated[list[Kind], Field(max_length=200)] | None = None

    @field_validator("effective_from", "effective_until")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("a date-time with a time zone offset (e.g. 2026-01-01T00:00:00Z)")
        return value

    @field_validator("action_quotas")
    @classmethod
    def _kind_quotas(cls, value: list[quotas.Quota] | None) -> list[quotas.Quota] | None:
        for q in value or ():
            if q.action_kind is None:
                raise ValueError("action_quotas entries name an action_kind (risk classes go in risk_class_quotas)")
            if q.action_kind.startswith("custom."):
                quotas.risk_class_of(q.action_kind)  # undeclared custom.* kinds: 400, as the spec says
        return value

    @field_validator("risk_class_quotas")
    @classmethod
    def _risk_quotas(cls, value: list[quotas.Quota] | None) -> list[quotas.Quota] | None:
        if any(q.risk_class is None for q in value or ()):
            raise ValueError("risk_class_quotas entries name a risk_class")
        return value


class PolicyPatch(_Editable):
    """``updatePolicy`` / ``updatePolicyActionQuotas``: base fields, the v0.1.26 lists, and status."""

    status: Status | None = None


class NamedPolicy(_Editable):
    """One stored policy. ``tenant_id`` is the owner (kept, never on the wire: the spec's Policy
    schema has no such field); the v0.1.26 lists are always present (empty: no rule)."""

    policy_id: str
    tenant_id: str
    name: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    scope_pattern: str
    priority: Annotated[int, Field(ge=0, le=2**31 - 1, strict=True)] = 0
    status: Status = "ACTIVE"
    created_at: datetime
    updated_at: datetime | None = None
    action_quotas: Annotated[list[quotas.Quota], Field(max_length=50)] = Field(default_factory=list)
    risk_class_quotas: Annotated[list[quotas.Quota], Field(max_length=20)] = Field(default_factory=list)
    allowed_action_kinds: Annotated[list[Kind], Field(max_length=200)] = Field(default_factory=list)
    denied_action_kinds: Annotated[list[Kind], Field(max_length=200)] = Field(default_factory=list)

    @field_validator("tenant_id", "policy_id")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not is_identifier(value):  # both end up in storage keys (and Redis hash tags)
            raise ValueError(f"{value[:64]!r} must match ^[a-zA-Z0-9_.-]+$")
        return value

    @model_validator(mode="after")
    def _check(self) -> NamedPolicy:
        if self.allowed_action_kinds and self.denied_action_kinds:
            raise ValueError("allowed_action_kinds and denied_action_kinds are mutually exclusive")
        if self.effective_from and self.effective_until and self.effective_until <= self.effective_from:
            raise ValueError("effective_until must be after effective_from")
        if self.reservation_ttl_override is not None:
            t = self.reservation_ttl_override
            if t.default_ttl_ms is not None and t.max_ttl_ms is not None and t.default_ttl_ms > t.max_ttl_ms:
                raise ValueError("reservation_ttl_override.default_ttl_ms exceeds its max_ttl_ms")
        targets = [(q.target, q.window) for q in [*self.action_quotas, *self.risk_class_quotas]]
        if len(set(targets)) != len(targets):
            raise ValueError("two quotas of one policy count the same action kind or risk class in the same window")
        check_pattern(self.scope_pattern, self.tenant_id)
        return self

    @classmethod
    def create(cls, tenant_id: str, body: Mapping[str, Any], now: datetime) -> NamedPolicy:
        """A new policy from a ``PolicyCreateRequest`` body (tenant_id already taken out of it)."""
        return cls.model_validate(
            {**body, "policy_id": "pol_" + secrets.token_hex(12), "tenant_id": tenant_id, "created_at": now}
        )

    def patched(self, patch: PolicyPatch, now: datetime) -> tuple[NamedPolicy, list[str]]:
        """The policy after ``patch``, and the fields it changed (``policy.updated``'s changed_fields)."""
        given = patch.model_dump(exclude_unset=True)
        changed = [k for k in given if getattr(patch, k) != getattr(self, k)]
        if not changed:
            return self, []
        data = self.model_dump()
        data.update({k: getattr(patch, k) for k in changed})
        data["updated_at"] = now
        return NamedPolicy.model_validate(data), changed

    def wire(self) -> dict[str, Any]:
        """The spec's Policy (+ PolicyExtension): lists always present, absent optionals omitted."""
        out = self.model_dump(mode="json", exclude={"tenant_id"}, exclude_none=True)
        for key in ("action_quotas", "risk_class_quotas"):
            out[key] = [q.model_dump(mode="json", exclude_none=True, exclude={"scope"}) for q in getattr(self, key)]
        return out

    def in_force(self, now_ms: int) -> bool:
        if self.status != "ACTIVE":
            return False
        if self.effective_from is not None and now_ms < _ms(self.effective_from):
            return False
        return self.effective_until is None or now_ms < _ms(self.effective_until)

    def mentions(self, kind: str) -> bool:
        return (
            kind in self.allowed_action_kinds
            or kind in self.denied_action_kinds
            or any(q.action_kind == kind for q in self.action_quotas)
        )

    def scope_policy(self, anchor: str) -> quotas.ScopePolicy | None:
        """Its quota and access rules as the quota machinery's ScopePolicy at ``anchor``."""
        rules = [*self.risk_class_quotas, *self.action_quotas]
        if not (rules or self.allowed_action_kinds or self.denied_action_kinds):
            return None
        return quotas.ScopePolicy(
            scope=anchor,
            quotas=[q.model_copy(update={"scope": anchor}) for q in rules],
            allowed_action_kinds=list(self.allowed_action_kinds),
            denied_action_kinds=list(self.denied_action_kinds),
        )


def _ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


def now_utc(now_ms: int) -> datetime:
    return datetime.fromtimestamp(now_ms / 1000, UTC)


# ---- patterns -------------------------------------------------------------------------------


def _kind(pattern: str) -> str:
    if pattern == "*":
        return "any"
    if pattern.startswith("*/"):
        return "suffix"
    if pattern.endswith("/*"):
        return "prefix"
    if pattern.endswith(":*"):
        return "level"
    return "exact"


def check_pattern(pattern: str, tenant: str) -> str:
    """Raise InvalidRequest unless ``pattern`` is one of the five shapes, inside ``tenant``."""
    if not isinstance(pattern, str) or not pattern or len(pattern) > 1024:
        raise InvalidRequest(f"invalid scope_pattern {pattern!r}")
    kind = _kind(pattern)
    if kind == "level":
        level = pattern[:-2]
        if level not in LEVELS:
            raise InvalidRequest(f"invalid scope_pattern {pattern!r}: level must be one of {', '.join(LEVELS)}")
        return pattern
    if kind == "any":
        return pattern
    literal = {"suffix": pattern[2:], "prefix": pattern[:-2], "exact": pattern}[kind]
    try:
        pairs = parse_scope(literal)
    except InvalidRequest:
        raise InvalidRequest(
            f"invalid scope_pattern {pattern!r}: expected 'tenant:acme/...', 'tenant:acme/.../*', "
            "'agent:*', '*/agent:name' or '*'"
        ) from None
    if kind == "suffix":
        if len(pairs) != 1:
            raise InvalidRequest(f"invalid scope_pattern {pattern!r}: '*/' is followed by one level:value")
        if pairs[0][0] == "tenant" and pairs[0][1] != tenant:
            raise InvalidRequest(f"scope_pattern {pattern!r} names another tenant than {tenant}")
        return pattern
    if pairs[0] != ("tenant", tenant):
        raise InvalidRequest(f"scope_pattern {pattern!r} must start with tenant:{tenant} (the policy's tenant)")
    return pattern


def anchor_candidates(scopes: Sequence[str]) -> dict[str, tuple[str, int]]:
    """Every pattern that can match a scope of this path -> (its anchor scope, the anchor's depth).

    O(depth) patterns: per scope its exact id, ``level:*``, ``*/level:value``, ``scope/*`` for
    every scope but the last, and ``*``; the deepest match of a pattern is its anchor."""
    out: dict[str, tuple[str, int]] = {"*": (scopes[0], 1)} if scopes else {}
    last = len(scopes) - 1
    for depth, scope in enumerate(scopes, 1):
        leaf = scope.rsplit("/", 1)[-1]
        out[scope] = (scope, depth)
        out[leaf.split(":", 1)[0] + ":*"] = (scope, depth)
        out["*/" + leaf] = (scope, depth)
        if depth - 1 < last:
            out[scope + "/*"] = (scope, depth)
    return out


def matches(pattern: str, tenant: str, scopes: Sequence[str]) -> str | None:
    """The anchor at which ``pattern`` (a policy of ``tenant``) matches this path, or None.
    The reference definition the index must agree with (tests compare the two)."""
    if not scopes or scopes[0] != f"tenant:{tenant}":
        return None
    kind = _kind(pattern)
    found = None
    for i, scope in enumerate(scopes):
        leaf = scope.rsplit("/", 1)[-1]
        if (
            kind == "any"
            or (kind == "exact" and scope == pattern)
            or (kind == "level" and leaf.split(":", 1)[0] == pattern[:-2])
            or (kind == "suffix" and leaf == pattern[2:])
            or (kind == "prefix" and scope == pattern[:-2] and i < len(scopes) - 1)
        ):
            found = scopes[0] if kind == "any" else scope
    return found


# ---- storage: an index by pattern ------------------------------------------------------------
# Every backend keeps, per tenant, one entry per pattern holding the JSON list of that pattern's
# policies (memory/SQLite: meta key "npat|<tenant>|<pattern>"; Redis: field "pat|<pattern>" of the
# tenant's policy hash), and where each policy id lives ("npid|<id>" -> "<tenant>|<pattern>").


def index_key(tenant: str, pattern: str) -> str:
    return f"npat|{tenant}|{pattern}"


def id_key(policy_id: str) -> str:
    return f"npid|{policy_id}"


@functools.lru_cache(maxsize=2048)
def load_list(text: str) -> tuple[NamedPolicy, ...]:
    """One pattern's stored policies (cached by text: the reserve path reads them on every call)."""
    return tuple(NamedPolicy.model_validate(d) for d in json.loads(text))


def dump_list(items: Iterable[NamedPolicy]) -> str | None:
    docs = [p.model_dump(mode="json", exclude_none=True) for p in items]
    return json.dumps(docs, separators=(",", ":")) if docs else None


def put_in_list(text: str | None, policy: NamedPolicy) -> str:
    """The pattern's list with ``policy`` added or replaced (by id)."""
    items = [p for p in (load_list(text) if text else ()) if p.policy_id != policy.policy_id]
    if len(items) >= MAX_POLICIES_PER_PATTERN:
        raise InvalidRequest(f"a tenant holds at most {MAX_POLICIES_PER_PATTERN} policies per scope_pattern")
    return dump_list([*items, policy]) or ""


# ---- evaluation -----------------------------------------------------------------------------


@dataclass(slots=True)
class Resolved:
    """What the policies in force give one reservation."""

    entries: list[tuple[str, quotas.ScopePolicy]] = field(default_factory=list)  # quota/access, in precedence order
    caps: Caps | None = None
    overage: CommitOveragePolicy | None = None
    max_ttl_ms: int | None = None
    rate: tuple[str, int] | None = None  # (anchor, max reservations per minute)

    def ttl(self, requested: int) -> int:
        """``max_ttl_ms``: "requests exceeding this are capped"."""
        return requested if self.max_ttl_ms is None else min(requested, self.max_ttl_ms)


NO_POLICIES = Resolved()


def resolve(
    found: Mapping[str, str | None],
    scope_policies: Mapping[str, quotas.ScopePolicy],
    scopes: Sequence[str],
    now_ms: int,
) -> Resolved:
    """Rank the named policies ``found`` (pattern -> stored list text, as the candidates' lookup
    returned them) and the per-scope policies of the path; the first of each aspect decides."""
    candidates = anchor_candidates(scopes) if found else {}
    ranked: list[tuple[tuple[int, int, int], str, str, quotas.ScopePolicy | NamedPolicy]] = []
    for pattern, text in found.items():
        if not text or pattern not in candidates:
            continue
        anchor, depth = candidates[pattern]
        for named in load_list(text):
            if named.in_force(now_ms):
                ranked.append(((-named.priority, -depth, -_RANK[_kind(pattern)]), named.policy_id, anchor, named))
    for depth, scope in enumerate(scopes, 1):
        if scope in scope_policies:  # cy.quotas: a priority-0 exact pattern on its scope
            ranked.append(((0, -depth, -_RANK["exact"]), "~" + scope, scope, scope_policies[scope]))
    if not ranked:
        return NO_POLICIES
    ranked.sort(key=lambda r: (r[0], r[1]))
    out = Resolved()
    for _, _, anchor, p in ranked:
        if isinstance(p, quotas.ScopePolicy):
            out.entries.append((anchor, p))
            continue
        rules = p.scope_policy(anchor)
        if rules is not None:
            out.entries.append((anchor, rules))
        if out.caps is None and p.caps is not None and not p.caps.is_empty():
            out.caps = p.caps
        if out.overage is None:
            out.overage = p.commit_overage_policy
        ttl = p.reservation_ttl_override
        if out.max_ttl_ms is None and ttl is not None:
            out.max_ttl_ms = ttl.max_ttl_ms
        if out.rate is None and p.rate_limits is not None and p.rate_limits.max_reservations_per_minute:
            out.rate = (anchor, p.rate_limits.max_reservations_per_minute)
    return out


def rate_counter(resolved: Resolved, kind: str, now_ms: int) -> quotas.Counter | None:
    """The reservation rate limit as one more counter: reservations created at the anchor this
    minute (UTC), checked and incremented with the quotas, never given back."""
    if resolved.rate is None:
        return None
    anchor, limit = resolved.rate
    return _rate_counter(anchor, limit, kind, now_ms // RATE_WINDOW_MS)


@functools.lru_cache(maxsize=1024)
def _rate_counter(anchor: str, limit: int, kind: str, bucket: int) -> quotas.Counter:
    """One per (anchor, limit, kind, minute): the hot path builds it once a minute, not per call."""
    label = now_utc(bucket * RATE_WINDOW_MS).strftime("%Y-%m-%dT%H:%M")
    # constructed, not validated: a rate limit is no quota (it may exceed a quota's max_calls bound)
    q = quotas.Quota.model_construct(action_kind=kind, max_calls=limit, window="per_minute_tumbling", scope=anchor)
    key = f"{anchor}|__rate__:reserve|per_minute_tumbling|{bucket}"
    return quotas.Counter(key, limit, _RATE_CLEANUP_MS, False, q, anchor, label, kind, rate=True)


def valid_policy_id(policy_id: str) -> bool:
    return is_identifier(policy_id) and policy_id.startswith("pol_")


def check_unique_name(existing: Iterable[NamedPolicy], policy: NamedPolicy) -> None:
    for p in existing:
        if p.name == policy.name and p.policy_id != policy.policy_id:
            raise DuplicateResource(
                f"tenant {policy.tenant_id} already has a policy named {policy.name!r} ({p.policy_id})",
                details={"policy_id": p.policy_id, "name": policy.name},
            )
