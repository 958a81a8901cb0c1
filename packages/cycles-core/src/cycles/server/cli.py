"""``cycles serve`` and ``cycles keys``: the server's commands, plugged into the main CLI.

    cycles serve --ledger redis://cache:6379/0 --host 0.0.0.0 --port 7878 --admin-key "$ADMIN"
    cycles keys create --tenant acme            # prints a new key once
    cycles keys list [--tenant acme]
    cycles keys revoke KEY_ID

``add_server_commands(subparsers)`` adds both to an argparse sub-parser set; each sets ``handler``
(and ``func``, the same) to a callable ``(argparse.Namespace) -> int`` returning the exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from cycles.errors import CyclesError

__all__ = ["add_server_commands", "cmd_keys_create", "cmd_keys_list", "cmd_keys_revoke", "cmd_serve", "main"]

DEFAULT_PORT = 7878


def add_server_commands(subparsers: Any) -> None:
    """Add ``serve`` and ``keys`` to ``parser.add_subparsers()``'s result."""
    serve = subparsers.add_parser(
        "serve",
        help="serve protocol v0 over HTTP",
        description="Serve the Cycles protocol v0 over HTTP on top of a ledger. Several servers over one "
        "shared ledger (SQLite file on one machine, Redis across machines) behave as one.",
    )
    serve.add_argument(
        "--ledger", metavar="URL", help="ledger URL (default: $CYCLES_URL, else the per-user SQLite file)"
    )
    serve.add_argument("--keys", metavar="URL", help="where API keys live (default: the ledger's own store)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    serve.add_argument(
        "--admin-key", metavar="KEY", help="enables /admin with this X-Admin-API-Key (default: $CYCLES_ADMIN_KEY)"
    )
    serve.add_argument("--workers", type=int, default=1, help="worker processes (not with memory://; default 1)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument(
        "--loop", default="auto", choices=["auto", "asyncio", "uvloop"], help="event loop (auto: uvloop if installed)"
    )
    serve.add_argument(
        "--http",
        default="auto",
        choices=["auto", "h11", "httptools"],
        help="HTTP parser (auto: httptools if installed)",
    )
    serve.add_argument("--no-access-log", action="store_true", help="do not log one JSON line per request")
    serve.add_argument("--max-body-bytes", type=int, default=64 * 1024, help="largest request body (default 64 KiB)")
    serve.add_argument(
        "--key-cache-ttl",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="how long a verified API key is trusted without asking the store (default 2; a key revoked "
        "through another server stops working here within this time; 0 checks every request)",
    )
    serve.add_argument(
        "--no-balances",
        action="store_true",
        help="leave the optional balances snapshots out of reserve/commit/release/event responses (faster)",
    )
    serve.set_defaults(func=cmd_serve, handler=cmd_serve)

    keys = subparsers.add_parser("keys", help="manage API keys", description="Create, list and revoke API keys.")
    # --ledger / --keys are accepted before or after the action (`cycles keys create --ledger ...`).
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument(
        "--ledger",
        metavar="URL",
        default=argparse.SUPPRESS,
        help="ledger URL whose store holds the keys (default: $CYCLES_URL)",
    )
    store.add_argument("--keys", metavar="URL", default=argparse.SUPPRESS, help="key store URL, when not the ledger's")
    keys.add_argument("--ledger", metavar="URL", help="ledger URL whose store holds the keys (default: $CYCLES_URL)")
    keys.add_argument("--keys", metavar="URL", help="key store URL, when not the ledger's")
    keys.set_defaults(func=lambda args: _usage(keys), handler=lambda args: _usage(keys))
    actions = keys.add_subparsers(dest="keys_command", metavar="{create,list,revoke}")
    create = actions.add_parser("create", parents=[store], help="create a key for a tenant and print it (shown once)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", help="a label to tell keys apart")
    create.add_argument("--json", action="store_true", help="print the key's record as JSON")
    create.set_defaults(func=cmd_keys_create, handler=cmd_keys_create)
    listing = actions.add_parser("list", parents=[store], help="list keys (never the keys themselves)")
    listing.add_argument("--tenant")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_keys_list, handler=cmd_keys_list)
    revoke = actions.add_parser("revoke", parents=[store], help="revoke a key by its key_id")
    revoke.add_argument("key_id")
    revoke.set_defaults(func=cmd_keys_revoke, handler=cmd_keys_revoke)


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP listening socket with TCP_NODELAY, which the connections it accepts inherit.

    A response goes out as two writes (head, then body). With Nagle's algorithm on, the body waits
    for the ACK of the head, and the client delays that ACK by up to 40 ms: every request would
    take 40 ms. The event loop turns Nagle off itself only on sockets it created with
    ``proto=IPPROTO_TCP``, which uvicorn's own socket for ``--workers`` is not, so we make it here.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(address)
    sock.set_inheritable(True)
    return sock


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _store_url(args: argparse.Namespace) -> str:
    from cycles.ledger.base import default_ledger_url

    return str(getattr(args, "keys", None) or getattr(args, "ledger", None) or default_ledger_url())


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError as exc:
        print(f"cycles serve needs the server extra: pip install 'cycles-core[server]' ({exc})", file=sys.stderr)
        return 1
    from cycles.ledger.base import default_ledger_url

    ledger = args.ledger or default_ledger_url()
    if args.workers > 1 and ledger.startswith("memory:"):
        print("--workers > 1 needs a shared ledger (sqlite or redis): memory:// lives in one process", file=sys.stderr)
        return 2
    # Workers are separate processes that build the app themselves (app_from_env), so settings
    # travel through the environment; the admin key never appears on their command lines.
    settings = {
        "CYCLES_SERVER_LEDGER": ledger,
        "CYCLES_SERVER_ACCESS_LOG": "0" if args.no_access_log else "1",
        "CYCLES_SERVER_MAX_BODY_BYTES": str(args.max_body_bytes),
        "CYCLES_SERVER_BALANCES": "0" if args.no_balances else "1",
        "CYCLES_SERVER_TUNE_GC": "1",
        "CYCLES_SERVER_KEY_CACHE_TTL_S": str(args.key_cache_ttl),
        "CYCLES_SERVER_LOG_LEVEL": args.log_level,
    }
    if args.keys:
        settings["CYCLES_SERVER_KEYS"] = args.keys
    if args.admin_key:
        settings["CYCLES_ADMIN_KEY"] = args.admin_key
    env = {**os.environ, **settings}
    try:  # fail fast, in this process, on a bad URL or an unreachable store
        from cycles.server.app import app_from_env

        probe = app_from_env({**env, "CYCLES_SERVER_LOG_LEVEL": "", "CYCLES_SERVER_TUNE_GC": "0"})
        asyncio.run(probe.server.aclose())
    except (CyclesError, ValueError, ImportError) as exc:
        print(f"cycles serve: {exc}", file=sys.stderr)
        return 1
    os.environ.update(settings)
    scheme = ledger.split("://", 1)[0]
    admin = "enabled" if os.environ.get("CYCLES_ADMIN_KEY") else "disabled"
    print(
        f"cycles serve: {scheme}:// ledger, http://{args.host}:{args.port}, admin API {admin}, "
        f"{args.workers} worker(s)",
        file=sys.stderr,
    )
    from cycles.server.shedding import uvicorn_options

    config = uvicorn.Config(
        "cycles.server.app:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        access_log=False,  # ours is structured and leaves out query strings and keys
        log_level=args.log_level,
        loop=args.loop,
        server_header=False,
        **uvicorn_options(args.http),  # header/idle timeouts and a connection limit (server/shedding.py)
    )
    sock = listen_socket(args.host, args.port)
    if args.workers > 1:
        from uvicorn.supervisors import Multiprocess

        Multiprocess(config, sockets=[sock]).run()
    else:
        uvicorn.Server(config).run(sockets=[sock])
    return 0


async def _with_store(args: argparse.Namespace, action: Any) -> Any:
    from cycles.server.keys import open_key_store

    store = open_key_store(_store_url(args))
    try:
        return await action(store)
    finally:
        await store.aclose()


def cmd_keys_create(args: argparse.Namespace) -> int:
    try:
        new = asyncio.run(_with_store(args, lambda s: s.create(args.tenant, name=args.name)))
    except (CyclesError, ValueError, ImportError) as exc:
        print(f"cycles keys create: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(new.to_wire()))
    else:
        print(new.api_key)
        print(
            f"key_id {new.info.key_id} for tenant {new.info.tenant}: store the key now, it is not shown again",
            file=sys.stderr,
        )
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    try:
        keys = asyncio.run(_with_store(args, lambda s: s.list(tenant=args.tenant)))
    except (CyclesError, ValueError, ImportError) as exc:
        print(f"cycles keys list: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([k.to_wire() for k in keys]))
        return 0
    for k in keys:
        state = "active" if k.active else "revoked"
        print(f"{k.key_id}  {k.tenant}  {state}  {k.name or ''}".rstrip())
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    try:
        info = asyncio.run(_with_store(args, lambda s: s.revoke(args.key_id)))
    except (CyclesError, ValueError, ImportError) as exc:
        print(f"cycles keys revoke: {exc}", file=sys.stderr)
        return 1
    print(f"revoked {info.key_id} (tenant {info.tenant})", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry (``python -m cycles.server``) with just these commands."""
    parser = argparse.ArgumentParser(prog="cycles")
    sub = parser.add_subparsers(dest="command", required=True)
    add_server_commands(sub)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result
