"""A real MCP server for the proxy tests: tools with side effects it logs, a resource, a prompt.

Run as ``python upstream_server.py [--transport http --port PORT]``. Every tool call it receives is appended as one
JSON line to the file named by ``UPSTREAM_LOG`` (so a test can prove a refused call never arrived).
``crash`` kills the process mid-call; ``fail`` returns a tool error.
"""

from __future__ import annotations

import os
import sys

from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from upstream_log import log_event  # run as a script: this directory is on sys.path

app = MCPServer("upstream-demo", instructions="A demo upstream: deploys, searches and drops tables.", version="1.2.3")


_log = log_event


@app.tool(description="Deploy a service to production.")
def deploy(service: str) -> str:
    _log("deploy", service=service)
    return f"deployed {service}"


@app.tool(description="Search the docs.")
def search(query: str) -> str:
    _log("search", query=query)
    return f"3 results for {query}"


@app.tool(description="Drop a table.")
def drop_table(table: str) -> str:
    _log("drop_table", table=table)
    return f"dropped {table}"


@app.tool(description="Always fails.")
def fail(reason: str = "boom") -> str:
    _log("fail", reason=reason)
    raise ToolError(f"upstream failure: {reason}")


@app.tool(description="Takes its time (logs when it starts).")
async def slow(seconds: float = 30.0) -> str:
    import anyio

    _log("slow", seconds=seconds)
    await anyio.sleep(seconds)
    return "done"


@app.tool(description="Adds a tool named NAME and tells the client its tool list changed.")
async def grow(name: str, ctx: Context) -> str:
    _log("grow", name=name)

    def added(text: str = "") -> str:
        return f"{name}: {text}"

    app.add_tool(added, name=name, description="A tool added at run time.")
    await ctx.session.send_tool_list_changed()
    return f"added {name}"


@app.tool(description="Works in N steps, reporting progress after each.")
async def steps(n: int, ctx: Context) -> str:
    _log("steps", n=n)
    for i in range(1, n + 1):
        await ctx.report_progress(i, n, f"step {i}")
    return f"{n} steps"


@app.tool(description="Kills the upstream process mid-call.")
def crash() -> str:
    _log("crash")
    os._exit(3)


@app.resource("docs://readme", description="The upstream's readme.")
def readme() -> str:
    return "upstream readme"


@app.prompt(description="Ask for a deploy.")
def deploy_prompt(service: str) -> str:
    return f"Please deploy {service}."


if __name__ == "__main__":
    if "--transport" in sys.argv:  # --transport http --port N, as the test fixture starts servers
        import anyio

        from cycles_mcp.transport import serve_http

        anyio.run(lambda: serve_http(app, port=int(sys.argv[sys.argv.index("--port") + 1])))
    else:
        app.run("stdio")
