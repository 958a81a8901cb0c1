"""An MCP server behind the Cycles gateway: the second deploy is refused before the server sees it.

    python examples/mcp_gateway.py     # pip install cycles-mcp

Offline, in seconds. The "upstream" is a real MCP server (this file run with ``--upstream``) with a
``deploy`` tool. An agent-like MCP client connects to it through ``cycles-mcp proxy`` (over stdio,
as Claude Desktop or Cursor would) with this policy:

    tenant = "acme"
    session_budget = { risk_points = 60 }
    [tools."deploy*"]
    cost = { risk_points = 50 }

The first deploy fits the session's 60 risk points and runs; the second needs 50 of the 10 left and
is refused by the proxy with a tool error the agent can read. The upstream logs every call it
receives: it saw one deploy.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

POLICY = """
ledger = "sqlite:///{db}"
tenant = "acme"
session_budget = {{ risk_points = 60 }}
default_cost = {{ risk_points = 1 }}

[tools."deploy*"]
cost = {{ risk_points = 50 }}
"""


def upstream() -> None:
    """The MCP server being protected: it deploys, and writes down every deploy it is asked for."""
    from mcp.server import MCPServer

    app = MCPServer("deployer")

    @app.tool(description="Deploy a service to production.")
    def deploy(service: str) -> str:
        with open(os.environ["DEPLOY_LOG"], "a", encoding="utf-8") as log:
            log.write(service + "\n")
        return f"deployed {service} to production"

    app.run("stdio")


async def agent(workdir: Path) -> None:
    """An agent-like client: it lists the tools and asks for two deploys, reading each answer."""
    from mcp import Client, StdioServerParameters

    policy = workdir / "policy.toml"
    policy.write_text(POLICY.format(db=workdir / "ledger.db"), encoding="utf-8")
    gateway = StdioServerParameters(
        command=sys.executable,
        args=["-m", "cycles_mcp.cli", "proxy", "--policy", str(policy), "--", sys.executable, __file__, "--upstream"],
        env=dict(os.environ, DEPLOY_LOG=str(workdir / "deploys.log")),
    )
    async with Client(gateway, mode="legacy") as client:
        tools = await client.list_tools()
        print("tools:          ", ", ".join(t.name for t in tools.tools))
        for attempt in (1, 2):
            result = await client.call_tool("deploy", {"service": "checkout"})
            text = " ".join(getattr(c, "text", "") for c in result.content)
            print(f"deploy #{attempt}:       {'REFUSED' if result.is_error else 'ran'}: {text}")


def main() -> None:
    import anyio

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        anyio.run(agent, workdir)
        log = workdir / "deploys.log"
        seen = log.read_text(encoding="utf-8").splitlines() if log.exists() else []
        print(f"upstream saw:    {len(seen)} deploy(s)")


if __name__ == "__main__":
    if "--upstream" in sys.argv:
        upstream()
    else:
        main()
