"""Client transport benchmark: raw aiohttp, raw httpx and ``AsyncCycles`` over HTTP, one server.

    uv run python bench/bench_transport.py                       # both servers, 32 concurrent
    uv run python bench/bench_transport.py --server minimal --rounds 5 --requests 5000
    uv run python bench/bench_transport.py --diagnose-httpx       # why httpx.AsyncClient is slow
    uv run python bench/bench_transport.py --min-ratio 0.7        # exit 1 if AsyncCycles < 70% of aiohttp

Each server runs in its own process (uvicorn, one worker), so the clients measured here do not
share a GIL with it:

- ``minimal``: a Starlette endpoint that answers ``POST /v1/reservations`` with a canned,
  schema-valid ``ReservationCreateResponse`` -- the transport and little else;
- ``cycles``: the real ``cycles serve`` over ``memory://``, with a tenant key and a large budget,
  so every request is a real reservation.

Every client sends the same bytes shape, a reservation request with a fresh idempotency key
(so the real server never answers from its replay cache), ``--concurrency`` requests in flight.
Rounds alternate the client order and the table shows per-client medians, because the machine
may be shared; "CPU us" is the client process's CPU time per request, which a busy machine
disturbs less than req/s. The sync section runs requests one after another: stdlib ``http.client`` and
``httpx.Client`` raw, and ``Cycles`` over HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _targets import Targets
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

# ---- the minimal server (imported by uvicorn in the server process) -------------------------

_CANNED = json.dumps(
    {
        "decision": "ALLOW",
        "reservation_id": "rsv_0123456789abcdef0123456789abcdef",
        "reserved": {"unit": "USD_MICROCENTS", "amount": 1_000_000},
        "expires_at_ms": 4_000_000_000_000,
        "remaining_ttl_ms": 60_000,
        "scope_path": "tenant:bench",
        "affected_scopes": ["tenant:bench"],
    }
).encode()


async def _reserve(request: Request) -> Response:
    await request.body()
    return Response(_CANNED, media_type="application/json")


async def _healthz(request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


minimal_app = Starlette(
    routes=[
        Route("/v1/reservations", _reserve, methods=["POST"]),
        Route("/healthz", _healthz, methods=["GET"]),
    ]
)

# ---- servers --------------------------------------------------------------------------------

ADMIN_KEY = "bench-admin-key"
#: (server CPU, client CPU) when pinning; set by main().
_PIN: tuple[int, int] | None = None
TENANT = "bench"


@dataclass
class Target:
    name: str
    url: str
    api_key: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.02)  # readiness probe interval, bounded by the deadline
    raise RuntimeError(f"{url} not ready after {timeout_s} s")


@contextmanager
def _server(kind: str) -> Iterator[Target]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    if kind == "minimal":
        cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(__file__).parent), "bench_transport:minimal_app"]
        cmd += ["--port", str(port), "--log-level", "warning", "--no-access-log"]
        name = "minimal Starlette endpoint"
    else:
        cmd = [sys.executable, "-m", "cycles.server", "serve", "--ledger", "memory://", "--port", str(port)]
        cmd += ["--admin-key", ADMIN_KEY, "--log-level", "warning", "--no-access-log"]
        name = "cycles serve (memory://)"
    with tempfile.TemporaryFile() as log:  # the server's output, shown only if it fails to start
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        if _PIN is not None:  # server on its own CPU, clients on another: no wake-up preemption between them
            os.sched_setaffinity(proc.pid, {_PIN[0]})
        try:
            try:
                _wait_ready(url, proc)
            except RuntimeError:
                log.seek(0)
                sys.stderr.write(log.read().decode(errors="replace"))
                raise
            api_key = "unused"
            if kind == "cycles":
                api_key = _admin(url, "/admin/keys", {"tenant": TENANT})["api_key"]
                budget = {"scope": f"tenant:{TENANT}", "amount": {"unit": "USD_MICROCENTS", "amount": 10**17}}
                _admin(url, "/admin/budgets", budget)
            yield Target(name, url, api_key)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _admin(url: str, path: str, payload: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        url + path,
        data=json.dumps(payload).encode(),
        headers={"X-Admin-API-Key": ADMIN_KEY, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        data: dict[str, Any] = json.load(resp)
        return data


# ---- request bodies -------------------------------------------------------------------------

_RUN = uuid.uuid4().hex[:12]
_COUNTER = itertools.count()
_BODY = (
    '{"idempotency_key":"bench-%s-%d","subject":{"tenant":"' + TENANT + '"},'
    '"action":{"kind":"llm.completion","name":"bench-model"},'
    '"estimate":{"unit":"USD_MICROCENTS","amount":1000000},"ttl_ms":60000,"grace_period_ms":5000,'
    '"overage_policy":"ALLOW_IF_AVAILABLE","dry_run":false}'
)


def _next_body() -> tuple[str, bytes]:
    n = next(_COUNTER)
    return f"bench-{_RUN}-{n}", (_BODY % (_RUN, n)).encode()


def _headers(target: Target, key: str) -> dict[str, str]:
    return {"Content-Type": "application/json", "X-Cycles-API-Key": target.api_key, "X-Idempotency-Key": key}


# ---- measuring ------------------------------------------------------------------------------


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float  # client CPU time per request: steadier than req/s on a busy machine


def _summarize(latencies: list[float], elapsed: float, cpu_s: float) -> Result:
    latencies.sort()
    n = len(latencies)
    p99 = latencies[min(n - 1, int(n * 0.99))] * 1000
    return Result(n / elapsed, latencies[n // 2] * 1000, p99, cpu_s / n * 1e6)


async def _drive_async(one: Callable[[], Awaitable[None]], requests: int, concurrency: int) -> Result:
    latencies: list[float] = []
    remaining = iter(range(requests))

    async def worker() -> None:
        for _ in remaining:
            t = time.perf_counter()
            await one()
            latencies.append(time.perf_counter() - t)

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return _summarize(latencies, time.perf_counter() - start, time.process_time() - cpu)


def _drive_sync(one: Callable[[], None], requests: int) -> Result:
    latencies: list[float] = []
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(requests):
        t = time.perf_counter()
        one()
        latencies.append(time.perf_counter() - t)
    return _summarize(latencies, time.perf_counter() - start, time.process_time() - cpu)


AsyncClientRun = Callable[[Target, int, int], Coroutine[Any, Any, Result]]


async def run_aiohttp(target: Target, requests: int, concurrency: int) -> Result:
    import aiohttp

    url = target.url + "/v1/reservations"
    async with aiohttp.ClientSession() as session:

        async def one() -> None:
            key, body = _next_body()
            async with session.post(url, data=body, headers=_headers(target, key)) as resp:
                await resp.read()
                assert resp.status == 200, resp.status

        await _drive_async(one, max(100, requests // 5), concurrency)  # warm the pool
        return await _drive_async(one, requests, concurrency)


async def run_httpx(target: Target, requests: int, concurrency: int) -> Result:
    import httpx

    url = target.url + "/v1/reservations"
    async with httpx.AsyncClient() as client:

        async def one() -> None:
            key, body = _next_body()
            resp = await client.post(url, content=body, headers=_headers(target, key))
            assert resp.status_code == 200, resp.status_code

        await _drive_async(one, max(100, requests // 5), concurrency)
        return await _drive_async(one, requests, concurrency)


async def run_async_cycles(target: Target, requests: int, concurrency: int) -> Result:
    from cycles import Action, AsyncCycles, Subject, usd

    subject, action, estimate = Subject(tenant=TENANT), Action("llm.completion", "bench-model"), usd(0.01)
    async with AsyncCycles(target.url, api_key=target.api_key) as acy:

        async def one() -> None:
            await acy.reserve(subject, action, estimate)

        await _drive_async(one, max(100, requests // 5), concurrency)
        return await _drive_async(one, requests, concurrency)


ASYNC_CLIENTS: dict[str, AsyncClientRun] = {
    "aiohttp (raw)": run_aiohttp,
    "httpx.AsyncClient (raw)": run_httpx,
    "AsyncCycles over HTTP": run_async_cycles,
}


def run_sync_clients(target: Target, requests: int) -> dict[str, Result]:
    import http.client
    from urllib.parse import urlsplit

    import httpx

    from cycles import Action, Cycles, Subject, usd

    out: dict[str, Result] = {}
    parts = urlsplit(target.url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port)

    def stdlib_one() -> None:
        key, body = _next_body()
        conn.request("POST", "/v1/reservations", body=body, headers=_headers(target, key))
        resp = conn.getresponse()
        resp.read()

    with httpx.Client() as client:
        url = target.url + "/v1/reservations"

        def httpx_one() -> None:
            key, body = _next_body()
            client.post(url, content=body, headers=_headers(target, key))

        subject, action, estimate = Subject(tenant=TENANT), Action("llm.completion", "bench-model"), usd(0.01)
        with Cycles(target.url, api_key=target.api_key) as cy:

            def cycles_one() -> None:
                cy.reserve(subject, action, estimate)

            for name, one in [
                ("http.client (raw)", stdlib_one),
                ("httpx.Client (raw)", httpx_one),
                ("Cycles over HTTP", cycles_one),
            ]:
                _drive_sync(one, max(100, requests // 5))
                out[name] = _drive_sync(one, requests)
    conn.close()
    return out


def _median(results: list[Result]) -> Result:
    return Result(
        statistics.median(r.rps for r in results),
        statistics.median(r.p50_ms for r in results),
        statistics.median(r.p99_ms for r in results),
        statistics.median(r.cpu_us for r in results),
    )


def _row(name: str, r: Result, ratio: float | None = None) -> str:
    tail = f"{ratio:11.0%}" if ratio is not None else ""
    return f"  {name:33s}{r.rps:9.0f}{r.p50_ms:10.1f}{r.p99_ms:10.1f}{r.cpu_us:10.0f}{tail}"


def bench_target(target: Target, args: argparse.Namespace) -> float:
    print(f"\n== {target.name} at {target.url}")
    print(
        f"async, {args.concurrency} concurrent, {args.requests} requests x {args.rounds} rounds "
        "(median per client; client order rotates each round)"
    )
    print(f"  {'client':33s}{'req/s':>9s}{'p50 ms':>10s}{'p99 ms':>10s}{'CPU us':>10s}{'vs aiohttp':>11s}")
    names = list(ASYNC_CLIENTS)
    runs: dict[str, list[Result]] = {n: [] for n in names}
    for round_no in range(args.rounds):
        order = names[round_no % len(names) :] + names[: round_no % len(names)]
        for name in order:
            runs[name].append(asyncio.run(ASYNC_CLIENTS[name](target, args.requests, args.concurrency)))
    medians = {n: _median(rs) for n, rs in runs.items()}
    base = medians["aiohttp (raw)"].rps
    for name in names:
        print(_row(name, medians[name], medians[name].rps / base))
    per_round = [c.rps / a.rps for c, a in zip(runs["AsyncCycles over HTTP"], runs["aiohttp (raw)"], strict=True)]
    print(f"  AsyncCycles / aiohttp per round: {', '.join(f'{r:.0%}' for r in per_round)}")
    ours, raw = medians["AsyncCycles over HTTP"].cpu_us, medians["aiohttp (raw)"].cpu_us
    print(
        f"  client CPU per request: AsyncCycles {ours:.0f} us, aiohttp {raw:.0f} us ({raw / ours:.0%} if client-bound)"
    )
    if not args.no_sync:
        print(f"sync, sequential, {args.requests} requests")
        print(f"  {'client':33s}{'req/s':>9s}{'p50 ms':>10s}{'p99 ms':>10s}{'CPU us':>10s}")
        for name, result in run_sync_clients(target, args.requests).items():
            print(_row(name, result))
    return medians["AsyncCycles over HTTP"].rps / base


# ---- why httpx.AsyncClient is slow ----------------------------------------------------------


async def diagnose_httpx(target: Target, requests: int) -> None:
    """Count what httpcore does per request at 1 and at 32 concurrent requests, and try the pool
    limits. Instruments httpcore's private methods: for diagnosis only."""
    import httpcore
    import httpx
    from httpcore._async import connection as hc_connection
    from httpcore._async import connection_pool as hc_pool
    from httpcore._backends import anyio as hc_anyio

    counts = dict.fromkeys(("requests", "attempts", "not_available", "pool_scans", "readable_polls"), 0)
    pool_cls, conn_cls = hc_pool.AsyncConnectionPool, hc_connection.AsyncHTTPConnection

    def counting(key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.iscoroutinefunction(fn):

            async def counted_async(*args: Any) -> Any:
                counts[key] += 1
                try:
                    return await fn(*args)
                except httpcore.ConnectionNotAvailable:
                    counts["not_available"] += 1  # the pool handed this request a busy connection
                    raise

            return counted_async

        def counted(*args: Any) -> Any:
            counts[key] += 1
            return fn(*args)

        return counted

    patches = [
        (pool_cls, "handle_async_request", "requests"),
        (conn_cls, "handle_async_request", "attempts"),
        (pool_cls, "_assign_requests_to_connections", "pool_scans"),
        (hc_anyio, "is_socket_readable", "readable_polls"),
    ]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, key in patches:
        setattr(owner, name, counting(key, getattr(owner, name)))
    url = target.url + "/v1/reservations"
    print(f"\n== httpx {httpx.__version__} / httpcore {httpcore.__version__} against {target.name}")
    print("  per request:                          attempts  ConnectionNotAvailable  pool scans  poll()")
    try:
        for concurrency in (1, 8, 32):
            async with httpx.AsyncClient() as client:

                async def one(client: httpx.AsyncClient = client) -> None:
                    key, body = _next_body()
                    resp = await client.post(url, content=body, headers=_headers(target, key))
                    assert resp.http_version == "HTTP/1.1"

                await _drive_async(one, 200, concurrency)
                for k in counts:
                    counts[k] = 0
                result = await _drive_async(one, requests, concurrency)
            n = counts["requests"]
            print(
                f"  {concurrency:2d} concurrent ({result.rps:6.0f} req/s, p99 {result.p99_ms:5.0f} ms)"
                f"{counts['attempts'] / n:10.2f}{counts['not_available'] / n:24.2f}"
                f"{counts['pool_scans'] / n:12.2f}{counts['readable_polls'] / n:8.1f}"
            )
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
    print("  pool limits at 32 concurrent (HTTP/1.1 throughout: http2 is off by default and uvicorn has no h2):")
    print(f"  {'client':33s}{'req/s':>9s}{'p50 ms':>10s}{'p99 ms':>10s}{'CPU us':>10s}")
    for label, limits in [
        (
            "default Limits(100, keepalive 20)",
            httpx.Limits(max_connections=100, max_keepalive_connections=20),
        ),
        ("Limits(32, keepalive 32)", httpx.Limits(max_connections=32, max_keepalive_connections=32)),
        ("Limits(100, keepalive 100)", httpx.Limits(max_connections=100, max_keepalive_connections=100)),
        ("Limits(8, keepalive 8)", httpx.Limits(max_connections=8, max_keepalive_connections=8)),
    ]:
        async with httpx.AsyncClient(limits=limits) as client:

            async def one_limited(client: httpx.AsyncClient = client) -> None:
                key, body = _next_body()
                await client.post(url, content=body, headers=_headers(target, key))

            await _drive_async(one_limited, 200, 32)
            result = await _drive_async(one_limited, requests, 32)
        print(_row(label, result))
    try:  # the maintained fork of httpx/httpcore (genai-prices, a core dependency, brings it)
        import httpx2
    except ImportError:
        print("  (httpx2 not installed: fork not measured)")
    else:
        async with httpx2.AsyncClient() as client2:

            async def one_fork() -> None:
                key, body = _next_body()
                await client2.post(url, content=body, headers=_headers(target, key))

            await _drive_async(one_fork, 200, 32)
            print(_row(f"httpx2 {httpx2.__version__} (fork), default", await _drive_async(one_fork, requests, 32)))
    print(_row("aiohttp, for comparison", await run_aiohttp(target, requests, 32)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="minimal,cycles", help="minimal, cycles or both (comma-separated)")
    parser.add_argument("--requests", type=int, default=3000, help="measured requests per client and round")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-sync", action="store_true", help="skip the sequential sync clients")
    parser.add_argument("--diagnose-httpx", action="store_true", help="only count httpcore's work per request")
    parser.add_argument("--min-ratio", type=float, default=None, help="exit 1 if AsyncCycles/aiohttp is below")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the server and the clients to two CPUs")
    args = parser.parse_args(argv)
    global _PIN
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not args.no_pin and len(cpus) >= 2:
        _PIN = (cpus[0], cpus[1])
        os.sched_setaffinity(0, {cpus[1]})
    pinned = f", server pinned to CPU {_PIN[0]}, clients to CPU {_PIN[1]}" if _PIN else ""
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}{pinned}")
    if args.diagnose_httpx:
        with _server("minimal") as target:
            asyncio.run(diagnose_httpx(target, args.requests))
        return 0
    failed = False
    targets = Targets()
    for kind in [k.strip() for k in args.server.split(",") if k.strip()]:
        if kind == "cycles" and not _have_cycles_server():
            print("\n== cycles serve: not available (install cycles-core[server]); skipped")
            continue
        with _server(kind) as target:
            ratio = bench_target(target, args)
        if args.min_ratio is not None:
            ok = ratio >= args.min_ratio
            targets.check(f"{kind}: AsyncCycles >= {args.min_ratio:.0%} of aiohttp req/s", f"{ratio:.0%}", ok)
            failed = failed or not ok
    targets.report()
    return 1 if failed else 0


def _have_cycles_server() -> bool:
    try:
        import cycles.server  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
