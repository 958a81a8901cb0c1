"""The ``cycles`` command: the demo, budget administration, balances, reservations, sweep, serve, keys.

Conventions, the same for every command (and printed by ``cycles --help``):

- Options go before or after the command: ``cycles --ledger URL budget list`` is
  ``cycles budget list --ledger URL``. ``--ledger``, ``--json``, ``--api-key`` and ``--admin-key``
  work with every command; ``CYCLES_URL``, ``CYCLES_API_KEY`` and ``CYCLES_ADMIN_KEY`` are their
  defaults.
- Exit status: 0 success; 1 the command ran and failed (ledger unavailable, budget not found, an
  operation the ledger refused); 2 the command line is wrong (unknown option, bad amount, scope,
  unit or URL).
- A failure prints one line on stderr, ``error: CODE: what is wrong``, never a traceback
  (``CYCLES_DEBUG=1`` shows it). ``CODE`` is the protocol error code, or ``LEDGER_UNAVAILABLE``.

Only ``argparse`` is needed to build the parser: the ledgers, ``rich`` and the server are imported
by the command that uses them, so ``cycles --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from cycles import __version__
from cycles.amounts import parse_amount

if TYPE_CHECKING:
    from cycles.client import Cycles
    from cycles.models import Balance, Caps

__all__ = [
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "CommandFailed",
    "UsageError",
    "add_server_commands",
    "build_parser",
    "describe_failure",
    "ledger_url",
    "main",
    "parse_amount",
    "render_table",
]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

_ENVIRONMENT = """\
environment:
  CYCLES_URL        default --ledger
  CYCLES_HOME       directory of the default SQLite ledger (else $XDG_DATA_HOME/cycles, ~/.local/share/cycles)
  CYCLES_API_KEY    default --api-key
  CYCLES_ADMIN_KEY  default --admin-key
  NO_COLOR          no colours in terminal output
  CYCLES_DEBUG=1    show the Python traceback of a failure

Options go before or after the command. Exit status: 0 success, 1 the command failed (ledger
unavailable, budget not found, refused), 2 the command line is wrong. A failure is one line on
stderr: error: CODE: what is wrong and what to do.
"""


class UsageError(Exception):
    """The command line is wrong: one line on stderr, exit status 2."""


class CommandFailed(Exception):
    """The command ran and failed for a reason outside the ledger's error codes: exit status 1."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usual usage block is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


# ---- options every command takes -----------------------------------------------------------


def _common_options() -> _Parser:
    """Added to the top-level parser *and* to every command, with SUPPRESS defaults, so a value
    given before the command is not overwritten by the command's own (absent) one."""
    common = _Parser(add_help=False)
    group = common.add_argument_group("options of every command")
    group.add_argument(
        "--ledger",
        metavar="URL",
        default=argparse.SUPPRESS,
        help="where budgets live: memory://, sqlite:///path.db, redis://host:6379/0 or http(s)://host:7878 "
        "(default: $CYCLES_URL, else the per-user SQLite file)",
    )
    group.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON (wire shapes) instead of tables"
    )
    group.add_argument(
        "--api-key",
        metavar="KEY",
        default=argparse.SUPPRESS,
        help="API key for an http(s):// ledger's runtime API (default: $CYCLES_API_KEY)",
    )
    group.add_argument(
        "--admin-key",
        metavar="KEY",
        default=argparse.SUPPRESS,
        help="admin key: budget and key administration on an http(s):// ledger; for serve, enables its "
        "/admin API (default: $CYCLES_ADMIN_KEY)",
    )
    return common


def ledger_url(args: argparse.Namespace) -> str:
    from cycles.ledger.base import default_ledger_url

    return str(getattr(args, "ledger", None) or default_ledger_url())


def admin_key(args: argparse.Namespace) -> str | None:
    return getattr(args, "admin_key", None) or os.environ.get("CYCLES_ADMIN_KEY") or None


def _json_wanted(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def refuse_memory(url: str, what: str) -> None:
    """A state-changing command on ``memory://`` would report a change that dies with the process."""
    if _scheme(url) == "memory":
        raise UsageError(
            f"{what}: memory:// keeps nothing after this command exits, so the change would be lost; "
            "use a ledger that persists (sqlite:///path.db, redis://host:6379/0 or http://host:7878)"
        )


def open_cycles(args: argparse.Namespace) -> Cycles:
    from cycles.client import Cycles

    url = ledger_url(args)
    options: dict[str, Any] = {}
    if _scheme(url) in ("http", "https"):
        options = {"api_key": getattr(args, "api_key", None), "admin_key": admin_key(args)}
    return Cycles(url, heartbeat=False, **options)


# ---- argument types --------------------------------------------------------------------------


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _non_negative_int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def _seconds_between(low: float, high: float, *, low_included: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not (low <= value if low_included else low < value) or not value <= high:
            bound = "at least" if low_included else "more than"
            raise argparse.ArgumentTypeError(f"must be {bound} {low:g} and at most {high:g}, got {text}")
        return value

    return parse


_positive_seconds = _seconds_between(0, 3600, low_included=False)
_non_negative_seconds = _seconds_between(0, 86_400, low_included=True)


# ---- output --------------------------------------------------------------------------------


def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned table (what pipes and files get); numbers right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    right = [bool(cells) and all(_numeric(r[i]) for r in cells) for i in range(len(headers))]

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right, strict=True)).rstrip()

    lines = [fmt(headers), fmt(["-" * w for w in widths])]
    lines += [fmt(r) for r in cells]
    return "\n".join(lines)


def _numeric(text: str) -> bool:
    return text == "" or text[0].isdigit() or text.startswith(("$", "-$"))


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A rich table on a terminal (colours unless NO_COLOR), the plain one anywhere else."""
    if not sys.stdout.isatty():
        print(render_table(headers, rows))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    cells = [[str(c) for c in row] for row in rows]
    for i, h in enumerate(headers):
        table.add_column(h, justify="right" if cells and all(_numeric(r[i]) for r in cells) else "left")
    for row in cells:
        table.add_row(*(_styled(c) for c in row))
    Console().print(table)


def _styled(cell: str) -> str:
    from rich.markup import escape

    text = escape(cell)
    if cell.startswith(("FROZEN", "CLOSED")) or "over limit" in cell:
        return f"[bold red]{text}[/]"
    return text


_BUDGET_HEADERS = [
    *("scope", "unit", "status", "allocated", "spent", "reserved", "debt", "remaining", "overdraft", "caps")
]


def _caps_text(caps: Caps | None) -> str:
    if caps is None:
        return ""
    parts = []
    if caps.max_tokens is not None:
        parts.append(f"max_tokens={caps.max_tokens}")
    if caps.max_steps_remaining is not None:
        parts.append(f"max_steps={caps.max_steps_remaining}")
    if caps.tool_allowlist:
        parts.append("allow=" + ",".join(caps.tool_allowlist))
    if caps.tool_denylist:
        parts.append("deny=" + ",".join(caps.tool_denylist))
    if caps.cooldown_ms is not None:
        parts.append(f"cooldown_ms={caps.cooldown_ms}")
    return " ".join(parts)


def _budget_row(b: Balance) -> list[str]:
    from cycles.amounts import format_amount_exact, unit_name

    unit = b.remaining.unit

    def show(a: Any) -> str:
        return format_amount_exact(unit, a.amount) if a is not None else ""

    status = getattr(b, "status", None) or "?"
    if b.is_over_limit:
        status += ", over limit"
    return [
        b.scope,
        unit_name(unit),
        status,
        show(b.allocated),
        show(b.spent),
        show(b.reserved),
        show(b.debt),
        show(b.remaining),
        show(b.overdraft_limit),
        _caps_text(getattr(b, "caps", None)),
    ]


def print_budgets(args: argparse.Namespace, budgets: Sequence[Balance]) -> None:
    if _json_wanted(args):
        print(json.dumps([b.to_wire() for b in budgets], indent=2))
    elif not budgets:
        print("no budgets")
    else:
        print_table(_BUDGET_HEADERS, [_budget_row(b) for b in budgets])


# ---- commands ------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from cycles.demo import run_demo

    budget = parse_amount(args.budget, "usd")
    if budget.amount == 0:
        raise UsageError("cycles demo: --budget must be more than 0")
    as_json = _json_wanted(args)
    result = run_demo(
        getattr(args, "ledger", None),
        budget=budget,
        simulated_minutes=args.minutes,
        replay_seconds=0.0 if args.fast or as_json else args.seconds,
        out=io.StringIO() if as_json else None,
    )
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
    return EXIT_OK


def _caps(args: argparse.Namespace) -> Caps | None:
    from cycles.models import Caps

    if args.max_tokens is None and not args.allow_tool and not args.deny_tool:
        return None
    return Caps(
        max_tokens=args.max_tokens, tool_allowlist=args.allow_tool or None, tool_denylist=args.deny_tool or None
    )


def _cmd_budget(args: argparse.Namespace) -> int:
    from cycles.amounts import parse_unit

    action = args.action
    if action not in ("show", "list"):
        refuse_memory(ledger_url(args), f"cycles budget {action}")
    unit = parse_unit(args.unit) if getattr(args, "unit", None) else None
    amount = parse_amount(args.amount, unit or "usd") if action in ("set", "fund") else None
    overdraft = None
    if action == "set" and args.overdraft_limit is not None:
        overdraft = parse_amount(args.overdraft_limit, unit or "usd")
    with open_cycles(args) as cy:
        budgets: list[Balance]
        if action == "set":
            assert amount is not None
            budgets = [
                cy.budgets.set(
                    args.scope,
                    amount,
                    overdraft_limit=overdraft,
                    caps=_caps(args),
                    period=args.period,
                    timezone=args.timezone,
                    rollover_policy=args.rollover,
                )
            ]
        elif action == "fund":
            assert amount is not None
            budgets = [cy.budgets.fund(args.scope, amount)]
        elif action == "show":
            budgets = [cy.budgets.get(args.scope, unit)] if unit else _all_units(cy, args.scope)
        elif action == "list":
            budgets = cy.budgets.list(tenant=args.tenant)
        elif action == "delete":  # prints the deleted rows as they were last
            budgets = cy.budgets.delete(args.scope, unit, force=args.force)
        else:  # freeze / unfreeze / close
            budgets = getattr(cy.budgets, action)(args.scope, unit)
        print_budgets(args, budgets)
    return EXIT_OK


def _all_units(cy: Cycles, scope: str) -> list[Balance]:
    from cycles.errors import NotFound
    from cycles.models import Unit

    found: list[Balance] = []
    for unit in Unit:
        try:
            found.append(cy.budgets.get(scope, unit))
        except NotFound:
            continue
    if not found:
        cy.budgets.get(scope)  # raises NotFound with the standard message
    return found


def _cmd_balances(args: argparse.Namespace) -> int:
    from cycles.errors import Forbidden, InvalidRequest, Unauthorized

    levels = {k: getattr(args, k) for k in ("tenant", "workspace", "app", "workflow", "agent", "toolset")}
    with open_cycles(args) as cy:
        balances = cy.balances(**levels)
        try:  # the operator plane adds status and caps (an http ledger needs the admin key for it)
            known = {(b.scope, b.remaining.unit): b for b in cy.budgets.list(tenant=args.tenant)}
        except (InvalidRequest, Forbidden, Unauthorized):
            known = {}
            print("note: status and caps need --admin-key on an http(s):// ledger", file=sys.stderr)
        print_budgets(args, [known.get((b.scope, b.remaining.unit), b) for b in balances])
    return EXIT_OK


def _cmd_reservations(args: argparse.Namespace) -> int:
    from cycles.amounts import format_amount_exact, unit_name

    with open_cycles(args) as cy:
        filters = {k: v for k in ("tenant", "workflow", "agent") if (v := getattr(args, k))}
        page = cy.list_reservations(status=args.status, limit=args.limit, **filters)
        rows = page.reservations
        if _json_wanted(args):
            print(json.dumps([r.to_wire() for r in rows], indent=2))
            return EXIT_OK
        if not rows:
            print("no reservations")
            return EXIT_OK
        print_table(
            ["reservation", "status", "scope", "action", "unit", "reserved", "committed"],
            [
                [
                    r.reservation_id,
                    r.status.value,
                    r.scope_path,
                    f"{r.action.kind} {r.action.name}",
                    unit_name(r.reserved.unit),
                    format_amount_exact(r.reserved.unit, r.reserved.amount),
                    format_amount_exact(r.committed.unit, r.committed.amount) if r.committed else "",
                ]
                for r in rows
            ],
        )
        if page.has_more:
            print(f"(more: raise --limit, at most {_MAX_LIST})", file=sys.stderr)
    return EXIT_OK


_MAX_LIST = 200


def _cmd_sweep(args: argparse.Namespace) -> int:
    refuse_memory(ledger_url(args), "cycles sweep")
    with open_cycles(args) as cy:
        total = 0
        while True:
            n = cy.sweep(limit=1000)
            total += n
            if n < 1000:
                break
    if _json_wanted(args):
        print(json.dumps({"expired": total}))
    else:
        print(f"expired {total} reservation(s)")
    return EXIT_OK


def _server_command(name: str) -> Callable[[argparse.Namespace], int]:
    """The handler ``name`` of ``cycles.server.cli``, imported when the command runs."""

    def run(args: argparse.Namespace) -> int:
        try:
            module = importlib.import_module("cycles.server.cli")
        except ImportError as exc:
            root: BaseException = exc
            while isinstance(root.__cause__, ImportError):
                root = root.__cause__
            raise ImportError(
                f"cycles {args.command} needs the server extra: pip install 'cycles-core[server]' ({root})"
            ) from exc
        handler: Callable[[argparse.Namespace], int] = getattr(module, name)
        return handler(args)

    run.__name__ = name
    return run


# ---- the parser ----------------------------------------------------------------------------


def _port(text: str) -> int:
    return _int_between(0, 65535)(text)


def add_server_commands(subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Add ``serve`` and ``keys`` to ``parser.add_subparsers()``'s result. Their handlers import the
    server (the ``server`` extra) only when they run."""
    parents = list(parents) or [_common_options()]
    serve = subparsers.add_parser(
        "serve",
        parents=parents,
        help="serve protocol v0 over HTTP (needs the server extra)",
        description="Serve the Cycles protocol v0 over HTTP on top of a ledger. Several servers over one "
        "shared ledger (SQLite file on one machine, Redis across machines) behave as one. "
        "--admin-key (or $CYCLES_ADMIN_KEY) enables the /admin API.",
    )
    serve.add_argument("--keys", metavar="URL", help="where API keys live (default: the ledger's own store)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    serve.add_argument(
        "--port", type=_port, default=DEFAULT_PORT, help=f"port, or 0 for any free one (default {DEFAULT_PORT})"
    )
    serve.add_argument(
        "--workers", type=_int_between(1, 64), default=1, help="worker processes (not with memory://; default 1)"
    )
    serve.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="server log level"
    )
    serve.add_argument(
        "--loop", default="auto", choices=["auto", "asyncio", "uvloop"], help="event loop (auto: uvloop if installed)"
    )
    serve.add_argument(
        "--http", default="auto", choices=["auto", "h11", "httptools"], help="HTTP parser (auto: httptools if there)"
    )
    serve.add_argument("--no-access-log", action="store_true", help="do not log one JSON line per request")
    serve.add_argument(
        "--max-body-bytes",
        type=_int_between(1024, 64 * 1024 * 1024),
        default=64 * 1024,
        metavar="N",
        help="largest request body (default 65536)",
    )
    serve.add_argument(
        "--key-cache-ttl",
        type=_non_negative_seconds,
        default=2.0,
        metavar="SECONDS",
        help="how long a verified API key is trusted without asking the store (default 2; a key revoked "
        "through another server stops working here within this time; 0 checks every request)",
    )
    serve.add_argument(
        "--custom-kinds",
        metavar="FILE",
        help="a JSON file declaring custom.* action kinds (kind, risk_class, ...): undeclared ones are refused",
    )
    serve.add_argument(
        "--no-balances",
        action="store_true",
        help="leave the optional balances snapshots out of reserve/commit/release/event responses (faster)",
    )
    serve.set_defaults(handler=_server_command("cmd_serve"))

    keys = subparsers.add_parser(
        "keys",
        parents=parents,
        help="quick tenant keys (the /admin plane); keys with permissions: see 'api-keys' (server extra)",
        description="Create, list and revoke plain tenant API keys: the default permission set of the "
        "governance spec, no scope filter, no expiry; in the ledger's own store (SQLite file, Redis) or on "
        "a running server through its /admin API (--ledger http://... --admin-key). For a key limited to "
        "some permissions (e.g. balances:read only), to a scope filter or with an expiry, or to validate "
        "a secret, use 'cycles api-keys'. Both commands see the same keys.",
    )
    keys.set_defaults(handler=lambda args: _usage(keys))
    store = argparse.ArgumentParser(add_help=False)
    where = "where the keys live, when not the ledger's own store (an http(s):// server needs --admin-key)"
    store.add_argument("--keys", metavar="URL", default=argparse.SUPPRESS, help=where)
    keys.add_argument("--keys", metavar="URL", help=where)
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION")
    create = actions.add_parser(
        "create", parents=[*parents, store], help="create a key for a tenant and print it (shown once)"
    )
    create.add_argument("--tenant", required=True, help="the tenant the key acts for")
    create.add_argument("--name", help="a label to tell keys apart")
    create.set_defaults(handler=_server_command("cmd_keys_create"))
    listing = actions.add_parser("list", parents=[*parents, store], help="list keys (never the keys themselves)")
    listing.add_argument("--tenant", help="only this tenant's keys")
    listing.set_defaults(handler=_server_command("cmd_keys_list"))
    revoke = actions.add_parser("revoke", parents=[*parents, store], help="revoke a key by its key_id")
    revoke.add_argument("key_id", help="the key_id printed by keys create / keys list")
    revoke.set_defaults(handler=_server_command("cmd_keys_revoke"))


DEFAULT_PORT = 7878


def _usage(parser: argparse.ArgumentParser) -> int:
    raise UsageError(f"{parser.prog}: say which action (see '{parser.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = _Parser(
        prog="cycles",
        description="Runtime budget and action authority for AI agents.",
        epilog=_ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"cycles {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="the runaway-agent demo (offline; takes about 5 s, 2 s with --fast)",
        description="A writer/evaluator loop that never converges, first without Cycles, then with every "
        "model call guarded, then an agent repeating one tool call, stopped by the loop guard. The model is "
        "simulated (no network, no key) and priced like gpt-4o; the "
        "unguarded loop runs --minutes of simulated time, replayed in --seconds. Runs on a throw-away "
        "ledger unless --ledger is given.",
    )
    demo.add_argument("--budget", default="1.00", help="the guarded run's budget in USD (default 1.00)")
    demo.add_argument(
        "--minutes",
        type=_int_between(1, 24 * 60),
        default=60,
        help="simulated minutes the unguarded loop runs before the demo stops it (default 60)",
    )
    demo.add_argument(
        "--seconds",
        type=_positive_seconds,
        default=3.0,
        help="real seconds the unguarded loop is replayed over (default 3)",
    )
    demo.add_argument("--fast", action="store_true", help="no pauses: print the same figures at once")
    demo.set_defaults(handler=_cmd_demo)

    budget = sub.add_parser(
        "budget",
        parents=[common],
        help="everyday budgets: set, fund, show, list, freeze, unfreeze, close, delete (see also: budgets)",
        description="Everyday budget administration: create-or-set an allocation with caps, an overdraft "
        "limit and a recurring period; fund (repays debt first); show every unit of a scope; freeze, "
        "unfreeze, close, delete. On a local ledger these changes are not in the audit log. For the governance "
        "spec's audited operations (create that fails if the budget exists, fund with DEBIT or RESET, a "
        "--reason in the audit log, period_start/period_end) use 'cycles budgets'; both act on the same "
        "budgets.",
    )
    bsub = budget.add_subparsers(dest="action", required=True, metavar="ACTION")
    unit_help = "usd (default), tokens, credits, risk"
    for name, help_text in (
        ("set", "create a budget or change its allocation"),
        ("fund", "add funds (repays debt first)"),
    ):
        p = bsub.add_parser(name, parents=[common], help=help_text)
        p.add_argument("scope", help="budget id, e.g. tenant:acme or tenant:acme/workflow:run-42")
        p.add_argument("amount", help="e.g. 50 or 0.25 in usd (down to 0.00000001), 10000 in tokens")
        p.add_argument("--unit", default=None, help=unit_help)
        if name == "set":
            p.add_argument(
                "--overdraft-limit",
                metavar="AMOUNT",
                default=None,
                help="debt a commit may run up under ALLOW_WITH_OVERDRAFT (same unit)",
            )
            p.add_argument(
                "--max-tokens",
                type=_non_negative_int,
                default=None,
                metavar="N",
                help="cap: clamp model calls to this many tokens",
            )
            p.add_argument(
                "--allow-tool", action="append", default=[], metavar="NAME", help="cap: only these tools (repeatable)"
            )
            p.add_argument(
                "--deny-tool", action="append", default=[], metavar="NAME", help="cap: never these tools (repeatable)"
            )
            p.add_argument(
                "--period",
                default=None,
                metavar="PERIOD",
                help="make it recurring: hour, day, week, month, or a duration (90s, 15m, 12h, 7d); none stops it",
            )
            p.add_argument(
                "--timezone", default=None, metavar="ZONE", help="IANA time zone of calendar periods (default UTC)"
            )
            p.add_argument(
                "--rollover",
                default=None,
                type=str.upper,
                choices=["NONE", "CARRY_FORWARD", "CAP_AT_ALLOCATED"],
                help="what the unused part does at a period's end (default NONE)",
            )
    show = bsub.add_parser("show", parents=[common], help="one budget, in every unit it has")
    show.add_argument("scope", help="budget id, e.g. tenant:acme")
    show.add_argument("--unit", default=None, help="only this unit: " + unit_help.replace(" (default)", ""))
    lst = bsub.add_parser("list", parents=[common], help="all budgets, or a tenant's")
    lst.add_argument("--tenant", default=None, help="only this tenant's budgets")
    for name, help_text in (
        ("freeze", "refuse new reservations, commits and funding until unfrozen"),
        ("unfreeze", "make a frozen budget active again"),
        ("close", "close a budget for good"),
        ("delete", "delete a budget row (refused while reserved, or in debt unless --force)"),
    ):
        p = bsub.add_parser(name, parents=[common], help=help_text)
        p.add_argument("scope", help="budget id, e.g. tenant:acme")
        p.add_argument("--unit", default=None, help="only this unit (default: every unit the scope has)")
        if name == "delete":
            p.add_argument("--force", action="store_true", help="write off outstanding debt with the row")
    budget.set_defaults(handler=_cmd_budget)

    balances = sub.add_parser(
        "balances", parents=[common], help="balances of the budgets a subject draws from (give at least one level)"
    )
    for level in ("tenant", "workspace", "app", "workflow", "agent", "toolset"):
        balances.add_argument(f"--{level}", default=None, help=f"the subject's {level}")
    balances.set_defaults(handler=_cmd_balances)

    reservations = sub.add_parser("reservations", parents=[common], help="list reservations")
    reservations.add_argument("--tenant", default=None, help="only this tenant's reservations")
    reservations.add_argument("--workflow", default=None, help="only this workflow's")
    reservations.add_argument("--agent", default=None, help="only this agent's")
    reservations.add_argument(
        "--status",
        default=None,
        type=str.upper,
        choices=["ACTIVE", "COMMITTED", "RELEASED", "EXPIRED"],
        help="only this status (any case)",
    )
    reservations.add_argument(
        "--limit", type=_int_between(1, _MAX_LIST), default=50, help=f"at most this many (1-{_MAX_LIST}, default 50)"
    )
    reservations.set_defaults(handler=_cmd_reservations)

    sweep = sub.add_parser("sweep", parents=[common], help="expire abandoned reservations now (normally done lazily)")
    sweep.set_defaults(handler=_cmd_sweep)

    add_server_commands(sub, [common])
    from cycles.cli_admin import add_admin_commands  # the governance plane (tenants, keys, events, ...)
    from cycles.cli_policies import add_policy_commands  # named policies (/v1/admin/policies)
    from cycles.cli_quotas import add_quota_commands  # quota counters, the action kind registry
    from cycles.ops_cli import add_ops_commands  # shadow report, dashboard

    add_admin_commands(sub, [common])
    add_quota_commands(sub, [common])
    add_policy_commands(sub, [common])
    add_ops_commands(sub, [common])
    return parser


# ---- failures ------------------------------------------------------------------------------


def describe_failure(exc: BaseException) -> tuple[int, str]:
    """The exit status and the one line a failure prints."""
    from cycles.errors import CyclesError, InvalidRequest, UnitMismatch

    if isinstance(exc, UsageError):
        return EXIT_USAGE, f"error: {exc}"
    if isinstance(exc, CyclesError):
        status = EXIT_USAGE if isinstance(exc, (InvalidRequest, UnitMismatch)) else EXIT_FAILURE
        return status, f"error: {_one_line(str(exc))}"  # CODE: message (LEDGER_UNAVAILABLE: ... for that one)
    if isinstance(exc, CommandFailed):
        return EXIT_FAILURE, f"error: {_one_line(str(exc))}"
    if isinstance(exc, ImportError):
        return EXIT_FAILURE, f"error: {_one_line(str(exc))}"
    if _is_connection_failure(exc):
        text = _one_line(str(exc)).rstrip(".")
        return EXIT_FAILURE, f"error: LEDGER_UNAVAILABLE: {text}: check that it is running and reachable"
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return EXIT_FAILURE, f"error: {exc.strerror or exc}{where}"
    return EXIT_FAILURE, (
        f"error: unexpected {type(exc).__name__}: {_one_line(str(exc))} "
        "(a bug in cycles: please report it; CYCLES_DEBUG=1 shows the traceback)"
    )


def _is_connection_failure(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    redis_errors = sys.modules.get("redis.exceptions")  # only if a redis ledger or key store was opened
    if redis_errors is not None and isinstance(exc, (redis_errors.ConnectionError, redis_errors.TimeoutError)):
        return True
    httpx = sys.modules.get("httpx")  # only if a server was called (the governance commands use httpx)
    return httpx is not None and isinstance(exc, (httpx.NetworkError, httpx.TimeoutException))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return its exit status (``--help`` and ``--version`` exit 0 themselves)."""
    try:
        args = build_parser().parse_args(argv)
        code: int = args.handler(args)
        return code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`cycles budget list | head -1`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except SystemExit:
        raise
    except BaseException as exc:
        if os.environ.get("CYCLES_DEBUG") == "1":
            raise
        status, line = describe_failure(exc)
        print(line, file=sys.stderr)
        return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
