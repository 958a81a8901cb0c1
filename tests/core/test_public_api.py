"""The public surface is what we mean it to be (httpx's test_exported_members pattern)."""

from __future__ import annotations

import cycles
from cycles import errors


def test_all_names_exist_and_nothing_private_is_exported() -> None:
    for name in cycles.__all__:
        assert hasattr(cycles, name), name
        assert not name.startswith("_") or name == "__version__"


def test_every_protocol_error_code_has_an_exception_named_after_it() -> None:
    spec_codes = {
        "INVALID_REQUEST", "UNAUTHORIZED", "FORBIDDEN", "NOT_FOUND", "BUDGET_EXCEEDED", "BUDGET_FROZEN",
        "BUDGET_CLOSED", "RESERVATION_EXPIRED", "RESERVATION_FINALIZED", "IDEMPOTENCY_MISMATCH", "UNIT_MISMATCH",
        "OVERDRAFT_LIMIT_EXCEEDED", "DEBT_OUTSTANDING", "MAX_EXTENSIONS_EXCEEDED", "LIMIT_EXCEEDED", "TENANT_CLOSED",
        "INTERNAL_ERROR",
        # protocol extensions v0.1.26
        "ACTION_QUOTA_EXCEEDED", "ACTION_KIND_NOT_ALLOWED", "ACTION_KIND_DENIED",
    }  # fmt: skip
    assert set(errors.PROTOCOL_ERROR_CODES) == spec_codes
    for code in spec_codes:
        exc = errors.error_for(code, "msg", details={"scope": "tenant:a"})
        camel = "".join(part.capitalize() for part in code.lower().split("_"))
        assert type(exc).__name__ == camel
        assert exc.code == code and exc.message == "msg" and exc.details == {"scope": "tenant:a"}
        assert getattr(cycles, camel) is type(exc)


def test_denials_are_runtime_errors_and_bad_input_is_a_value_error() -> None:
    assert issubclass(cycles.BudgetExceeded, cycles.Denied)
    assert issubclass(cycles.Denied, RuntimeError)  # retry policies that skip RuntimeError skip denials
    assert issubclass(cycles.InvalidRequest, ValueError)
    assert not issubclass(cycles.LedgerUnavailable, cycles.Denied)
    assert cycles.LedgerUnavailable.retryable


def test_unknown_server_codes_stay_visible() -> None:
    exc = errors.error_for("SOMETHING_NEW", "from a newer server")
    assert type(exc) is errors.CyclesError and exc.code == "SOMETHING_NEW"


def test_the_run_is_public() -> None:
    for name in ("Run", "AsyncRun", "BatchResult", "current_run", "for_each", "afor_each"):
        assert name in cycles.__all__, name
    assert cycles.current_run() is None
    assert callable(cycles.Cycles.run) and callable(cycles.AsyncCycles.run)
