"""Cycles for MCP: budget and action authority for every MCP tool call, with one config change.

- ``cycles-mcp proxy --policy POLICY.toml -- UPSTREAM ...``: a gating proxy (``ProxyServer``)
- ``cycles-mcp serve``: the cooperative server with the nine ``cycles_*`` tools (``create_server``)
- ``cycles-mcp hook pre|post|failure|session-start|session-end``: the same policy from Claude Code hooks
"""

from cycles_mcp.gate import Admission, Gate, ToolFailed
from cycles_mcp.policy import Match, Policy, PolicyError, ToolRule, load_policy, parse_policy
from cycles_mcp.proxy import ProxyServer, connect_upstream, open_proxy
from cycles_mcp.server import TOOL_NAMES, create_server

__version__ = "0.1.0"

__all__ = [
    "TOOL_NAMES",
    "Admission",
    "Gate",
    "Match",
    "Policy",
    "PolicyError",
    "ProxyServer",
    "ToolFailed",
    "ToolRule",
    "__version__",
    "connect_upstream",
    "create_server",
    "load_policy",
    "open_proxy",
    "parse_policy",
]
