"""``cycles-mcp``: serve (cooperative budget tools), proxy (gate an MCP server), hook (gate Claude Code).

Errors are one line on stderr (``error: CODE: message``), never a traceback; exit 2 for bad input.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import anyio

from cycles import CyclesError
from cycles_mcp.policy import PolicyError, load_policy

__all__ = ["build_parser", "main"]


def _add_transport(p: argparse.ArgumentParser) -> None:
    p.add_argument("--transport", choices=("stdio", "http"), default="stdio", help="how clients connect (stdio)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="HTTP port (8765; 0 picks a free one)")
    p.add_argument(
        "--token",
        default=os.environ.get("CYCLES_MCP_TOKEN"),
        help="HTTP clients must send 'Authorization: Bearer TOKEN' (default: $CYCLES_MCP_TOKEN)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cycles-mcp", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-v", "--verbose", action="store_true", help="log decisions to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="the cooperative server: nine cycles_* budget tools for the agent")
    serve.add_argument("--ledger", default=None, help="ledger URL (default: $CYCLES_URL, else the embedded SQLite)")
    _add_transport(serve)
    serve.set_defaults(handler=_serve)

    proxy = sub.add_parser(
        "proxy",
        help="gate an MCP server: every tool call reserved against the policy's budgets first",
        usage="cycles-mcp proxy --policy POLICY.toml [options] (-- UPSTREAM_COMMAND [ARGS...] | --upstream-url URL)\n"
        "       cycles-mcp proxy --check POLICY.toml [-- UPSTREAM_COMMAND ... | --upstream-url URL]",
    )
    proxy.add_argument("--policy", help="the policy file (TOML)")
    proxy.add_argument("--check", metavar="POLICY", help="validate a policy and print what each known tool costs")
    proxy.add_argument("--upstream-url", help="a streamable-HTTP upstream instead of a command")
    proxy.add_argument("--ledger", default=None, help="ledger URL (overrides the policy's)")
    proxy.add_argument("--shadow", action="store_true", help="forward everything; record would-deny decisions")
    proxy.add_argument("--fail-open", action="store_true", help="forward unchecked when the ledger fails")
    _add_transport(proxy)
    proxy.add_argument("upstream", nargs="*", help="the upstream server command, after --")
    proxy.set_defaults(handler=_proxy)

    hook = sub.add_parser("hook", help="Claude Code hook commands: the policy applied to every tool, built-ins too")
    hook.add_argument(
        "event",
        choices=("pre", "post", "failure", "session-start", "session-end"),
        help="PreToolUse, PostToolUse, PostToolUseFailure, SessionStart, SessionEnd",
    )
    hook.add_argument("--policy", required=True, help="the policy file (TOML)")
    hook.add_argument("--ledger", default=None, help="ledger URL (overrides the policy's)")
    hook.set_defaults(handler=_hook)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from cycles_mcp.server import run_server

    anyio.run(
        lambda: run_server(args.ledger, transport=args.transport, host=args.host, port=args.port, token=args.token)
    )
    return 0


def _proxy(args: argparse.Namespace) -> int:
    if args.check:
        from cycles_mcp.check import check_policy

        upstream = (args.upstream or None, args.upstream_url) if (args.upstream or args.upstream_url) else None
        print(anyio.run(lambda: check_policy(load_policy(args.check), upstream)))
        return 0
    if not args.policy:
        raise PolicyError("proxy needs --policy POLICY.toml (or --check POLICY.toml)")
    policy = load_policy(args.policy)
    if bool(args.upstream) == bool(args.upstream_url):
        raise PolicyError("proxy needs the upstream: -- UPSTREAM_COMMAND [ARGS...] or --upstream-url URL (one)")
    from cycles_mcp.proxy import open_proxy
    from cycles_mcp.transport import serve_http, serve_stdio

    async def run() -> None:
        async with open_proxy(
            policy,
            command=args.upstream or None,
            url=args.upstream_url,
            ledger=args.ledger,
            shadow=args.shadow,
            fail_open=args.fail_open,
        ) as proxy:
            if args.transport == "http":
                await serve_http(proxy.server, host=args.host, port=args.port, token=args.token)
            else:
                await serve_stdio(proxy.server)

    anyio.run(run)
    return 0


def _hook(args: argparse.Namespace) -> int:
    """Any failure of ``pre`` exits 2, which makes Claude Code block the tool (fail closed) and show
    the one-line error; the other events exit 1 (a non-blocking hook error)."""
    from cycles_mcp.hook import run_hook

    try:
        out, code = run_hook(args.event, load_policy(args.policy), sys.stdin.read(), ledger=args.ledger)
    except (CyclesError, OSError, ValueError, BaseExceptionGroup) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2 if args.event == "pre" else 1
    if out:
        print(out)
    return code


def _one_line(exc: BaseException) -> str:
    for leaf in _leaves(exc):
        if isinstance(leaf, CyclesError | OSError | ValueError):
            return str(leaf).splitlines()[0] if str(leaf) else type(leaf).__name__
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s"
    )
    handler: Any = args.handler
    try:
        code: int = handler(args)
        return code
    except KeyboardInterrupt:
        return 130
    except PolicyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except CyclesError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2 if exc.http_status in (400, 404, 409) else 1
    except (OSError, ValueError, BaseExceptionGroup) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
