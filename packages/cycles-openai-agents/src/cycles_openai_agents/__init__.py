"""Cycles for the OpenAI Agents SDK: reserve before every model and tool call, commit what it cost.

``CyclesRunHooks`` does the accounting from the SDK's run hooks and supplies the input and tool
guardrails; ``CyclesModel`` wraps a model for what hooks cannot do (caps, a graceful stop).
"""

from __future__ import annotations

try:
    import agents as _agents

    _agents.RunHooks  # noqa: B018 - a different top-level "agents" package would pass the import
except (ImportError, AttributeError) as exc:  # pragma: no cover - exercised by a test that hides the SDK
    raise ImportError(
        "cycles_openai_agents needs the OpenAI Agents SDK (openai-agents>=0.24); install it with: "
        'pip install "cycles-openai-agents[openai-agents]"'
    ) from exc

from cycles_openai_agents.hooks import CyclesRunHooks, OnExhausted, OnToolDenied
from cycles_openai_agents.model import CyclesModel

__all__ = ["CyclesModel", "CyclesRunHooks", "OnExhausted", "OnToolDenied"]
