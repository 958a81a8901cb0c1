"""Cycles for LangChain and LangGraph: budget every model call, tool call and graph node.

- ``CyclesCallbackHandler``: LangChain callbacks, for any runnable (``config={"callbacks": [...]}``).
- ``CyclesMiddleware``: LangChain v1 agents (``create_agent(..., middleware=[...])``).
- ``guard_node``: any ``StateGraph`` node; ``per_run`` gives each run (thread) its own budget.

The lifecycle (reserve, commit, release, retries, pricing, shadow mode) is the core's, ``cycles``.
"""

from __future__ import annotations

try:
    import langchain.agents  # noqa: F401
    import langchain_core  # noqa: F401
    import langgraph.graph  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised by test_missing_framework_names_the_extra
    raise ImportError(
        "cycles-langgraph needs LangGraph and LangChain, which are optional; install them with:\n"
        '    pip install "cycles-langgraph[langgraph]"'
    ) from exc

from cycles_langgraph._common import SubjectLike, per_run
from cycles_langgraph.callbacks import CyclesCallbackHandler
from cycles_langgraph.middleware import CyclesMiddleware
from cycles_langgraph.nodes import guard_node

__all__ = ["CyclesCallbackHandler", "CyclesMiddleware", "SubjectLike", "guard_node", "per_run"]
