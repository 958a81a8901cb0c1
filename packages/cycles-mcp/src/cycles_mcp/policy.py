"""The policy file: who pays, what each tool costs, what is never forwarded, what a session may spend.

```toml
ledger = "sqlite:///ledger.db"         # optional; default as Cycles()
tenant = "acme"                        # subject of every call (workspace/app/agent/toolset optional)
deny = ["drop_*", "delete_*"]          # never forwarded
default_cost = { risk_points = 1 }     # tools no [tools."glob"] matches; omit to leave them ungated
session_budget = [{ risk_points = 60 }, { usd = 0.50 }]   # per MCP session, optional

[tools."deploy*"]
cost = { risk_points = 50 }

[sampling]                             # a sampling request the upstream makes of the client
cost = { usd = 0.02 }
```

A tool name is matched, in this order: ``deny`` (refused), an exact ``[tools."name"]``, then the
most specific matching glob (most literal characters; the first written wins a tie), then
``default_cost``. ``cost = {}`` or ``gate = false`` in a tool table leaves that tool ungated.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from cycles import Amount, InvalidRequest, Subject, credits, risk_points, tokens, usd
from cycles.models import CommitOveragePolicy
from cycles_mcp.kinds import ANNOTATION, is_undeclared_custom, kind_for_tool

__all__ = ["Match", "Policy", "PolicyError", "ToolRule", "load_policy", "parse_policy"]

_UNITS = {"usd": usd, "tokens": tokens, "credits": credits, "risk_points": risk_points}
_SUBJECT_KEYS = ("tenant", "workspace", "app", "agent", "toolset")
_TOP_KEYS = {
    "ledger",
    *_SUBJECT_KEYS,
    "dimensions",
    "deny",
    "allow",
    "default_cost",
    "session_budget",
    "keep_session_budgets",
    "tools",
    "action_kind",
    "ttl_ms",
    "overage_policy",
    "shadow",
    "fail_open",
    "on_failure",
    "sampling",
}
_TOOL_KEYS = {"cost", "gate", "deny", "kind", "on_failure"}
_ON_FAILURE = ("release", "charge")
SAMPLING = "sampling/createMessage"  #: the name a relayed sampling request is gated and recorded under
SAMPLING_KIND = "llm.completion"


class PolicyError(InvalidRequest):
    """A policy file that cannot be used, with the file and key that is wrong (one line)."""


@dataclass(frozen=True, slots=True)
class ToolRule:
    pattern: str
    cost: tuple[Amount, ...]  #: empty: the tool is forwarded ungated
    denied: bool = False
    kind: str | None = None
    on_failure: str | None = None


@dataclass(frozen=True, slots=True)
class Match:
    """What the policy says about one tool name."""

    tool: str
    denied: bool
    cost: tuple[Amount, ...]
    rule: str  #: the deny glob, tool table, or "default_cost" that decided; "" when nothing matched
    kind: str
    on_failure: str = "release"  #: a failed call: "release" its reservation, or "charge" it (tools that bill anyway)

    @property
    def gated(self) -> bool:
        return not self.denied and bool(self.cost)

    def describe(self) -> str:
        if self.denied:
            return f"denied (by {self.rule!r})"
        if not self.cost:
            return "forwarded ungated" + (f" (by {self.rule})" if self.rule else "")
        return " + ".join(str(a) for a in self.cost) + f" (by {self.rule})"


@dataclass(frozen=True, slots=True)
class Policy:
    subject: Subject
    ledger: str | None = None
    deny: tuple[str, ...] = ()
    allow: tuple[str, ...] | None = None  #: when set, only these globs are forwarded
    default_cost: tuple[Amount, ...] = ()
    session_budget: tuple[Amount, ...] = ()
    keep_session_budgets: bool = False
    tools: tuple[ToolRule, ...] = ()
    action_kind: str | None = None  #: None: each tool's kind by the spec's MCP prefixes (cycles_mcp.kinds)
    ttl_ms: int | None = None  #: None: 60 s in the proxy (kept alive by heartbeat), 10 min for hooks
    overage_policy: CommitOveragePolicy = CommitOveragePolicy.ALLOW_IF_AVAILABLE
    shadow: bool = False
    fail_open: bool = False
    on_failure: str = "release"
    sampling: ToolRule | None = None  #: ``[sampling]``: what a sampling request the upstream makes costs
    source: str = "<policy>"
    _exact: dict[str, ToolRule] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for rule in self.tools:
            if not _is_glob(rule.pattern):
                self._exact.setdefault(rule.pattern, rule)

    def match(self, tool: str, annotated: str | None = None) -> Match:
        """What the policy does with ``tool``; ``annotated`` is the kind the tool's definition
        declares (``x-cycles-action-kind``), below the kinds the policy names (``cycles_mcp.kinds``)."""
        for pattern in self.deny:
            if fnmatchcase(tool, pattern):
                return Match(tool, True, (), pattern, self.kind_of(tool, annotated))
        if self.allow is not None and not any(fnmatchcase(tool, p) for p in self.allow):
            return Match(tool, True, (), "allow (not listed)", self.kind_of(tool, annotated))
        rule = self._exact.get(tool) or _most_specific(tool, self.tools)
        kind = (rule.kind if rule is not None else None) or self.kind_of(tool, annotated)
        from_annotation = annotated is not None and kind == annotated and (rule is None or not rule.kind)
        if from_annotation and annotated is not None and is_undeclared_custom(annotated):  # the spec's rule
            why = f"its {ANNOTATION} {annotated!r} is an undeclared custom.* kind: INVALID_REQUEST"
            return Match(tool, True, (), why, kind)
        if rule is not None:
            where = f'[tools."{rule.pattern}"]'
            if rule.denied:
                return Match(tool, True, (), where, kind)
            return Match(tool, False, rule.cost, where, kind, rule.on_failure or self.on_failure)
        if self.default_cost:
            return Match(tool, False, self.default_cost, "default_cost", kind, self.on_failure)
        return Match(tool, False, (), "", kind)

    def sampling_match(self) -> Match:
        """What the policy does with a sampling request the upstream makes of the client: an LLM
        call on the client's model, ``llm.completion`` unless ``[sampling]`` names a kind; relayed
        ungated when ``[sampling]`` gives no cost."""
        rule = self.sampling
        kind = (rule.kind if rule is not None else None) or SAMPLING_KIND
        if rule is None:
            return Match(SAMPLING, False, (), "", kind)
        if rule.denied:
            return Match(SAMPLING, True, (), "[sampling]", kind)
        return Match(SAMPLING, False, rule.cost, "[sampling]", kind, rule.on_failure or self.on_failure)

    def kind_of(self, tool: str, annotated: str | None = None) -> str:
        """The policy's ``action_kind`` if it names one, else the tool's annotated kind, else the
        kind the spec's MCP prefixes give."""
        return self.action_kind or annotated or kind_for_tool(tool)


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _most_specific(tool: str, rules: Iterable[ToolRule]) -> ToolRule | None:
    best: ToolRule | None = None
    best_score = -1
    for rule in rules:
        if _is_glob(rule.pattern) and fnmatchcase(tool, rule.pattern):
            score = sum(1 for c in rule.pattern if c not in "*?[]")
            if score > best_score:
                best, best_score = rule, score
    return best


# ---- parsing ---------------------------------------------------------------------------------


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file; any problem is one ``PolicyError`` naming the file and key.

    A relative SQLite ledger path (``sqlite:///ledger.db``) is relative to the policy file, not to
    whatever directory the MCP client starts the proxy in."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"{p}: cannot read the policy file ({exc.strerror or exc})") from None
    policy = parse_policy(text, source=str(p))
    ledger = policy.ledger
    if ledger is not None and ledger.startswith("sqlite:///") and not ledger.startswith("sqlite:////"):
        where = (p.resolve().parent / ledger[len("sqlite:///") :]).as_posix()
        policy = replace(policy, ledger=f"sqlite:///{where}")
    return policy


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{source}: not valid TOML: {exc}") from None
    return _Parser(source).policy(data)


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, message: str) -> PolicyError:
        return PolicyError(f"{self.source}: {where}: {message}")

    def policy(self, data: Mapping[str, Any]) -> Policy:
        unknown = sorted(set(data) - _TOP_KEYS)
        if unknown:
            raise self.fail(unknown[0], f"unknown key (known: {', '.join(sorted(_TOP_KEYS))})")
        levels = {k: self.string(data, k) for k in _SUBJECT_KEYS if k in data}
        if not levels:
            raise self.fail(
                "tenant", "the policy needs a subject: tenant (and optionally workspace, app, agent, toolset)"
            )
        dims = data.get("dimensions")
        if dims is not None and (not isinstance(dims, dict) or not all(isinstance(v, str) for v in dims.values())):
            raise self.fail("dimensions", "must be a table of strings")
        try:
            subject = Subject(**levels, dimensions=dims)
        except ValueError as exc:
            raise self.fail("tenant", _first_line(exc)) from None
        ttl = data.get("ttl_ms")
        if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool) or not 1000 <= ttl <= 86_400_000):
            raise self.fail("ttl_ms", "must be an integer between 1000 and 86400000")
        overage = data.get("overage_policy", "ALLOW_IF_AVAILABLE")
        try:
            overage_policy = CommitOveragePolicy(overage)
        except ValueError:
            names = ", ".join(p.value for p in CommitOveragePolicy)
            raise self.fail("overage_policy", f"must be one of {names}") from None
        ledger = data.get("ledger")
        if ledger is not None and (not isinstance(ledger, str) or not ledger):
            raise self.fail("ledger", "must be a ledger URL string such as sqlite:///ledger.db")
        tools_table = data.get("tools", {})
        if not isinstance(tools_table, dict):
            raise self.fail("tools", 'must be tables such as [tools."deploy*"]')
        allow = data.get("allow")
        return Policy(
            subject=subject,
            ledger=ledger,
            deny=self.globs(data, "deny"),
            allow=None if allow is None else self.globs(data, "allow"),
            default_cost=self.cost(data.get("default_cost"), "default_cost"),
            session_budget=self.budget(data.get("session_budget")),
            keep_session_budgets=self.flag(data, "keep_session_budgets"),
            tools=tuple(self.tool(name, spec) for name, spec in tools_table.items()),
            action_kind=self.kind(data["action_kind"], "action_kind") if "action_kind" in data else None,
            ttl_ms=ttl,
            overage_policy=overage_policy,
            shadow=self.flag(data, "shadow"),
            fail_open=self.flag(data, "fail_open"),
            on_failure=self.on_failure(data.get("on_failure", "release"), "on_failure"),
            sampling=self.tool("sampling", data["sampling"], "[sampling]") if "sampling" in data else None,
            source=self.source,
        )

    def string(self, data: Mapping[str, Any], key: str) -> str:
        value = data[key]
        if not isinstance(value, str) or not value or len(value) > 128:
            raise self.fail(key, "must be a non-empty string of at most 128 characters")
        return value

    def flag(self, data: Mapping[str, Any], key: str) -> bool:
        value = data.get(key, False)
        if not isinstance(value, bool):
            raise self.fail(key, "must be true or false")
        return value

    def kind(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not 1 <= len(value) <= 64:
            raise self.fail(where, "must be an action kind string of 1 to 64 characters, e.g. message.email.send")
        return value

    def on_failure(self, value: Any, where: str) -> str:
        if value not in _ON_FAILURE:
            raise self.fail(where, 'must be "release" (a failed call is not charged) or "charge"')
        return str(value)

    def globs(self, data: Mapping[str, Any], key: str) -> tuple[str, ...]:
        value = data.get(key, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(key, 'must be a list of tool-name globs such as ["drop_*"]')
        return tuple(value)

    def cost(self, value: Any, where: str) -> tuple[Amount, ...]:
        if value is None:
            return ()
        if not isinstance(value, dict):
            raise self.fail(where, "must be a table such as { risk_points = 5 } or { usd = 0.01 }")
        amounts: list[Amount] = []
        for unit, number in value.items():
            make = _UNITS.get(unit)
            if make is None:
                raise self.fail(f"{where}.{unit}", f"unknown unit (known: {', '.join(_UNITS)})")
            if isinstance(number, bool) or not isinstance(number, int | float):
                raise self.fail(f"{where}.{unit}", "must be a number")
            if unit != "usd" and not isinstance(number, int):
                raise self.fail(f"{where}.{unit}", f"{unit} are whole numbers")
            if number < 0:
                raise self.fail(f"{where}.{unit}", "must not be negative")
            try:
                amounts.append(usd(number) if unit == "usd" else make(int(number)))
            except (ValueError, InvalidRequest) as exc:
                raise self.fail(f"{where}.{unit}", _first_line(exc)) from None
        return tuple(amounts)

    def budget(self, value: Any) -> tuple[Amount, ...]:
        if value is None:
            return ()
        items: Sequence[Any] = value if isinstance(value, list) else [value]
        amounts: list[Amount] = []
        for i, item in enumerate(items):
            amounts.extend(self.cost(item, f"session_budget[{i}]"))
        units = [a.unit for a in amounts]
        if len(units) != len(set(units)):
            raise self.fail("session_budget", "names the same unit twice")
        return tuple(amounts)

    def tool(self, name: str, spec: Any, where: str | None = None) -> ToolRule:
        where = where or f'tools."{name}"'
        if not isinstance(spec, dict):
            raise self.fail(where, "must be a table with cost = { ... }")
        unknown = sorted(set(spec) - _TOOL_KEYS)
        if unknown:
            raise self.fail(f"{where}.{unknown[0]}", f"unknown key (known: {', '.join(sorted(_TOOL_KEYS))})")
        gate = self.flag(spec, "gate") if "gate" in spec else True
        cost = self.cost(spec.get("cost"), f"{where}.cost") if gate else ()
        if gate and "cost" not in spec and not self.flag(spec, "deny"):
            raise self.fail(where, "needs cost = { ... } (or gate = false to forward it ungated, deny = true)")
        kind = self.kind(spec["kind"], f"{where}.kind") if "kind" in spec else None
        on_failure = self.on_failure(spec["on_failure"], f"{where}.on_failure") if "on_failure" in spec else None
        return ToolRule(name, cost, denied=self.flag(spec, "deny"), kind=kind, on_failure=on_failure)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
