"""The package surface: its exports, the error without the SDK, and the example run for real."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cycles_openai_agents

EXAMPLE = Path(__file__).parents[2] / "examples" / "openai_agents_budget.py"


def test_the_public_api_is_what_we_mean() -> None:
    assert cycles_openai_agents.__all__ == ["CyclesModel", "CyclesRunHooks", "OnExhausted", "OnToolDenied"]


def test_importing_without_the_sdk_names_the_extra_to_install() -> None:
    hide_sdk = "import sys; sys.modules['agents'] = None; import cycles_openai_agents"
    proc = subprocess.run([sys.executable, "-c", hide_sdk], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr
    assert 'pip install "cycles-openai-agents[openai-agents]"' in proc.stderr


def test_the_example_runs_offline() -> None:
    env = {"PATH": "", "OPENAI_AGENTS_DISABLE_TRACING": "1", "OPENAI_API_KEY": ""}
    proc = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "final output:    I ran out of budget" in out
    assert "model calls:     5 (the script had 101)" in out
    assert "deploy refused:  Insufficient remaining budget" in out
    assert "risk points:     spent 0 risk points" in out


async def test_the_http_extra_lets_the_async_client_talk_to_a_server() -> None:
    """``cycles-openai-agents[openai-agents,http]`` is one install for a server-backed setup: the
    async HTTP client (aiohttp) is there, so an unreachable server is a ledger error, not an import one."""
    import pytest

    from cycles import AsyncCycles, LedgerUnavailable

    client = AsyncCycles("http://127.0.0.1:9", api_key="k", timeout=0.5)
    with pytest.raises(LedgerUnavailable):
        await client.balances(tenant="acme")
    await client.aclose()
