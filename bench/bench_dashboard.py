"""Dashboard benchmark: how long each page takes as the ledger grows to 100k reservations.

    ./run bench dashboard                                   # memory and sqlite, 1k / 10k / 100k
    ./run bench dashboard --backends sqlite --sizes 1000 100000 --repeat 5

For each backend the ledger is filled through the ledger API (reserve + commit; one reservation in
ten left live, 40 agents, 50 budgets), growing from one size to the next. At each size every page
is fetched ``--repeat`` times through the ASGI app in-process (no sockets, no browser: the
server's own cost) signed in as the admin, and the median is reported with its ratio to the same
page at the smallest size (1.00 = as fast as on the small ledger). The reservations page is also
timed through the protocol's own listing (``list_reservations``, the path a remote ledger takes)
as the baseline it is compared with in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from cycles import Action, Cycles, Subject, tokens
from cycles.dashboard.data import Reader
from cycles.ledger.base import ThreadedAsyncLedger
from cycles.models import ReservationStatus
from cycles.server import create_app
from cycles.server.app import CyclesApp

ADMIN = "bench-dashboard-admin-key"
PAGES = [
    "/dashboard",
    "/dashboard/budgets",
    "/dashboard/reservations",
    "/dashboard/events?kind=reservations",
    "/dashboard/shadow",
]


def fill(cy: Cycles, start: int, stop: int) -> None:
    for i in range(start, stop):
        r = cy.reserve(Subject(tenant=f"t{i % 5}", agent=f"a{i % 40}"), Action("llm.completion", "m"), tokens(10))
        assert r.reservation_id
        if i % 10:
            cy.commit(r.reservation_id, tokens(7))


def open_app(cy: Cycles, url: str) -> CyclesApp:
    """The server over the same ledger (memory:// lives in one process: serve the client's object)."""
    if url.startswith("memory:"):
        ledger = ThreadedAsyncLedger(cy.ledger)
        return create_app(ledger=ledger, keys_url="memory://", admin_key=ADMIN, sweep_interval_s=0, access_log=False)
    return create_app(url, admin_key=ADMIN, sweep_interval_s=0, access_log=False)


async def timed(repeat: int, call: Callable[[], Awaitable[object]]) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        await call()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


async def measure(app: CyclesApp, repeat: int) -> dict[str, float]:
    out: dict[str, float] = {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
        r = await client.post("/dashboard/login", data={"key": ADMIN})
        assert r.status_code == 303, r.text

        async def get(page: str) -> None:
            resp = await client.get(page)
            assert resp.status_code == 200, (page, resp.status_code, resp.text[:300])

        for page in PAGES:
            out[page] = await timed(repeat, functools.partial(get, page))
        generic = Reader(app.server.ledger)
        out["protocol listing (baseline)"] = await timed(
            repeat, lambda: generic.reservations(None, ReservationStatus.ACTIVE, None)
        )
    await app.server.aclose()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["memory", "sqlite"], choices=["memory", "sqlite"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1_000, 10_000, 100_000])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    sizes = sorted(args.sizes)
    for backend in args.backends:
        with tempfile.TemporaryDirectory() as tmp:
            url = "memory://" if backend == "memory" else f"sqlite:///{Path(tmp) / 'ledger.db'}"
            cy = Cycles(url, heartbeat=False)
            for t in range(5):
                cy.budgets.set(f"tenant:t{t}", tokens(10**12))
                for a in range(9):
                    cy.budgets.set(f"tenant:t{t}/agent:a{a * 5 + t}", tokens(10**12))
            filled = 0
            first: dict[str, float] = {}
            print(f"\n== {backend}")
            print(f"{'reservations':>12}  {'page':<40} {'median ms':>10} {'vs smallest':>12}")
            for size in sizes:
                t0 = time.perf_counter()
                fill(cy, filled, size)
                filled = size
                fill_s = time.perf_counter() - t0
                timings = asyncio.run(measure(open_app(cy, url), args.repeat))
                for page, seconds in timings.items():
                    first.setdefault(page, seconds)
                    ratio = seconds / first[page]
                    print(f"{size:>12,}  {page:<40} {seconds * 1000:>10.1f} {ratio:>11.2f}x")
                print(f"{'':>12}  (filled in {fill_s:.1f} s)")
            cy.close()


if __name__ == "__main__":
    main()
