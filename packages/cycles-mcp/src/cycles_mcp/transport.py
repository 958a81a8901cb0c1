"""Serve a low-level MCP ``Server`` over stdio or streamable HTTP (uvicorn), with an optional bearer token."""

from __future__ import annotations

import hmac
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from mcp.server import MCPServer, Server
from mcp.server.stdio import stdio_server

__all__ = ["BearerToken", "serve_http", "serve_stdio"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def serve_stdio(server: Server[Any] | MCPServer[Any]) -> None:
    if isinstance(server, MCPServer):
        await server.run_stdio_async()
        return
    async with stdio_server() as (read, write):
        await server.run(read, write, server.create_initialization_options())


class BearerToken:
    """ASGI middleware: every HTTP request must carry ``Authorization: Bearer <token>`` (else 401)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or ()).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                body = b'{"error":"unauthorized","message":"missing or wrong bearer token"}'
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"www-authenticate", b'Bearer realm="cycles-mcp"'),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


async def serve_http(
    server: Server[Any] | MCPServer[Any],
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    token: str | None = None,
    path: str = "/mcp",
) -> None:
    """Streamable HTTP at ``http://host:port/mcp``; prints the bound address to stderr once listening
    (``port=0`` picks a free port)."""
    import uvicorn

    app: ASGIApp = server.streamable_http_app(streamable_http_path=path, host=host)
    if token:
        app = BearerToken(app, token)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # connections queue from here on, so announcing now is safe
    bound = sock.getsockname()[1]
    web = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    print(f"cycles-mcp: listening on http://{host}:{bound}{path}", file=sys.stderr, flush=True)
    await web.serve(sockets=[sock])
