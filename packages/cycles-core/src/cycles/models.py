"""Wire models of the Cycles protocol v0 (``shared/spec/cycles-protocol-v0.yaml``).

Every schema the runtime plane sends or receives has a pydantic model here, with the spec's
constraints (lengths, minimums, ``additionalProperties: false``). Responses are emitted with
``exclude_none`` so optional fields the spec says MUST be absent really are absent.

Amounts are integers in a unit. ``usd(0.05)`` is 5,000,000 ``USD_MICROCENTS`` (1 USD = 10^8).
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from cycles.identifiers import IDENTIFIER_MAX, IDENTIFIER_PATTERN, check_finite_json

__all__ = [
    "Action",
    "Amount",
    "Balance",
    "BalanceResponse",
    "Budget",
    "Caps",
    "CommitOveragePolicy",
    "CommitRequest",
    "CommitResponse",
    "Decision",
    "DecisionRequest",
    "DecisionResponse",
    "ErrorResponse",
    "EventCreateRequest",
    "EventCreateResponse",
    "ReleaseRequest",
    "ReleaseResponse",
    "ReservationCreateRequest",
    "ReservationCreateResponse",
    "ReservationDetail",
    "ReservationExtendRequest",
    "ReservationExtendResponse",
    "ReservationListResponse",
    "ReservationStatus",
    "ReservationSummary",
    "SignedAmount",
    "StandardMetrics",
    "Subject",
    "Unit",
    "credits",
    "risk_points",
    "tokens",
    "usd",
]

INT64_MAX = 2**63 - 1
MICROCENTS_PER_USD = 100_000_000

IdempotencyKey = Annotated[str, StringConstraints(min_length=1, max_length=256)]
# Scope ids use ":" and "/" as delimiters, so subject levels keep to the spec's portable charset
# (checked once, in cycles.identifiers).
SubjectField = Annotated[str, StringConstraints(min_length=1, max_length=IDENTIFIER_MAX, pattern=IDENTIFIER_PATTERN)]
#: Free-form JSON maps: finite numbers only (NaN/Infinity would be stored as null).
JsonMap = Annotated[dict[str, Any], AfterValidator(check_finite_json)]


class Unit(StrEnum):
    USD_MICROCENTS = "USD_MICROCENTS"
    TOKENS = "TOKENS"
    CREDITS = "CREDITS"
    RISK_POINTS = "RISK_POINTS"


class Decision(StrEnum):
    ALLOW = "ALLOW"
    ALLOW_WITH_CAPS = "ALLOW_WITH_CAPS"
    DENY = "DENY"


class CommitOveragePolicy(StrEnum):
    REJECT = "REJECT"
    ALLOW_IF_AVAILABLE = "ALLOW_IF_AVAILABLE"
    ALLOW_WITH_OVERDRAFT = "ALLOW_WITH_OVERDRAFT"


class ReservationStatus(StrEnum):
    ACTIVE = "ACTIVE"
    COMMITTED = "COMMITTED"
    RELEASED = "RELEASED"
    EXPIRED = "EXPIRED"


class _Wire(BaseModel):
    """Base of every wire model: unknown fields are errors, as ``additionalProperties: false``.

    Assignments are validated too: ``subject.workflow = "run 42/x"`` raises, as the constructor
    would, so a value no check saw can never reach a scope, a key or a stored row."""

    model_config = ConfigDict(extra="forbid", frozen=False, use_enum_values=False, validate_assignment=True)

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


class Amount(_Wire):
    model_config = ConfigDict(extra="forbid", frozen=True)

    unit: Unit
    amount: Annotated[int, Field(ge=0, le=INT64_MAX, strict=True)]

    def __add__(self, other: Amount) -> Amount:
        _same_unit(self, other)
        return Amount.model_construct(unit=self.unit, amount=self.amount + other.amount)

    def __sub__(self, other: Amount) -> Amount:
        _same_unit(self, other)
        return Amount.model_construct(unit=self.unit, amount=max(0, self.amount - other.amount))

    def __str__(self) -> str:
        return format_amount(self.unit, self.amount)


class SignedAmount(_Wire):
    model_config = ConfigDict(extra="forbid", frozen=True)

    unit: Unit
    amount: Annotated[int, Field(ge=-INT64_MAX, le=INT64_MAX, strict=True)]

    def __str__(self) -> str:
        return format_amount(self.unit, self.amount)


def _same_unit(a: Amount, b: Amount) -> None:
    if a.unit != b.unit:
        raise ValueError(f"cannot combine {a.unit.value} with {b.unit.value}")


def format_amount(unit: Unit, amount: int) -> str:
    """Human form of an amount: ``$0.0310`` for USD, ``1,200 tokens`` otherwise."""
    if unit is Unit.USD_MICROCENTS:
        usd_value = Decimal(amount) / MICROCENTS_PER_USD
        return f"-${-usd_value:,.4f}" if amount < 0 else f"${usd_value:,.4f}"
    label = {Unit.TOKENS: "tokens", Unit.CREDITS: "credits", Unit.RISK_POINTS: "risk points"}[unit]
    return f"{amount:,} {label}"


def _integral(value: int | float | str | Decimal, scale: int, what: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a number, not a bool")
    number = Decimal(str(value)) if isinstance(value, float) else Decimal(value)
    if not number.is_finite():
        raise ValueError(f"{what} must be finite, got {value!r}")
    if number < 0:
        raise ValueError(f"{what} must not be negative, got {value!r}")
    # Sub-microcent fractions round half-up: an estimate is never silently shaved to zero.
    return int((number * scale).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def usd(dollars: int | float | str | Decimal) -> Amount:
    """``usd(0.05)`` -> 5,000,000 USD_MICROCENTS. Floats go through ``str`` so 0.1 stays 0.1."""
    return Amount(unit=Unit.USD_MICROCENTS, amount=_integral(dollars, MICROCENTS_PER_USD, "usd"))


def tokens(count: int) -> Amount:
    return Amount(unit=Unit.TOKENS, amount=count)


def credits(count: int) -> Amount:
    return Amount(unit=Unit.CREDITS, amount=count)


def risk_points(count: int) -> Amount:
    return Amount(unit=Unit.RISK_POINTS, amount=count)


class Subject(_Wire):
    """Who is spending: tenant -> workspace -> app -> workflow -> agent -> toolset, plus free dimensions."""

    tenant: SubjectField | None = None
    workspace: SubjectField | None = None
    app: SubjectField | None = None
    workflow: SubjectField | None = None
    agent: SubjectField | None = None
    toolset: SubjectField | None = None
    dimensions: Annotated[dict[str, Annotated[str, StringConstraints(max_length=256)]], Field(max_length=16)] | None = (
        None
    )

    @model_validator(mode="after")
    def _needs_a_standard_field(self) -> Subject:
        if not any((self.tenant, self.workspace, self.app, self.workflow, self.agent, self.toolset)):
            raise ValueError("subject needs at least one of tenant, workspace, app, workflow, agent, toolset")
        return self

    def merged(self, **levels: str | None) -> Subject:
        """A copy with some levels replaced (``None`` values leave a level as it is)."""
        data = self.model_dump(exclude_none=True)
        data.update({k: v for k, v in levels.items() if v is not None})
        return Subject.model_validate(data)


class Action(_Wire):
    """What is being done: ``Action("llm.completion", "openai:gpt-4o")``."""

    kind: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    name: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    tags: Annotated[list[Annotated[str, StringConstraints(max_length=64)]], Field(max_length=10)] | None = None
    #: v0.1.26 ActionPolicyKeys (host, recipient_domain, resource_type, path_prefix, custom): routing
    #: keys for quota allowlists. Optional, additive.
    policy_keys: dict[str, Any] | None = None

    def __init__(self, kind: str | None = None, name: str | None = None, /, **data: Any) -> None:
        if kind is not None:
            data["kind"] = kind
        if name is not None:
            data["name"] = name
        super().__init__(**data)

    @property
    def is_tool(self) -> bool:
        return self.kind.startswith("tool")


class Caps(_Wire):
    """Soft-landing constraints (ALLOW_WITH_CAPS). Allowlist wins over denylist, names match exactly."""

    max_tokens: Annotated[int, Field(ge=0)] | None = None
    max_steps_remaining: Annotated[int, Field(ge=0)] | None = None
    tool_allowlist: list[Annotated[str, StringConstraints(max_length=256)]] | None = None
    tool_denylist: list[Annotated[str, StringConstraints(max_length=256)]] | None = None
    cooldown_ms: Annotated[int, Field(ge=0)] | None = None

    def allows_tool(self, name: str) -> bool:
        if self.tool_allowlist:
            return name in self.tool_allowlist
        if self.tool_denylist:
            return name not in self.tool_denylist
        return True

    def is_empty(self) -> bool:
        return not any(
            v is not None and v != []
            for v in (
                self.max_tokens,
                self.max_steps_remaining,
                self.tool_allowlist,
                self.tool_denylist,
                self.cooldown_ms,
            )
        )


class StandardMetrics(_Wire):
    tokens_input: Annotated[int, Field(ge=0)] | None = None
    tokens_output: Annotated[int, Field(ge=0)] | None = None
    latency_ms: Annotated[int, Field(ge=0)] | None = None
    model_version: Annotated[str, StringConstraints(max_length=128)] | None = None
    custom: JsonMap | None = None


# ---- requests -------------------------------------------------------------------------------


class DecisionRequest(_Wire):
    idempotency_key: IdempotencyKey
    subject: Subject
    action: Action
    estimate: Amount
    metadata: JsonMap | None = None


class ReservationCreateRequest(_Wire):
    idempotency_key: IdempotencyKey
    subject: Subject
    action: Action
    estimate: Amount
    ttl_ms: Annotated[int, Field(ge=1000, le=86_400_000)] = 60_000
    grace_period_ms: Annotated[int, Field(ge=0, le=60_000)] = 5_000
    overage_policy: CommitOveragePolicy = CommitOveragePolicy.ALLOW_IF_AVAILABLE
    dry_run: bool = False
    metadata: JsonMap | None = None
    #: v0.1.26: OBSERVE evaluates with dry-run semantics and records an observed_denied/allowed event;
    #: absent, the tenant's observe_mode governs (ENFORCE by default). DISABLED means ENFORCE.
    observe_mode: Literal["DISABLED", "OBSERVE", "ENFORCE"] | None = None


class CommitRequest(_Wire):
    idempotency_key: IdempotencyKey
    actual: Amount
    metrics: StandardMetrics | None = None
    metadata: JsonMap | None = None


class ReleaseRequest(_Wire):
    idempotency_key: IdempotencyKey
    reason: Annotated[str, StringConstraints(max_length=256)] | None = None


class ReservationExtendRequest(_Wire):
    idempotency_key: IdempotencyKey
    extend_by_ms: Annotated[int, Field(ge=1, le=86_400_000)]
    metadata: JsonMap | None = None


class EventCreateRequest(_Wire):
    idempotency_key: IdempotencyKey
    subject: Subject
    action: Action
    actual: Amount
    overage_policy: CommitOveragePolicy = CommitOveragePolicy.ALLOW_IF_AVAILABLE
    metrics: StandardMetrics | None = None
    client_time_ms: Annotated[int, Field(ge=0)] | None = None
    metadata: JsonMap | None = None


# ---- responses ------------------------------------------------------------------------------


class Balance(_Wire):
    """Ledger state of one (scope, unit). ``remaining = allocated - spent - reserved - debt``."""

    scope: str
    scope_path: str
    remaining: SignedAmount
    reserved: Amount | None = None
    spent: Amount | None = None
    debt: Amount | None = None
    allocated: Amount | None = None
    overdraft_limit: Amount | None = None
    is_over_limit: bool | None = None
    # Recurring budgets only, and only on the operator plane (protocol v0's Balance has no such
    # fields): the current period, ISO 8601 UTC.
    period_start: str | None = None
    period_end: str | None = None

    def invariant_holds(self) -> bool:
        parts = (self.allocated, self.spent, self.reserved, self.debt)
        if any(p is None for p in parts):
            return True
        a, s, r, d = (p.amount for p in parts if p is not None)
        return self.remaining.amount == a - s - r - d


class Budget(Balance):
    """A budget as the operator plane shows it: its Balance plus its status and caps.

    Not a protocol v0 schema (v0 leaves administration out): ``budgets.get/list/set/fund/freeze``
    return it, the runtime plane's Balance snapshots never carry these two fields.
    """

    status: Literal["ACTIVE", "FROZEN", "CLOSED"] | None = None
    caps: Caps | None = None


class DecisionResponse(_Wire):
    decision: Decision
    caps: Caps | None = None
    reason_code: Annotated[str, StringConstraints(max_length=128)] | None = None
    retry_after_ms: Annotated[int, Field(ge=0)] | None = None
    affected_scopes: list[str] | None = None
    deny_detail: dict[str, Any] | None = None  # v0.1.26 DenyDetail, on DENY


class ReservationCreateResponse(_Wire):
    decision: Decision
    reservation_id: str | None = None
    reserved: Amount | None = None
    expires_at_ms: Annotated[int, Field(ge=0)] | None = None
    remaining_ttl_ms: Annotated[int, Field(ge=0)] | None = None
    scope_path: str | None = None
    affected_scopes: list[str]
    caps: Caps | None = None
    balances: list[Balance] | None = None
    reason_code: Annotated[str, StringConstraints(max_length=128)] | None = None
    retry_after_ms: Annotated[int, Field(ge=0)] | None = None
    deny_detail: dict[str, Any] | None = None  # v0.1.26 DenyDetail, on a dry-run DENY


class CommitResponse(_Wire):
    status: Literal["COMMITTED"] = "COMMITTED"
    charged: Amount
    released: Amount | None = None
    balances: list[Balance] | None = None


class ReleaseResponse(_Wire):
    status: Literal["RELEASED"] = "RELEASED"
    released: Amount
    balances: list[Balance] | None = None


class ReservationExtendResponse(_Wire):
    status: Literal["ACTIVE"] = "ACTIVE"
    expires_at_ms: Annotated[int, Field(ge=0)]
    remaining_ttl_ms: Annotated[int, Field(ge=0)] | None = None
    balances: list[Balance] | None = None


class EventCreateResponse(_Wire):
    status: Literal["APPLIED"] = "APPLIED"
    event_id: str
    charged: Amount | None = None
    balances: list[Balance] | None = None


class ReservationSummary(_Wire):
    reservation_id: str
    status: ReservationStatus
    idempotency_key: IdempotencyKey | None = None
    subject: Subject
    action: Action
    reserved: Amount
    created_at_ms: Annotated[int, Field(ge=0)]
    expires_at_ms: Annotated[int, Field(ge=0)]
    finalized_at_ms: Annotated[int, Field(ge=0)] | None = None
    scope_path: str
    affected_scopes: list[str]
    committed: Amount | None = None
    metadata: JsonMap | None = None
    committed_metadata: JsonMap | None = None


class ReservationDetail(ReservationSummary):
    pass


class ReservationListResponse(_Wire):
    reservations: list[ReservationSummary]
    next_cursor: str | None = None
    has_more: bool | None = None


class BalanceResponse(_Wire):
    balances: list[Balance]
    next_cursor: str | None = None
    has_more: bool | None = None


class ErrorResponse(_Wire):
    error: str
    message: str
    request_id: str
    trace_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")] | None = None
    details: dict[str, Any] | None = None


# ---- trusted construction -------------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)
_DEFAULTS: dict[type[BaseModel], dict[str, Any]] = {}
_set = object.__setattr__


def trusted(cls: type[M], **values: Any) -> M:
    """Build a wire model from values the library computed itself, skipping validation.

    ``model_construct`` does the same but walks every field's aliases on each call; on the guard's
    hot path that was 40% of a reserve+commit. Our models have no aliases, no extras and no
    post-init, so this sets what ``model_construct`` would set: ``__dict__`` (with defaults for the
    fields not given), ``__pydantic_fields_set__``, ``__pydantic_extra__``, ``__pydantic_private__``.
    Never use it for input from outside the process.
    """
    defaults = _DEFAULTS.get(cls)
    if defaults is None:
        defaults = _DEFAULTS[cls] = {
            name: field.get_default(call_default_factory=True)
            for name, field in cls.model_fields.items()
            if not field.is_required()
        }
    model = cls.__new__(cls)
    _set(model, "__dict__", {**defaults, **values})
    _set(model, "__pydantic_fields_set__", set(values))
    _set(model, "__pydantic_extra__", None)
    _set(model, "__pydantic_private__", None)
    return model
