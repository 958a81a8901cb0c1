"""Keyset pagination: a page costs what it returns, not what the ledger holds.

A cursor names the sort key of the last row a page returned (``created_at_ms, reservation_id``
for reservations, ``scope, unit`` for balances), bound to the filters it was issued for. Stores
hand rows over in key order starting strictly after that position (from an index: a per-tenant
sorted list in memory, a B-tree index in SQLite, a sorted set in Redis), and ``keyset_page`` stops
as soon as the page is full. A filter the index cannot answer is applied here; so that a very
selective filter cannot make one call walk a whole tenant, a page examines at most
``SCAN_BUDGET`` rows and may then come back short (or empty) with a cursor to go on from.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from cycles.errors import InvalidRequest
from cycles.models import ReservationStatus

__all__ = [
    "SCAN_BUDGET",
    "ReservationScan",
    "decode_position",
    "peek_position",
    "encode_position",
    "keyset_page",
    "sorted_after",
]

T = TypeVar("T")
V = TypeVar("V")
Position = tuple[Any, ...]

#: Rows one page may examine before it returns what it has with a cursor.
SCAN_BUDGET = 2000


@dataclass(frozen=True, slots=True)
class ReservationScan:
    """Which reservations a store hands over, in ``(created_at_ms, reservation_id)`` order
    (reversed when ``descending``), strictly after ``after``. ``statuses``, when given, lets the
    store skip rows whose stored status is not among them (the rules filter again)."""

    tenant: str | None
    all_tenants: bool
    statuses: tuple[ReservationStatus, ...] | None
    descending: bool
    after: tuple[int, str] | None


def encode_position(position: Position, binding: str) -> str:
    raw = json.dumps({"k": list(position), "f": binding}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_position(cursor: str | None, binding: str, types: Sequence[type]) -> Position | None:
    """The position a cursor names (``None``: from the start); ``InvalidRequest`` when it is not one
    this server issued for these filters."""
    if not cursor:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        key, bound = data["k"], data["f"]
        if not isinstance(key, list) or len(key) != len(types) or not isinstance(bound, str):
            raise ValueError("bad cursor shape")
        position = tuple(t(v) if type(v) is t else _bad() for t, v in zip(types, key, strict=True))
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error, RecursionError) as exc:
        raise InvalidRequest("cursor is not one this server issued") from exc
    if bound != binding:
        raise InvalidRequest("cursor was issued for different filters")
    return position


def peek_position(cursor: str | None, types: Sequence[type]) -> Position | None:
    """The position a cursor names, without checking its binding (the rules check it): for a
    store that must know where to read before the rules see the rows."""
    if not cursor:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return decode_position(cursor, data["f"], types)
    except (ValueError, KeyError, TypeError, binascii.Error, RecursionError, InvalidRequest):
        return None  # the rules refuse it with the right message


def _bad() -> Any:
    raise ValueError("bad cursor value")


def keyset_page(
    rows: Iterable[T],
    keep: Callable[[T], V | None],
    key: Callable[[T], Position],
    limit: int,
    scan_budget: int = SCAN_BUDGET,
) -> tuple[list[V], Position | None]:
    """Up to ``limit`` kept rows and the position to continue from (``None``: nothing left).

    ``rows`` arrive in key order after the cursor. One row beyond the page is read to know whether
    there is more; after ``scan_budget`` rows the page ends early at the last row examined."""
    items: list[V] = []
    last: Position | None = None
    for scanned, row in enumerate(rows):
        if scanned >= scan_budget and last is not None:
            return items, last
        kept = keep(row)
        if kept is not None:
            if len(items) == limit:
                return items, last
            items.append(kept)
        last = key(row)
    return items, None


def sorted_after(keys: Sequence[Position], descending: bool, after: Position | None) -> Iterator[int]:
    """Indexes into a sorted ``keys`` list, walking from just after ``after`` in the given direction."""
    if descending:
        start = len(keys) if after is None else bisect.bisect_left(keys, after)
        return iter(range(start - 1, -1, -1))
    start = 0 if after is None else bisect.bisect_right(keys, after)
    return iter(range(start, len(keys)))
