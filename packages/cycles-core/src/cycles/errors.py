"""One exception per protocol error code, named after it.

``error_for(code, message)`` turns a wire error (or a ledger's own verdict) into the matching class,
so ``except BudgetExceeded`` works the same on every backend. ``Denied`` marks the outcomes that
mean "this action must not run"; adapters catch that one base.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

__all__ = [
    "ActionKindDenied",
    "ActionKindNotAllowed",
    "ActionQuotaExceeded",
    "ADMIN_ERROR_CODES",
    "BudgetClosed",
    "BudgetExceeded",
    "BudgetFrozen",
    "BudgetInUse",
    "BudgetNotFound",
    "CountMismatch",
    "CyclesError",
    "DebtOutstanding",
    "Denied",
    "DuplicateResource",
    "EventNotFound",
    "Forbidden",
    "IdempotencyMismatch",
    "InsufficientPermissions",
    "InternalError",
    "InvalidRequest",
    "KeyExpired",
    "KeyRevoked",
    "LedgerUnavailable",
    "LimitExceeded",
    "LoopDetected",
    "MaxExtensionsExceeded",
    "NotFound",
    "OverdraftLimitExceeded",
    "PriorityHeadroomExceeded",
    "ReservationExpired",
    "ReservationFinalized",
    "TenantClosed",
    "TenantNotFound",
    "TenantSuspended",
    "ToolNotAllowed",
    "Unauthorized",
    "UnitMismatch",
    "UnpricedModel",
    "deny_detail_of",
    "WebhookNotFound",
    "WebhookUrlInvalid",
    "describe_validation_error",
    "error_for",
]


class CyclesError(Exception):
    """Base of every Cycles error. ``code`` is the protocol ErrorCode, ``http_status`` its status."""

    code: ClassVar[str] = "INTERNAL_ERROR"
    http_status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str = "",
        *,
        details: dict[str, Any] | None = None,
        request_id: str | None = None,
        trace_id: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        self.details: dict[str, Any] = dict(details or {})
        self.request_id = request_id
        self.trace_id = trace_id
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, details={self.details!r})"


class Denied(CyclesError, RuntimeError):
    """The action must not run: a budget or policy said no before it happened.

    Also a RuntimeError, so retry machinery that retries "unknown" errors but not RuntimeError
    (LangGraph's default RetryPolicy, for one) does not hammer a budget that already said no.
    """

    http_status = 409

    @property
    def reason_code(self) -> str:
        return self.code

    @property
    def scope(self) -> str | None:
        value = self.details.get("scope")
        return value if isinstance(value, str) else None

    @property
    def deny_detail(self) -> dict[str, Any]:
        """The v0.1.26 DenyDetail: which scope or rule said no, by how much, and what to change."""
        return deny_detail_of(self.code, self.details)

    @property
    def suggested_fix(self) -> str | None:
        fix = self.deny_detail.get("suggested_fix")
        return fix if isinstance(fix, str) else None


class InvalidRequest(CyclesError, ValueError):
    code = "INVALID_REQUEST"
    http_status = 400


class Unauthorized(CyclesError):
    code = "UNAUTHORIZED"
    http_status = 401


class Forbidden(CyclesError):
    code = "FORBIDDEN"
    http_status = 403


class NotFound(CyclesError):
    code = "NOT_FOUND"
    http_status = 404


class BudgetExceeded(Denied):
    code = "BUDGET_EXCEEDED"


class BudgetFrozen(Denied):
    code = "BUDGET_FROZEN"


class BudgetClosed(Denied):
    code = "BUDGET_CLOSED"


class OverdraftLimitExceeded(Denied):
    code = "OVERDRAFT_LIMIT_EXCEEDED"


class DebtOutstanding(Denied):
    code = "DEBT_OUTSTANDING"


class TenantClosed(Denied):
    code = "TENANT_CLOSED"


class PriorityHeadroomExceeded(BudgetExceeded):
    """A prioritised reservation would dip into the headroom its budget keeps for higher
    priorities (e.g. ``low`` once less than half remains). On the wire: BUDGET_EXCEEDED with
    ``details.deny_detail.reason_code`` = PRIORITY_HEADROOM."""

    @property
    def reason_code(self) -> str:
        return "PRIORITY_HEADROOM"


class ActionQuotaExceeded(Denied):
    """A count quota (per action kind or per risk class) is used up in its window."""

    code = "ACTION_QUOTA_EXCEEDED"


class LoopDetected(ActionQuotaExceeded):
    """The same action with the same arguments fingerprint repeated past the scope's loop guard.
    On the wire: ACTION_QUOTA_EXCEEDED with ``details.deny_detail.reason_code`` = LOOP_DETECTED."""

    @property
    def reason_code(self) -> str:
        return "LOOP_DETECTED"


class ActionKindNotAllowed(Denied):
    """The scope has an allowlist of action kinds and this kind is not on it."""

    code = "ACTION_KIND_NOT_ALLOWED"


class ActionKindDenied(Denied):
    """The scope's denylist of action kinds names this kind."""

    code = "ACTION_KIND_DENIED"


class ReservationExpired(CyclesError):
    code = "RESERVATION_EXPIRED"
    http_status = 410


class ReservationFinalized(CyclesError):
    code = "RESERVATION_FINALIZED"
    http_status = 409


class IdempotencyMismatch(CyclesError):
    code = "IDEMPOTENCY_MISMATCH"
    http_status = 409


class UnitMismatch(CyclesError):
    code = "UNIT_MISMATCH"
    http_status = 400


class MaxExtensionsExceeded(CyclesError):
    code = "MAX_EXTENSIONS_EXCEEDED"
    http_status = 409


class LimitExceeded(CyclesError):
    """HTTP 429: the server is throttling; retry after ``retry_after_s``."""

    code = "LIMIT_EXCEEDED"
    http_status = 429
    retryable = True


class InternalError(CyclesError):
    code = "INTERNAL_ERROR"
    http_status = 500
    retryable = True


class LedgerUnavailable(CyclesError):
    """The ledger could not be reached or did not answer (connection loss, timeout, BUSY/LOADING).

    Not a protocol code: the outcome of the operation is unknown, so it is safe to retry with the
    same idempotency key and unsafe to assume it did not happen.
    """

    code = "INTERNAL_ERROR"
    http_status = 503
    retryable = True

    def __str__(self) -> str:
        # The wire says INTERNAL_ERROR (protocol v0 has no code for this); people read what happened.
        return f"LEDGER_UNAVAILABLE: {self.message}"


class ToolNotAllowed(Denied):
    """Client-side enforcement of Caps: the tool is not on the allowlist, or is on the denylist."""

    code = "TOOL_NOT_ALLOWED"


class UnpricedModel(CyclesError):
    """No price is known for a model and no fallback is configured (see ``cycles.pricing``)."""

    code = "INVALID_REQUEST"
    http_status = 400


# ---- the governance (admin) plane's codes (cycles-governance-admin ErrorCode) --------------


class TenantNotFound(NotFound):
    code = "TENANT_NOT_FOUND"


class TenantSuspended(CyclesError):
    code = "TENANT_SUSPENDED"
    http_status = 409


class DuplicateResource(CyclesError):
    code = "DUPLICATE_RESOURCE"
    http_status = 409


class InsufficientPermissions(Forbidden):
    code = "INSUFFICIENT_PERMISSIONS"


class KeyRevoked(Unauthorized):
    code = "KEY_REVOKED"


class KeyExpired(Unauthorized):
    code = "KEY_EXPIRED"


class BudgetNotFound(NotFound):
    code = "BUDGET_NOT_FOUND"


class EventNotFound(NotFound):
    code = "EVENT_NOT_FOUND"


class WebhookNotFound(NotFound):
    code = "WEBHOOK_NOT_FOUND"


class WebhookUrlInvalid(InvalidRequest):
    code = "WEBHOOK_URL_INVALID"


class CountMismatch(CyclesError):
    code = "COUNT_MISMATCH"
    http_status = 409


class BudgetInUse(CyclesError):
    """A budget cannot be deleted while reservations hold amounts on it (a Cycles extension code:
    the governance spec has no budget delete; it is the one ``cycles serve`` adds for it)."""

    code = "BUDGET_IN_USE"
    http_status = 409


_ADMIN_ERRORS: tuple[type[CyclesError], ...] = (
    CountMismatch,
    BudgetInUse,
    TenantNotFound,
    TenantSuspended,
    DuplicateResource,
    InsufficientPermissions,
    KeyRevoked,
    KeyExpired,
    BudgetNotFound,
    EventNotFound,
    WebhookNotFound,
    WebhookUrlInvalid,
)
#: Codes only the governance plane's responses carry (its ErrorCode enum adds them to protocol v0's).
ADMIN_ERROR_CODES: tuple[str, ...] = tuple(cls.code for cls in _ADMIN_ERRORS)

_BY_CODE: dict[str, type[CyclesError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        BudgetExceeded,
        BudgetFrozen,
        BudgetClosed,
        ReservationExpired,
        ReservationFinalized,
        IdempotencyMismatch,
        UnitMismatch,
        OverdraftLimitExceeded,
        DebtOutstanding,
        MaxExtensionsExceeded,
        LimitExceeded,
        TenantClosed,
        InternalError,
        ActionQuotaExceeded,
        ActionKindNotAllowed,
        ActionKindDenied,
    )
}

PROTOCOL_ERROR_CODES: tuple[str, ...] = tuple(_BY_CODE)
_BY_CODE.update({cls.code: cls for cls in _ADMIN_ERRORS})


def deny_detail_of(code: str, details: Mapping[str, Any]) -> dict[str, Any]:
    """The DenyDetail of a denial (``code`` and its ``details``): the one the ledger attached, else
    one built from the details every backend gives for the base-spec codes."""
    given = details.get("deny_detail")
    if isinstance(given, dict) and given.get("reason_code"):
        return dict(given)
    reason = "BUDGET_NOT_FOUND" if code == "NOT_FOUND" else code
    detail: dict[str, Any] = {"reason_code": reason}
    scope = details.get("scope")
    if isinstance(scope, str):
        detail["blocked_by_scope"] = scope
    where = scope if isinstance(scope, str) else "the scope"
    unit = details.get("unit") or "units"
    fix: str | None = None
    if code == "BUDGET_EXCEEDED":
        remaining, requested = details.get("remaining"), details.get("requested")
        if isinstance(remaining, int):
            detail["budget_remaining"] = remaining
        if isinstance(remaining, int) and isinstance(requested, int):
            fix = f"Fund {where} by at least {requested - remaining} {unit}, or reserve at most {max(0, remaining)}"
    elif code == "DEBT_OUTSTANDING":
        fix = f"Repay the debt of {details.get('debt')} on {where} (fund it) before new reservations"
    elif code == "OVERDRAFT_LIMIT_EXCEEDED":
        fix = f"Fund {where} until its debt is within the overdraft limit of {details.get('overdraft_limit')}"
    elif code == "BUDGET_FROZEN":
        fix = f"Unfreeze {where} (cycles budget unfreeze {where})"
    elif code == "BUDGET_CLOSED":
        fix = f"{where} is closed for good: budget this work under another scope"
    elif reason == "BUDGET_NOT_FOUND":
        scopes = details.get("scopes")
        target = scopes[-1] if isinstance(scopes, list) and scopes else where
        fix = f"Create a budget for {target} or one of its parent scopes"
    elif code == "TENANT_CLOSED":
        fix = "The tenant is closed"
    if fix:
        detail["suggested_fix"] = fix[:512]
    return detail


def error_for(code: str, message: str = "", **kwargs: Any) -> CyclesError:
    """The exception for a protocol error code; unknown codes become a plain ``CyclesError``."""
    cls = _BY_CODE.get(code)
    detail = (kwargs.get("details") or {}).get("deny_detail")
    if cls is BudgetExceeded and isinstance(detail, dict) and detail.get("reason_code") == "PRIORITY_HEADROOM":
        cls = PriorityHeadroomExceeded
    if cls is ActionQuotaExceeded and isinstance(detail, dict) and detail.get("reason_code") == "LOOP_DETECTED":
        cls = LoopDetected
    if cls is None:
        err = CyclesError(message, **kwargs)
        err.code = code  # type: ignore[misc]  # keep an unknown server code visible to the caller
        return err
    return cls(message, **kwargs)


def describe_validation_error(exc: Exception, limit: int = 5) -> str:
    """A one-line, human message for a pydantic ValidationError: ``field.path: problem; ...``.

    Input values are not echoed (they may be huge or sensitive); at most ``limit`` problems are named.
    """
    errors = getattr(exc, "errors", None)
    if errors is None:
        return str(exc)
    parts = []
    items = errors(include_url=False, include_context=False, include_input=False)
    for item in items[:limit]:
        loc = ".".join(str(p) for p in item.get("loc", ())) or "body"
        parts.append(f"{loc}: {item.get('msg', 'invalid')}")
    more = len(items) - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "invalid request: " + "; ".join(parts)
