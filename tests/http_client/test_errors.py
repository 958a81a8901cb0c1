"""Protocol errors become the same exception classes the embedded ledgers raise."""

from __future__ import annotations

import pytest

from cycles import errors
from cycles.errors import CyclesError, InternalError, LedgerUnavailable
from cycles.models import CommitRequest, ReservationCreateRequest

from .conftest import TRACE_ID, ClientFactory, FakeProtocolServer, Reply, error_body

RESERVE = ReservationCreateRequest.model_validate(
    {
        "idempotency_key": "k",
        "subject": {"tenant": "acme"},
        "action": {"kind": "llm.completion", "name": "m"},
        "estimate": {"unit": "TOKENS", "amount": 10},
    }
)
COMMIT = CommitRequest.model_validate({"idempotency_key": "c", "actual": {"unit": "TOKENS", "amount": 5}})

# status, code, class: every ErrorCode of the spec that a v0 server sends with a 4xx
CASES = [
    (400, "INVALID_REQUEST", errors.InvalidRequest),
    (401, "UNAUTHORIZED", errors.Unauthorized),
    (403, "FORBIDDEN", errors.Forbidden),
    (404, "NOT_FOUND", errors.NotFound),
    (409, "BUDGET_EXCEEDED", errors.BudgetExceeded),
    (409, "BUDGET_FROZEN", errors.BudgetFrozen),
    (409, "BUDGET_CLOSED", errors.BudgetClosed),
    (410, "RESERVATION_EXPIRED", errors.ReservationExpired),
    (409, "RESERVATION_FINALIZED", errors.ReservationFinalized),
    (409, "IDEMPOTENCY_MISMATCH", errors.IdempotencyMismatch),
    (400, "UNIT_MISMATCH", errors.UnitMismatch),
    (409, "OVERDRAFT_LIMIT_EXCEEDED", errors.OverdraftLimitExceeded),
    (409, "DEBT_OUTSTANDING", errors.DebtOutstanding),
    (409, "MAX_EXTENSIONS_EXCEEDED", errors.MaxExtensionsExceeded),
    (409, "TENANT_CLOSED", errors.TenantClosed),
]


@pytest.mark.parametrize(("status", "code", "cls"), CASES, ids=[c[1] for c in CASES])
async def test_error_responses_raise_the_class_of_their_code_without_retrying(
    make_client: ClientFactory, fake: FakeProtocolServer, status: int, code: str, cls: type[CyclesError]
) -> None:
    details = {"scope": "tenant:acme", "requested_unit": "TOKENS", "expected_units": ["USD_MICROCENTS"]}
    fake.script("POST", "/v1/reservations", Reply(status=status, json=error_body(code, "said no", details=details)))
    with pytest.raises(cls) as info:
        await make_client()("reserve", RESERVE)
    err = info.value
    assert type(err) is cls and err.code == code
    assert (err.message, err.details, err.request_id, err.trace_id) == ("said no", details, "req_1", TRACE_ID)
    assert len(fake.seen()) == 1


async def test_denials_expose_scope_and_reason(make_client: ClientFactory, fake: FakeProtocolServer) -> None:
    body = error_body("BUDGET_EXCEEDED", "Insufficient remaining budget", details={"scope": "tenant:acme"})
    fake.script("POST", "/v1/reservations", Reply(status=409, json=body))
    with pytest.raises(errors.Denied) as info:
        await make_client()("reserve", RESERVE)
    assert (info.value.reason_code, info.value.scope) == ("BUDGET_EXCEEDED", "tenant:acme")


async def test_an_unknown_error_code_keeps_its_code(make_client: ClientFactory, fake: FakeProtocolServer) -> None:
    fake.script("POST", "/v1/reservations", Reply(status=409, json=error_body("TOKENS_PER_MOON_EXCEEDED", "new")))
    with pytest.raises(CyclesError) as info:
        await make_client()("reserve", RESERVE)
    assert info.value.code == "TOKENS_PER_MOON_EXCEEDED" and type(info.value) is CyclesError


async def test_error_bodies_may_carry_fields_added_later(make_client: ClientFactory, fake: FakeProtocolServer) -> None:
    evidence = {"evidence_id": "b" * 64, "cycles_evidence_url": "https://x/v1/evidence/" + "b" * 64}
    fake.script(
        "POST",
        "/v1/reservations",
        Reply(status=409, json=error_body("BUDGET_EXCEEDED", cycles_evidence=evidence)),
    )
    with pytest.raises(errors.BudgetExceeded):
        await make_client()("reserve", RESERVE)


async def test_correlation_ids_fall_back_to_response_headers(
    make_client: ClientFactory, fake: FakeProtocolServer
) -> None:
    body = {"error": "NOT_FOUND", "message": "gone", "request_id": ""}
    headers = {"X-Request-Id": "req_h", "X-Cycles-Trace-Id": TRACE_ID}
    fake.script("POST", "/v1/reservations/r/commit", Reply(status=404, json=body, headers=headers))
    with pytest.raises(errors.NotFound) as info:
        await make_client()("commit", "r", COMMIT)
    assert (info.value.request_id, info.value.trace_id) == ("req_h", TRACE_ID)


@pytest.mark.parametrize(
    ("status", "cls"),
    [(404, InternalError), (400, InternalError), (401, errors.Unauthorized), (403, errors.Forbidden)],
)
async def test_a_4xx_that_is_not_an_error_response_is_reported_with_its_status(
    make_client: ClientFactory, fake: FakeProtocolServer, status: int, cls: type[CyclesError]
) -> None:
    html = b"<html><body>Not Found (nginx)</body></html>"
    fake.script("POST", "/v1/reservations", Reply(status=status, body=html, content_type="text/html"))
    with pytest.raises(cls) as info:
        await make_client()("reserve", RESERVE)
    details = info.value.details
    assert details["http_status"] == status
    assert details["content_type"].startswith("text/html") and "nginx" in details["body"]
    assert details["url"].endswith("/v1/reservations") and details["method"] == "POST"
    assert "not a Cycles error response" in str(info.value)
    assert len(fake.seen()) == 1  # a 4xx is never retried


async def test_an_error_body_that_breaks_the_schema_is_not_trusted(
    make_client: ClientFactory, fake: FakeProtocolServer
) -> None:
    fake.script("POST", "/v1/reservations", Reply(status=409, json={"error": "BUDGET_EXCEEDED"}))  # no message
    with pytest.raises(InternalError) as info:
        await make_client()("reserve", RESERVE)
    assert info.value.details["http_status"] == 409


async def test_exhausted_5xx_with_an_error_response_raises_its_class(
    make_client: ClientFactory, fake: FakeProtocolServer
) -> None:
    fake.script("POST", "/v1/reservations", Reply(status=500, json=error_body("INTERNAL_ERROR", "db down")))
    with pytest.raises(InternalError) as info:
        await make_client(retries=2)("reserve", RESERVE)
    assert not isinstance(info.value, LedgerUnavailable)
    assert info.value.retryable and info.value.message == "db down" and info.value.details["attempts"] == 3
    assert len(fake.seen()) == 3
