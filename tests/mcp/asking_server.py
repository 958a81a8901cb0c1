"""A real MCP server that asks things of its client during tool calls (sampling, elicitation,
roots), and tools that declare their action kind (``x-cycles-action-kind``).

Run as ``python asking_server.py [--transport http --port PORT]``. Like ``upstream_server.py`` it
appends one JSON line per event to ``UPSTREAM_LOG``: each tool call, what the client answered or
the error it gave, and each ``notifications/roots/list_changed`` it receives.
"""

from __future__ import annotations

import json
import sys
import warnings
from typing import Any

import mcp_types as types
from mcp import MCPDeprecationWarning
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.shared.exceptions import MCPError
from pydantic import BaseModel
from upstream_log import log_event  # run as a script: this directory is on sys.path

app = MCPServer("asking-upstream", version="0.1.0")


_log = log_event


@app.tool(description="What the client told this server it can do (its capabilities, as advertised).")
def client_caps(ctx: Context) -> str:
    caps = ctx.session.client_capabilities
    _log("client_caps")
    return json.dumps(caps.model_dump(by_alias=True, mode="json", exclude_none=True) if caps else None)


@app.tool(description="Asks the client's model to answer PROMPT (sampling/createMessage).")
async def ask_model(prompt: str, ctx: Context) -> str:
    _log("ask_model", prompt=prompt)
    message = types.SamplingMessage(role="user", content=types.TextContent(text=prompt))
    try:
        result = await ctx.session.create_message(
            [message], max_tokens=200, related_request_id=ctx.request_id, metadata={"purpose": "test"}
        )
    except MCPError as exc:
        _log("sampling_error", code=exc.error.code, message=exc.error.message)
        return f"sampling failed: {exc.error.code}: {exc.error.message}"
    text = result.content.text if isinstance(result.content, types.TextContent) else repr(result.content)
    _log("sampled", model=result.model, text=text)
    return f"{result.model} says: {text}"


class Approval(BaseModel):
    approve: bool
    reason: str = ""


@app.tool(description="Asks the user to approve ACTION (elicitation/create).")
async def ask_user(action: str, ctx: Context) -> str:
    _log("ask_user", action=action)
    try:
        answer = await ctx.elicit(f"Approve {action}?", Approval)
    except MCPError as exc:
        _log("elicitation_error", code=exc.error.code, message=exc.error.message)
        return f"elicitation failed: {exc.error.code}: {exc.error.message}"
    data = answer.data.model_dump() if answer.action == "accept" and answer.data is not None else None
    _log("elicited", action=answer.action, data=data)
    return json.dumps({"action": answer.action, "data": data})


@app.tool(description="Lists the client's roots (roots/list).")
async def my_roots(ctx: Context) -> str:
    _log("my_roots")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MCPDeprecationWarning)  # roots: handshake era only
            roots = await ctx.session.list_roots()
    except MCPError as exc:
        _log("roots_error", code=exc.error.code, message=exc.error.message)
        return f"roots failed: {exc.error.code}: {exc.error.message}"
    return json.dumps([str(r.uri) for r in roots.roots])


def _annotated(name: str, kind: str, where: str = "inputSchema") -> None:
    """A tool NAME whose definition declares KIND (in its input schema, or its ``_meta``)."""

    def tool(item: str = "x") -> str:
        _log(name, item=item)
        return f"{name} {item}"

    app.add_tool(
        tool,
        name=name,
        description=f"Declares {kind}.",
        meta={"x-cycles-action-kind": kind} if where == "_meta" else None,
    )
    if where == "inputSchema":
        app._tool_manager.get_tool(name).parameters["x-cycles-action-kind"] = (
            kind  # what the spec calls the tool schema
        )


_annotated("send_email_digest", "db.query")  # the annotation beats the name's prefix (message.email.send)
_annotated("deploy_now", "code.exec")  # the policy names code.deploy for it: the operator's word wins
_annotated("erp_post", "custom.acme.erp.post")  # undeclared custom.* kind: refused
_annotated("frob", "proprietary.action")  # unregistered, not custom: accepted as given
_annotated("sync_items", "storage.upload", where="_meta")


async def _roots_changed(ctx: Any, params: Any) -> None:
    """Asks for the new roots at once, outside any request of the client's (the usual reaction)."""
    _log("roots_list_changed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MCPDeprecationWarning)
        roots = await ctx.session.list_roots()
    _log("roots_now", uris=[str(r.uri) for r in roots.roots])


app._lowlevel_server.add_notification_handler(
    "notifications/roots/list_changed", types.NotificationParams, _roots_changed
)


if __name__ == "__main__":
    if "--transport" in sys.argv:
        import anyio

        from cycles_mcp.transport import serve_http

        anyio.run(lambda: serve_http(app, port=int(sys.argv[sys.argv.index("--port") + 1])))
    else:
        app.run("stdio")
