"""On a real Redis Cluster (three primaries started here): every script touches one slot, tenants
land on different nodes, and the sync and async ledgers work through the cluster clients."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster

from cycles import Action, AsyncCycles, Cycles, Subject, tokens
from cycles.errors import BudgetExceeded
from cycles.testing import assert_ledger_invariant

LLM = Action("llm.completion", "m")


def _cluster_ports(count: int) -> list[int]:
    """Free ports whose cluster-bus port (port + 10000) is free and valid too."""
    ports: list[int] = []
    for port in random.sample(range(20000, 30000), 200):
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError("no free ports for a cluster")


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        pytest.skip("redis-server / redis-cli not installed (needed to start a cluster)")
    ports = _cluster_ports(3)
    procs = []
    for port in ports:
        node_dir: Path = tmp_path_factory.mktemp(f"node{port}")
        procs.append(
            subprocess.Popen(
                [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir), "--save", "",
                 "--appendonly", "no", "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )  # fmt: skip
    try:
        for port in ports:
            _wait(lambda p=port: redis.Redis(port=p).ping())
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )
        _wait(lambda: redis.Redis(port=ports[0]).cluster("info")["cluster_state"] == "ok")
        yield f"redis://127.0.0.1:{ports[0]}/0?cluster=true&prefix=ct"
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)


def _wait(probe: object) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            if probe():  # type: ignore[operator]
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the cluster did not come up")
        time.sleep(0.05)


def test_the_ledger_works_on_a_cluster_and_spreads_tenants(cluster_url: str) -> None:
    cy = Cycles(cluster_url)
    tenants = [f"t{i}" for i in range(12)]
    for t in tenants:
        cy.budgets.set(f"tenant:{t}", tokens(100))
        cy.budgets.set(f"tenant:{t}/agent:a", tokens(30))
    cy.budgets.set("workflow:w", tokens(50))
    for t in tenants:
        s = Subject(tenant=t, agent="a")
        r = cy.reserve(s, LLM, tokens(20))
        cy.commit(r.reservation_id or "", tokens(15))
        with pytest.raises(BudgetExceeded):
            cy.reserve(s, LLM, tokens(20))  # the agent has 15 left
        cy.event(s, LLM, tokens(1))
    cy.reserve(Subject(workflow="w"), LLM, tokens(5))
    assert len(cy.budgets.list()) == 25
    assert {b.scope: b.spent.amount for b in cy.budgets.list() if b.spent}["tenant:t3"] == 16
    assert len(cy.list_reservations(tenant="t1").reservations) == 1
    assert len(cy.list_reservations().reservations) == 13
    cy.sweep()
    assert_ledger_invariant(cy)

    client = RedisCluster.from_url(cluster_url.split("?")[0])
    nodes = {str(client.get_node_from_key(f"ct:{{{t}}}:budgets")) for t in tenants}
    assert len(nodes) > 1  # the tenants' slots are on different primaries
    client.close()
    cy.close()


async def test_the_async_ledger_on_a_cluster(cluster_url: str) -> None:
    acy = AsyncCycles(cluster_url)
    await acy.budgets.set("tenant:async", tokens(100))
    r = await acy.reserve(Subject(tenant="async"), LLM, tokens(10))
    c = await acy.commit(r.reservation_id or "", tokens(9))
    assert c.charged == tokens(9)
    assert (await acy.get_reservation(r.reservation_id or "")).status.value == "COMMITTED"
    assert [b.scope for b in await acy.budgets.list(tenant="async")] == ["tenant:async"]
    await acy.ledger.aclose()
