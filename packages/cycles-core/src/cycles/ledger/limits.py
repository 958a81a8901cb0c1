"""Per-tenant bounds on what a tenant may make the ledger store, checked by every backend.

Budgets bound what a tenant may *spend*; these bound what it may make the ledger *keep*, so one
tenant cannot grow the store (and every other tenant's latency) without limit -- a zero-cost
reservation is granted even on a spent budget, so without them nothing would stop a loop of them:

- ``max_metadata_bytes``: the JSON size of the ``metadata`` a reservation or a commit stores.
  Over it: ``INVALID_REQUEST`` (400) -- resending the same request can never succeed.
- ``max_active_reservations``: ACTIVE reservations one tenant (the reservation's owner) may hold
  at once, zero-cost ones included. Over it: ``LIMIT_EXCEEDED`` (429, ``Retry-After``): a slot
  frees as soon as one of them is committed, released or expires.
- ``max_reservations_per_second``: optional (0 = off) rate of new reservations per tenant, per
  ledger object (per server worker), a token bucket with a burst of one second's worth.

``0`` turns a limit off. Set them with ``limits=TenantLimits(...)`` on any ledger, or as URL query
options (``?max_active_reservations=50000&max_metadata_bytes=65536``).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, fields
from typing import Any

from cycles.errors import InvalidRequest, LimitExceeded

__all__ = [
    "DEFAULT_LIMITS",
    "RateLimiter",
    "TenantLimits",
    "active_limit_error",
    "check_active_limit",
    "check_metadata",
    "limits_from_query",
]

#: How long a client refused for holding too many ACTIVE reservations should wait.
ACTIVE_RETRY_AFTER_S = 1.0


@dataclass(frozen=True, slots=True)
class TenantLimits:
    max_metadata_bytes: int = 16 * 1024
    max_active_reservations: int = 10_000
    max_reservations_per_second: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise InvalidRequest(f"{f.name} must be a number >= 0 (0 turns the limit off)")


DEFAULT_LIMITS = TenantLimits()


def limits_from_query(query: dict[str, str], base: TenantLimits = DEFAULT_LIMITS) -> TenantLimits:
    """Limits given as URL query options (``max_active_reservations=...``); the others from ``base``."""
    values: dict[str, Any] = {}
    for f in fields(TenantLimits):
        raw = query.get(f.name)
        if raw is None:
            continue
        text = raw.strip()
        try:
            values[f.name] = float(text) if f.name == "max_reservations_per_second" else int(text)
        except ValueError:
            raise InvalidRequest(f"{f.name} must be a number, got {raw!r}") from None
        if not text.isascii():
            raise InvalidRequest(f"{f.name} must be written in ASCII digits, got {raw!r}")
    if not values:
        return base
    merged = {f.name: getattr(base, f.name) for f in fields(TenantLimits)}
    return TenantLimits(**{**merged, **values})


def metadata_size(metadata: dict[str, Any] | None) -> int:
    if not metadata:
        return 0
    return len(json.dumps(metadata, separators=(",", ":"), ensure_ascii=False).encode())


def check_metadata(limits: TenantLimits, metadata: dict[str, Any] | None, what: str = "metadata") -> None:
    cap = limits.max_metadata_bytes
    if cap and metadata:
        size = metadata_size(metadata)
        if size > cap:
            raise InvalidRequest(
                f"{what} is {size} bytes of JSON; this ledger keeps at most {cap}",
                details={"limit": "max_metadata_bytes", "max": cap, "size": size},
            )


def check_active_limit(limits: TenantLimits, active: int, owner: str | None) -> None:
    cap = limits.max_active_reservations
    if cap and active >= cap:
        raise active_limit_error(cap, active, owner)


def active_limit_error(cap: int, active: int, owner: str | None) -> LimitExceeded:
    return LimitExceeded(
        f"tenant {owner or '(none)'} holds {active} ACTIVE reservations, the most this ledger allows; "
        "commit or release some first",
        details={"limit": "max_active_reservations", "max": cap},
        retry_after_s=ACTIVE_RETRY_AFTER_S,
    )


class RateLimiter:
    """Token buckets per tenant: ``rate`` reservations a second, bursts up to ``max(1, rate)``."""

    def __init__(self, rate: float, clock: Any = time.monotonic, max_tenants: int = 100_000) -> None:
        self.rate = rate
        self._clock = clock
        self._max_tenants = max_tenants
        self._buckets: dict[str | None, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, tenant: str | None) -> None:
        if self.rate <= 0:
            return
        now = self._clock()
        with self._lock:
            burst = max(1.0, self.rate)
            tokens, at = self._buckets.get(tenant, (burst, now))
            tokens = min(burst, tokens + (now - at) * self.rate)
            if tokens < 1.0:
                self._buckets[tenant] = (tokens, now)
                wait = (1.0 - tokens) / self.rate
                raise LimitExceeded(
                    f"tenant {tenant or '(none)'} is over {self.rate:g} reservations a second",
                    details={"limit": "max_reservations_per_second", "max": self.rate},
                    retry_after_s=wait,
                )
            if len(self._buckets) >= self._max_tenants and tenant not in self._buckets:
                self._buckets.clear()  # bounded: forgetting a bucket only refills it
            self._buckets[tenant] = (tokens - 1.0, now)
