"""Rates measured across a deployment, not per server process.

With several servers (or ``--workers``) over one ledger each sees only its share of the traffic; a
rate measured in one process sees a spike at 1/N of its samples and can miss it. ``SharedRate``
keeps its counts in the record store (``RecordStore.tally``: tumbling buckets of a tenth of the
window, ten of them kept per key, so memory stays bounded), where every server adds to and reads
the same numbers.

The hot path stays cheap: a *miss* (an allowed reservation, an accepted key) is counted in this
process and written with the next hit, or once ``flush_after_s`` has passed or ``batch`` misses are
pending (``flush()`` writes whatever waits; the server calls it every second). A *hit* (a denial, a
refused key) is written at once and answered with the window's totals, which then lack at most
``flush_after_s`` of the other servers' misses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cycles.server.governance.context import Governance

__all__ = ["BUCKETS", "MIN_SAMPLES", "SharedRate"]

#: Buckets per window: counts are exact to a tenth of the window.
BUCKETS = 10
#: Fewer samples than this in a window never make a spike (one denial of three is no trend).
MIN_SAMPLES = 10


class SharedRate:
    """(hits, total) of one metric per key over a sliding window, shared by every server."""

    def __init__(
        self,
        gov: Governance,
        metric: str,
        clock: Callable[[], float],
        *,
        flush_after_s: float = 1.0,
        batch: int = 100,
        max_keys: int = 10_000,
    ) -> None:
        self.gov = gov
        self.metric = metric
        self.clock = clock
        self.flush_after_s = flush_after_s
        self.batch = batch
        self.max_keys = max_keys
        #: (key, window) -> [bucket, first pending at, misses pending]
        self._pending: dict[tuple[str, float], list[float]] = {}
        self._announced: dict[str, int] = {}  # key -> the last window this process saw announced

    def _store_key(self, key: str, window: float) -> str:
        return f"rate:{self.metric}:{window:g}:{key}"

    async def _write(self, key: str, window: float, bucket: int, hits: int, total: int) -> dict[int, dict[str, int]]:
        values = {"total": total, "hits": hits} if hits else ({"total": total} if total else {})
        return await self.gov.run(
            self.gov.records.tally,
            self._store_key(key, window),
            bucket,
            values,
            keep=BUCKETS,
            ttl_ms=int(2 * window * 1000),
        )

    async def note(self, key: str, hit: bool, window: float) -> tuple[int, int] | None:
        """Count one sample; for a hit, return (hits, total) over the last ``window`` seconds."""
        now = self.clock()
        bucket = int(now // (window / BUCKETS))
        slot = (key, window)
        pending = self._pending.get(slot)
        if pending is not None and pending[0] != bucket:  # a bucket closed: its misses go to it
            del self._pending[slot]
            await self._write(key, window, int(pending[0]), 0, int(pending[2]))
            pending = None
        if not hit:
            if pending is None:
                if len(self._pending) >= self.max_keys:
                    await self.flush(force=True)
                pending = self._pending[slot] = [bucket, now, 0]
            pending[2] += 1
            if pending[2] >= self.batch or now - pending[1] >= self.flush_after_s:
                del self._pending[slot]
                await self._write(key, window, bucket, 0, int(pending[2]))
            return None
        misses = 0
        if pending is not None:
            del self._pending[slot]
            misses = int(pending[2])
        buckets = await self._write(key, window, bucket, 1, misses + 1)
        return (sum(b.get("hits", 0) for b in buckets.values()), sum(b.get("total", 0) for b in buckets.values()))

    async def spike(self, key: str, hit: bool, window: float, threshold: float) -> dict[str, Any] | None:
        """Count one sample; when it makes the share of hits over the window exceed ``threshold``
        (over at least ``MIN_SAMPLES``) for the first time in this window, deployment-wide (a
        compare-and-set mark), the spec's ``EventDataRateSpike`` to announce; else ``None``."""
        counts = await self.note(key, hit, window)
        if counts is None:
            return None
        hits, total = counts
        if total < MIN_SAMPLES or hits / total <= threshold:
            return None
        period = int(self.clock() // window)
        if self._announced.get(key) == period:  # known taken: no store round trip per hit in a spike
            return None
        if len(self._announced) >= self.max_keys:
            self._announced.clear()
        self._announced[key] = period
        mark = f"spike:{self.metric}:{key}:{period}"
        if not await self.gov.run(self.gov.records.cas, mark, None, "1", ttl_ms=int(2 * window * 1000)):
            return None  # announced already, by another server
        return {
            "metric": self.metric,
            "current_rate": round(hits / (window / 60), 6),
            "threshold_rate": threshold,
            "window_seconds": int(window),
            "sample_count": total,
        }

    async def flush(self, *, force: bool = False) -> None:
        """Write the misses that have waited ``flush_after_s`` (every pending one with ``force``)."""
        now = self.clock()
        for slot, pending in list(self._pending.items()):
            if (force or now - pending[1] >= self.flush_after_s) and self._pending.pop(slot, None) is not None:
                await self._write(slot[0], slot[1], int(pending[0]), 0, int(pending[2]))
