"""MCP gateway benchmark: latency a gated tool call adds over calling the upstream directly.

    ./run bench mcp                                  # or: uv run python bench/bench_mcp.py ...
    ./run bench mcp --calls 50 200 1000 --ledger sqlite

One process run measures, over real stdio transports, against the same upstream MCP server (this
file run with ``--upstream``, a ``work`` tool that returns at once):

- ``direct``     the client calls the upstream;
- ``forwarded``  through ``cycles-mcp proxy``, the tool ungated (``gate = false``): the proxy hop;
- ``gated``      through the proxy, the tool costing 1 risk point against a session budget: the hop
                 plus a reservation and a commit on the ledger (``--ledger``, default SQLite).

For each call count: p50 / mean per call; the latency a gated call adds over ``direct`` (p50 and
mean differences, and the p50 ratio), all measured in the same run; ``gate only`` is gated minus
forwarded (the reservation and commit without the hop). Calls are sequential (one agent, one
session). Means carry the machine's noise; p50s are the steadier figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

POLICY = """
ledger = "{ledger}"
tenant = "bench"
session_budget = {{ risk_points = 1000000 }}

[tools."work"]
cost = {{ risk_points = 1 }}

[tools."work_free"]
gate = false
"""


def upstream() -> None:
    from mcp.server import MCPServer

    app = MCPServer("bench-upstream")

    @app.tool()
    def work(n: int) -> str:
        return str(n)

    @app.tool()
    def work_free(n: int) -> str:
        return str(n)

    app.run("stdio")


async def measure(args: list[str], tool: str, calls: int, warmup: int = 20) -> list[float]:
    from mcp import Client, StdioServerParameters

    params = StdioServerParameters(command=sys.executable, args=args, env=dict(os.environ))
    async with Client(params, mode="legacy") as client:
        for i in range(warmup):
            await client.call_tool(tool, {"n": i})
        samples: list[float] = []
        for i in range(calls):
            start = time.perf_counter()
            result = await client.call_tool(tool, {"n": i})
            samples.append(time.perf_counter() - start)
            if result.is_error:
                raise SystemExit(f"{tool} failed: {result.content}")
    return samples


def ledger_url(kind: str, tmp: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp / 'ledger.db'}"
    if kind == "memory":
        return "memory://"
    if kind == "redis":
        base = os.environ.get("CYCLES_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
        return f"{base}{'&' if '?' in base else '?'}prefix=bench-mcp-{os.getpid()}"
    raise SystemExit(f"unknown ledger {kind!r} (sqlite, memory, redis)")


async def run(calls_list: list[int], ledger: str) -> dict[str, Any]:
    results: dict[str, Any] = {"ledger": ledger, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "policy.toml"
        policy.write_text(POLICY.format(ledger=ledger_url(ledger, Path(tmp))), encoding="utf-8")
        me = str(Path(__file__).resolve())
        direct = [me, "--upstream"]
        proxied = ["-m", "cycles_mcp.cli", "proxy", "--policy", str(policy), "--", sys.executable, me, "--upstream"]
        for calls in calls_list:
            d = await measure(direct, "work", calls)
            f = await measure(proxied, "work_free", calls)
            g = await measure(proxied, "work", calls)
            row = {"calls": calls}
            for name, s in (("direct", d), ("forwarded", f), ("gated", g)):
                row[f"{name}_p50_ms"] = statistics.median(s) * 1000
                row[f"{name}_mean_ms"] = statistics.fmean(s) * 1000
            row["added_p50_ms"] = row["gated_p50_ms"] - row["direct_p50_ms"]
            row["added_mean_ms"] = row["gated_mean_ms"] - row["direct_mean_ms"]
            row["gate_only_p50_ms"] = row["gated_p50_ms"] - row["forwarded_p50_ms"]
            row["gated_over_direct_p50"] = row["gated_p50_ms"] / row["direct_p50_ms"]
            results["rows"].append(row)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, nargs="+", default=[50, 200, 500])
    parser.add_argument("--ledger", default="sqlite", help="sqlite (default), memory or redis")
    args = parser.parse_args()

    import anyio

    results = anyio.run(run, args.calls, args.ledger)
    print(f"ledger={results['ledger']} cpus={os.cpu_count()}  (per call, sequential, stdio)")
    print(
        f"{'calls':>6} {'direct p50/mean':>17} {'forwarded p50/mean':>20} {'gated p50/mean':>16}"
        f" {'added p50/mean':>16} {'gate only p50':>14} {'gated/direct p50':>17}"
    )
    for r in results["rows"]:
        print(
            f"{r['calls']:>6} {r['direct_p50_ms']:>7.2f}/{r['direct_mean_ms']:<6.2f}ms"
            f" {r['forwarded_p50_ms']:>9.2f}/{r['forwarded_mean_ms']:<6.2f}ms"
            f" {r['gated_p50_ms']:>7.2f}/{r['gated_mean_ms']:<6.2f}ms"
            f" {r['added_p50_ms']:>7.2f}/{r['added_mean_ms']:<6.2f}ms"
            f" {r['gate_only_p50_ms']:>11.2f} ms {r['gated_over_direct_p50']:>16.2f}x"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    if "--upstream" in sys.argv:
        upstream()
    else:
        main()
