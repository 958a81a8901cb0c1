"""Server-side HTTP benchmark: reserve+commit pairs per second through ``cycles serve``.

    ./run bench http --ledger redis --workers 2          # or: uv run python bench/bench_http.py ...
    ./run bench http --ledger sqlite --clients 1 32 --seconds 5
    ./run bench http --ledger redis --serve-args=--no-balances

Starts ``cycles serve`` as a subprocess (readiness probed on /healthz), provisions a budget and an
API key through the admin API, then drives reserve -> commit pairs from N concurrent keep-alive
connections. The load generator is a minimal HTTP/1.1 client on raw asyncio streams, so the
figures measure the server rather than a client library (the client transport has its own bench).
The same ledger is measured in-process in the same run, for the HTTP overhead ratio.

Reported per client count: pairs/s, and p50 / p99 latency of one pair and of one request.
Loopback only; every loop is bounded by --seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from _targets import Targets

ADMIN_KEY = "bench-admin-" + uuid.uuid4().hex
TENANT = "bench"
UNIT = "TOKENS"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Conn:
    """One keep-alive HTTP/1.1 connection; requests are sent one at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, host: str, port: int) -> Conn:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, f"{host}:{port}")

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: application/json\r\n"
        for k, v in (headers or {}).items():
            head += f"{k}: {v}\r\n"
        head += f"content-length: {len(body)}\r\n\r\n"
        self.writer.write(head.encode() + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        data = await self.reader.readexactly(length) if length else b""
        return status, data

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


def start_server(
    ledger: str, port: int, workers: int, access_log: bool, extra: list[str] | None = None
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CYCLES_ADMIN_KEY": ADMIN_KEY}
    cmd = [
        sys.executable,
        "-m",
        "cycles.server",
        "serve",
        "--ledger",
        ledger,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--log-level",
        "warning",
    ]
    if not access_log:
        cmd.append("--no-access-log")
    cmd += extra or []
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"cycles serve exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return proc
        except OSError:
            time.sleep(0.05)  # readiness probe retry interval, bounded by the deadline
    proc.kill()
    raise RuntimeError("cycles serve did not become ready in 30 s")


async def provision(port: int) -> str:
    conn = await Conn.open("127.0.0.1", port)
    admin = {"x-admin-api-key": ADMIN_KEY}
    budget = {"scope": f"tenant:{TENANT}", "amount": {"unit": UNIT, "amount": 10**15}}
    status, _ = await conn.request("POST", "/admin/budgets", json.dumps(budget).encode(), admin)
    assert status in (200, 201), status
    status, body = await conn.request("POST", "/admin/keys", json.dumps({"tenant": TENANT}).encode(), admin)
    assert status == 201, (status, body)
    await conn.close()
    return str(json.loads(body)["api_key"])


def reserve_body(i: str) -> bytes:
    return json.dumps(
        {
            "idempotency_key": f"r-{i}",
            "subject": {"tenant": TENANT, "workflow": "bench", "agent": "a1"},
            "action": {"kind": "llm.completion", "name": "openai:gpt-4o"},
            "estimate": {"unit": UNIT, "amount": 100},
            "ttl_ms": 60000,
        }
    ).encode()


def commit_body(i: str) -> bytes:
    return json.dumps({"idempotency_key": f"c-{i}", "actual": {"unit": UNIT, "amount": 80}}).encode()


async def run_clients(port: int, api_key: str, clients: int, seconds: float) -> dict[str, Any]:
    headers = {"x-cycles-api-key": api_key}
    pair_lat: list[float] = []
    req_lat: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def worker(n: int) -> None:
        nonlocal errors
        conn = await Conn.open("127.0.0.1", port)
        prefix = f"{uuid.uuid4().hex[:8]}-{n}-"
        i = 0
        try:
            while time.perf_counter() < stop_at:
                i += 1
                key = f"{prefix}{i}"
                t0 = time.perf_counter()
                status, body = await conn.request("POST", "/v1/reservations", reserve_body(key), headers)
                t1 = time.perf_counter()
                if status != 200:
                    errors += 1
                    continue
                rid = json.loads(body)["reservation_id"]
                status, _ = await conn.request("POST", f"/v1/reservations/{rid}/commit", commit_body(key), headers)
                t2 = time.perf_counter()
                if status != 200:
                    errors += 1
                    continue
                req_lat.extend((t1 - t0, t2 - t1))
                pair_lat.append(t2 - t0)
        finally:
            await conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(clients)))
    elapsed = time.perf_counter() - start
    return {
        "clients": clients,
        "pairs": len(pair_lat),
        "pairs_per_s": len(pair_lat) / elapsed,
        "pair_p50_ms": _pct(pair_lat, 50),
        "pair_p99_ms": _pct(pair_lat, 99),
        "request_p50_ms": _pct(req_lat, 50),
        "request_p99_ms": _pct(req_lat, 99),
        "errors": errors,
    }


async def server_histogram(port: int) -> dict[float, int]:
    """Cumulative bucket counts of the server's own request latency (reserve + commit routes)."""
    conn = await Conn.open("127.0.0.1", port)
    _, body = await conn.request("GET", "/metrics")
    await conn.close()
    buckets: dict[float, int] = {}
    for line in body.decode().splitlines():
        if line.startswith("cycles_http_request_duration_seconds_bucket") and (
            'route="POST /v1/reservations"' in line or "/commit" in line
        ):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            bound = float("inf") if le == "+Inf" else float(le)
            buckets[bound] = buckets.get(bound, 0) + int(line.rsplit(" ", 1)[1])
    return buckets


def _hist_quantiles(before: dict[float, int], after: dict[float, int]) -> tuple[float, float]:
    """p50 / p99 upper bucket bounds (ms) of the requests served between two scrapes."""
    delta = sorted((b, after[b] - before.get(b, 0)) for b in after)
    total = delta[-1][1] if delta else 0
    out = []
    for q in (0.5, 0.99):
        bound = next((b for b, c in delta if c >= q * total), float("inf"))
        out.append(bound * 1000)
    return out[0], out[1]


def _pct(values: list[float], p: int) -> float:
    if not values:
        return float("nan")
    if len(values) < 2:
        return values[0] * 1000
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1] * 1000


def in_process(ledger_url: str, clients: int, seconds: float) -> dict[str, Any]:
    """The same ledger, same operations, same concurrency, no HTTP: ``clients`` tasks on the async
    face of the ledger (native for redis; a thread shell for sqlite, inline for memory), each
    running reserve -> commit pairs. The ceiling the server is measured against."""
    from cycles.ledger.base import open_async_ledger
    from cycles.models import Amount, CommitRequest, ReservationCreateRequest, Unit

    tenant = f"inproc{clients}"

    async def run() -> dict[str, Any]:
        ledger = open_async_ledger(ledger_url)
        try:
            await ledger.set_budget(f"tenant:{tenant}", Amount(unit=Unit.TOKENS, amount=10**15))
            lat: list[float] = []
            stop_at = time.perf_counter() + seconds

            async def worker(w: int) -> None:
                n = 0
                while time.perf_counter() < stop_at:
                    n += 1
                    k = f"ip{w}-{n}"
                    t0 = time.perf_counter()
                    req = ReservationCreateRequest.model_validate_json(
                        reserve_body(k).replace(b'"tenant": "bench"', f'"tenant": "{tenant}"'.encode())
                    )
                    res = await ledger.reserve(req)
                    assert res.reservation_id is not None
                    await ledger.commit(res.reservation_id, CommitRequest.model_validate_json(commit_body(k)))
                    lat.append(time.perf_counter() - t0)

            start = time.perf_counter()
            await asyncio.gather(*(worker(w) for w in range(clients)))
            elapsed = time.perf_counter() - start
            return {
                "clients": clients,
                "pairs_per_s": len(lat) / elapsed,
                "pair_p50_ms": _pct(lat, 50),
                "pair_p99_ms": _pct(lat, 99),
            }
        finally:
            await ledger.aclose()

    return asyncio.run(run())


def _delete_prefix(url: str, prefix: str) -> None:
    import redis

    with redis.Redis.from_url(url) as r:
        batch: list[Any] = []
        for key in r.scan_iter(match=prefix + ":*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                r.delete(*batch)
                batch.clear()
        if batch:
            r.delete(*batch)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ledger", default="redis", choices=["memory", "sqlite", "redis"])
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("CYCLES_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="a unique ?prefix= is added, and its keys are deleted afterwards",
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--access-log", action="store_true", help="keep the JSON access log on (to /dev/null)")
    parser.add_argument("--serve-args", default="", help="extra `cycles serve` arguments, e.g. '--loop asyncio'")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="cycles-bench-"))
    prefix = f"cycles-bench-{uuid.uuid4().hex[:12]}"
    redis_url = f"{args.redis_url}{'&' if '?' in args.redis_url else '?'}prefix={prefix}"
    url = {"memory": "memory://", "sqlite": f"sqlite:///{tmp}/ledger.db", "redis": redis_url}[args.ledger]
    port = free_port()
    proc = start_server(url, port, args.workers, args.access_log, args.serve_args.split())
    results: dict[str, Any] = {"ledger": args.ledger, "workers": args.workers, "cpus": os.cpu_count()}
    try:
        api_key = asyncio.run(provision(port))
        results["http"] = []
        for c in args.clients:
            before = asyncio.run(server_histogram(port))
            r = asyncio.run(run_clients(port, api_key, c, args.seconds))
            after = asyncio.run(server_histogram(port))
            r["server_p50_ms"], r["server_p99_ms"] = _hist_quantiles(before, after)
            results["http"].append(r)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    # memory:// here is a fresh ledger of this process: the same code, so still the ceiling.
    results["in_process"] = [in_process(url, c, min(args.seconds, 3.0)) for c in args.clients]
    if args.ledger == "redis":
        _delete_prefix(args.redis_url, prefix)
    print(f"ledger={results['ledger']} workers={results['workers']} cpus={results['cpus']}")
    for r, ip in zip(results["http"], results["in_process"], strict=True):
        c = r["clients"]
        print(
            f"  in-process {c:3d} clients {ip['pairs_per_s']:9.0f} pairs/s   "
            f"pair p50 {ip['pair_p50_ms']:.2f} ms  p99 {ip['pair_p99_ms']:.2f} ms"
        )
        print(
            f"  http       {c:3d} clients {r['pairs_per_s']:9.0f} pairs/s   pair p50 {r['pair_p50_ms']:.2f} ms  "
            f"p99 {r['pair_p99_ms']:.2f} ms   "
            f"request p50 {r['request_p50_ms']:.2f} ms  p99 {r['request_p99_ms']:.2f} ms"
            f"   server-side p50 <= {r['server_p50_ms']:g} ms  p99 <= {r['server_p99_ms']:g} ms"
            f"   ({r['pairs_per_s'] / ip['pairs_per_s']:.0%} of in-process)"
            f"{'   errors ' + str(r['errors']) if r['errors'] else ''}"
        )
    targets = Targets()
    for r in results["http"]:
        targets.check(f"{r['clients']} clients: no request errors", str(r["errors"]), not r["errors"])
        if args.ledger == "redis" and r["clients"] == 32:  # the target on 2 cores: >= 2,000 pairs/s, p99 < 50 ms
            targets.check("32 clients, redis: >= 2000 pairs/s", f"{r['pairs_per_s']:.0f}", r["pairs_per_s"] >= 2000)
            targets.check("32 clients, redis: pair p99 < 50 ms", f"{r['pair_p99_ms']:.1f} ms", r["pair_p99_ms"] < 50)
    targets.report()
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
