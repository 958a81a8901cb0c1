"""``cycles-mcp proxy --check POLICY.toml``: what the policy does, tool by tool."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cycles.scopes import derive_scopes
from cycles_mcp.kinds import annotated_kind
from cycles_mcp.policy import Policy

__all__ = ["check_policy", "describe_policy"]


def describe_policy(policy: Policy, tools: Sequence[str] = (), kinds: Mapping[str, str | None] | None = None) -> str:
    """A report: the subject, the session budgets, each rule, then each known tool's verdict
    (``kinds``: the ``x-cycles-action-kind`` each upstream tool declares)."""
    lines = [f"policy {policy.source}: valid"]
    lines.append(f"  ledger:          {policy.ledger or '(default: $CYCLES_URL, else the embedded SQLite)'}")
    lines.append(f"  charged to:      {derive_scopes(policy.subject)[-1]}/workflow:<session>")
    budget = ", ".join(str(a) for a in policy.session_budget) or "none"
    lines.append(f"  session budget:  {budget}{' (kept after the session)' if policy.keep_session_budgets else ''}")
    lines.append(f"  deny:            {', '.join(policy.deny) or 'none'}")
    if policy.allow is not None:
        lines.append(f"  allow only:      {', '.join(policy.allow) or 'nothing'}")
    default = " + ".join(str(a) for a in policy.default_cost) or "none (unmatched tools are forwarded ungated)"
    lines.append(f"  default cost:    {default}")
    sampling = policy.sampling_match()
    lines.append(f"  sampling:        {sampling.describe()} (the upstream's requests of the client's model)")
    if policy.shadow:
        lines.append("  mode:            shadow (nothing is refused; would-deny decisions are recorded)")
    if policy.fail_open:
        lines.append("  ledger errors:   fail open (calls are forwarded unchecked)")
    names = list(dict.fromkeys([*tools, *(r.pattern for r in policy.tools if not any(c in r.pattern for c in "*?["))]))
    globs = [r for r in policy.tools if any(c in r.pattern for c in "*?[")]
    if globs:
        lines.append("  tool globs:")
        for rule in globs:
            what = "denied" if rule.denied else (" + ".join(str(a) for a in rule.cost) or "ungated")
            lines.append(f'    [tools."{rule.pattern}"]  {what}')
    if names:
        lines.append("  known tools:" if not tools else "  upstream tools:")
        width = max(len(n) for n in names)
        for name in names:
            match = policy.match(name, (kinds or {}).get(name))
            lines.append(f"    {name:<{width}}  {match.describe()}, kind {match.kind}")
    return "\n".join(lines)


async def check_policy(policy: Policy, upstream: tuple[Sequence[str] | None, str | None] | None = None) -> str:
    """Describe the policy; with an upstream (command or URL), list its tools and what each costs."""
    tools: list[str] = []
    kinds: dict[str, str | None] = {}
    if upstream is not None:
        from cycles_mcp.proxy import connect_upstream

        command, url = upstream
        async with connect_upstream(command, url) as client:
            cursor: str | None = None
            while True:
                page = await client.list_tools(cursor=cursor)
                tools.extend(t.name for t in page.tools)
                kinds.update((t.name, annotated_kind(t)) for t in page.tools)
                cursor = page.next_cursor
                if not cursor:
                    break
    return describe_policy(policy, tools, kinds)
