"""The package surface: its exports, its console script, and the example run for real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cycles_mcp

EXAMPLE = Path(__file__).parents[2] / "examples" / "mcp_gateway.py"


def test_the_public_api_is_what_we_mean() -> None:
    assert cycles_mcp.__all__ == [
        "TOOL_NAMES",
        "Admission",
        "Gate",
        "Match",
        "Policy",
        "PolicyError",
        "ProxyServer",
        "ToolFailed",
        "ToolRule",
        "__version__",
        "connect_upstream",
        "create_server",
        "load_policy",
        "open_proxy",
        "parse_policy",
    ]


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("cycles-mcp")
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and "serve" in done.stdout and "proxy" in done.stdout and "hook" in done.stdout


def test_the_example_refuses_the_second_deploy_before_the_upstream_sees_it() -> None:
    env = {k: v for k, v in os.environ.items() if k != "CYCLES_URL"}
    proc = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "deploy #1:       ran: deployed checkout to production" in out
    assert "deploy #2:       REFUSED: Cycles refused the tool call 'deploy'" in out
    assert "has 10 risk points left" in out
    assert "upstream saw:    1 deploy(s)" in out
