"""``periods.rollover`` over several boundaries equals crossing them one at a time (``roll.lua``
mirrors it; the contract suite holds the two to the same figures)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cycles.ledger import periods


def one_boundary(policy: str, base: int, allocated: int, spent: int, debt: int) -> tuple[int, int, int]:
    unused = max(0, allocated - spent - debt)
    carry = 0 if policy == "NONE" else min(unused, base) if policy == "CAP_AT_ALLOCATED" else unused
    allocated = base + carry
    repay = min(debt, allocated)
    return allocated, repay, debt - repay


@given(
    policy=st.sampled_from(["NONE", "CARRY_FORWARD", "CAP_AT_ALLOCATED"]),
    base=st.integers(0, 1_000),
    allocated=st.integers(0, 1_000),
    spent=st.integers(0, 1_000),
    debt=st.integers(0, 100_000),
    boundaries=st.integers(1, 200),
)
def test_many_boundaries_at_once_equal_one_at_a_time(
    policy: str, base: int, allocated: int, spent: int, debt: int, boundaries: int
) -> None:
    hours = periods.PeriodState.new("1h", None, policy, base, 0)
    now = hours.end_ms + (boundaries - 1) * 3_600_000
    start, end = hours.next_window(now)
    assert hours.periods_passed(start) == boundaries
    expected = (allocated, spent, debt)
    for _ in range(boundaries):
        expected = one_boundary(policy, base, *expected)
    assert periods.rollover(hours, start, end, allocated, spent, debt) == expected
    assert (hours.start_ms, hours.end_ms) == (start, end)
