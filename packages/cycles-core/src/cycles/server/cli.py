"""``cycles serve`` and ``cycles keys``: the handlers of the server's commands.

    cycles serve --ledger redis://cache:6379/0 --host 0.0.0.0 --port 7878 --admin-key "$ADMIN"
    cycles keys create --tenant acme            # prints a new key once
    cycles keys list [--tenant acme]
    cycles keys revoke KEY_ID

The arguments are declared in ``cycles.cli`` (so ``cycles --help`` lists these commands, and says
which ``pip install`` adds them, even without the ``server`` extra); failures raise and
``cycles.cli.main`` prints them as one line with the CLI's exit-status convention.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from cycles.cli import CommandFailed, UsageError, add_server_commands, admin_key, ledger_url, refuse_memory

__all__ = ["add_server_commands", "cmd_keys_create", "cmd_keys_list", "cmd_keys_revoke", "cmd_serve", "main"]


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP listening socket with TCP_NODELAY, which the connections it accepts inherit.

    A response goes out as two writes (head, then body). With Nagle's algorithm on, the body waits
    for the ACK of the head, and the client delays that ACK by up to 40 ms: every request would
    take 40 ms. The event loop turns Nagle off itself only on sockets it created with
    ``proto=IPPROTO_TCP``, which uvicorn's own socket for ``--workers`` is not, so we make it here.

    Bad hosts and taken ports raise ``UsageError`` / ``CommandFailed`` with what to do about them.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise UsageError(
            f"cycles serve: cannot listen on --host {host!r} ({getattr(exc, 'strerror', None) or exc}); "
            "give an address of this machine, e.g. 127.0.0.1 or 0.0.0.0"
        ) from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise CommandFailed(_bind_failure(host, port, exc)) from None
    sock.set_inheritable(True)
    return sock


def _bind_failure(host: str, port: int, exc: OSError) -> str:
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return f"cycles serve: port {port} on {host} is already in use (another server?): stop it or use another --port"
    if exc.errno == errno.EACCES:
        return f"cycles serve: not allowed to listen on {where} (ports below 1024 need privileges): use --port 7878"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cycles serve: {host} is not an address of this machine: use 127.0.0.1 or 0.0.0.0"
    return f"cycles serve: cannot listen on {where}: {exc.strerror or exc}"


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError as exc:
        raise ImportError(f"cycles serve needs the server extra: pip install 'cycles-core[server]' ({exc})") from exc

    from cycles.server.app import app_from_env

    ledger = ledger_url(args)
    if args.workers > 1 and ledger.startswith("memory:"):
        raise UsageError(
            "cycles serve: --workers > 1 needs a shared ledger (sqlite or redis): memory:// lives in one process"
        )
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
    if args.custom_kinds:  # each worker declares them at start (ledger/custom_kinds.py)
        settings["CYCLES_CUSTOM_KINDS"] = os.path.abspath(args.custom_kinds)
    key = admin_key(args)
    if key:
        settings["CYCLES_ADMIN_KEY"] = key
    sock = listen_socket(args.host, args.port)  # first: a taken port fails before anything else starts
    try:
        # Fail fast, in this process, on a bad URL or a file that is not a ledger; say so at once when
        # the ledger or key store does not answer yet (the server starts anyway: /readyz tells when).
        probe = app_from_env({**os.environ, **settings, "CYCLES_SERVER_LOG_LEVEL": "", "CYCLES_SERVER_TUNE_GC": "0"})
        ready = asyncio.run(_probe(probe.server))
    except BaseException:
        sock.close()
        raise
    if not ready:
        print(
            f"cycles serve: warning: the ledger or key store at {ledger.split('?', 1)[0]} is not answering; "
            "serving anyway, /readyz answers 503 until it does",
            file=sys.stderr,
            flush=True,
        )
    os.environ.update(settings)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    scheme = ledger.split("://", 1)[0]
    if getattr(args, "json", False):  # for scripts, e.g. with --port 0
        print(json.dumps({"url": url, "ledger": scheme, "admin_api": bool(key), "workers": args.workers}), flush=True)
    print(
        f"cycles serve: {scheme}:// ledger, {url}, admin API {'enabled' if key else 'disabled'}, "
        f"{args.workers} worker(s)",
        file=sys.stderr,
        flush=True,
    )
    from cycles.server.shedding import uvicorn_options

    config = uvicorn.Config(
        "cycles.server.app:app_from_env",
        factory=True,
        host=args.host,
        port=port,
        workers=args.workers,
        access_log=False,  # ours is structured and leaves out query strings and keys
        log_level=args.log_level,
        loop=args.loop,
        server_header=False,
        **uvicorn_options(args.http),  # header/idle timeouts and a connection limit (server/shedding.py)
    )
    if args.workers > 1:
        from uvicorn.supervisors import Multiprocess

        Multiprocess(config, sockets=[sock]).run()
    else:
        uvicorn.Server(config).run(sockets=[sock])
    return 0


async def _probe(server: Any) -> bool:
    """Whether the ledger and the key store answer now (the server's own readiness check)."""
    from starlette.requests import Request

    from cycles.server.app import logger

    level = logger.level
    logger.setLevel(logging.ERROR)  # the verdict is printed as one line by cmd_serve, not logged here
    try:
        response = await server.readyz(Request({"type": "http", "method": "GET", "path": "/readyz", "headers": []}))
        return bool(response.status_code == 200)
    finally:
        logger.setLevel(level)
        await server.aclose()


def _store_url(args: argparse.Namespace) -> str:
    return str(getattr(args, "keys", None) or ledger_url(args))


async def _with_store(url: str, action: Any) -> Any:
    from cycles.server.keys import open_key_store

    store = open_key_store(url)
    try:
        return await action(store)
    finally:
        await store.aclose()


def _on_keys(args: argparse.Namespace, local: Any, remote: Any, changes: str | None = None) -> Any:
    """Run a key operation where the keys live, as wire records (dicts): through the admin API of
    an http(s):// server (``--admin-key``), else directly on the store (memory, SQLite, Redis)."""
    url = _store_url(args)
    if changes is not None:
        refuse_memory(url, changes)
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("http", "https"):
        from cycles.ledger.http import HttpLedger

        with HttpLedger(url, admin_key=admin_key(args)) as server:
            return remote(server)
    if scheme == "sqlite":
        # The keys go into that file: make sure it is a Cycles ledger (or a new one) first.
        from cycles.ledger.base import open_ledger

        open_ledger(url).close()
    result = asyncio.run(_with_store(url, local))
    return [k.to_wire() for k in result] if isinstance(result, list) else result.to_wire()


def cmd_keys_create(args: argparse.Namespace) -> int:
    new = _on_keys(
        args,
        lambda store: store.create(args.tenant, name=args.name),
        lambda server: server.create_key(args.tenant, args.name),
        "cycles keys create",
    )
    if getattr(args, "json", False):
        print(json.dumps(new))
    else:
        print(new["api_key"])
        print(
            f"key_id {new['key_id']} for tenant {new['tenant']}: store the key now, it is not shown again",
            file=sys.stderr,
        )
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    keys = _on_keys(args, lambda store: store.list(tenant=args.tenant), lambda server: server.list_keys(args.tenant))
    if getattr(args, "json", False):
        print(json.dumps(keys))
    elif not keys:
        print("no keys")
    else:
        for k in keys:
            print(f"{k['key_id']}  {k['tenant']}  {str(k.get('status', '')).lower()}  {k.get('name') or ''}".rstrip())
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    info = _on_keys(
        args,
        lambda store: store.revoke(args.key_id),
        lambda server: server.revoke_key(args.key_id),
        "cycles keys revoke",
    )
    if getattr(args, "json", False):
        print(json.dumps(info))
    print(f"revoked {info['key_id']} (tenant {info['tenant']})", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cycles.server serve|keys ...``: the same commands as ``cycles``."""
    from cycles.cli import main as cli_main

    return cli_main(argv)
