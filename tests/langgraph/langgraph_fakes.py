"""Fake models, replies and the ledger check for the adapter tests (imported next to conftest.py).

langchain-core's own ``GenericFakeChatModel`` with ``usage_metadata`` on each reply and a
``bind_tools`` (the fake has none) so ``create_agent`` accepts it. ``conftest.py`` registers prices
for ``fake-model`` so one reply of USAGE costs exactly CALL_COST.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage, UsageMetadata
from langchain_core.outputs import ChatResult
from langchain_core.runnables import Runnable
from pydantic import Field

from cycles import Cycles, usd

USAGE = UsageMetadata(input_tokens=1000, output_tokens=500, total_tokens=1500)
CALL_COST = usd("0.30")  # USAGE at $100 / $400 per million input / output tokens
# The fake reads its replies from one generator, which two threads may not advance at once
# ("generator already executing"): tests that share one model across threads take turns here.
_NEXT_REPLY = threading.Lock()


class FakeChat(GenericFakeChatModel):
    """The fake chat model, plus ``bind_tools`` and a record of what each call was sent."""

    model_name: str = "fake-model"
    max_tokens: int | None = None  # the model's own setting, as real chat models have
    calls: list[dict[str, Any]] = Field(default_factory=list)

    def bind_tools(self, tools: Any, *, tool_choice: Any = None, **kwargs: Any) -> Runnable[Any, BaseMessage]:
        return self.bind(**kwargs)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        self.calls.append(kwargs)
        with _NEXT_REPLY:
            return super()._generate(messages, stop, run_manager, **kwargs)


def reply(text: str = "", *, tool: str | None = None, **args: Any) -> AIMessage:
    """A fresh AIMessage with USAGE; with ``tool`` it calls that tool with ``args``."""
    calls = [{"name": tool, "args": args, "id": f"call_{uuid.uuid4().hex[:12]}"}] if tool else []
    return AIMessage(content=text, tool_calls=calls, usage_metadata=USAGE.copy())


def scripted(*messages: AIMessage | Callable[[], AIMessage], max_tokens: int | None = None) -> FakeChat:
    """A model answering with ``messages`` in order; a callable as the last one repeats forever."""

    def gen() -> Iterator[AIMessage]:
        for m in messages:
            if isinstance(m, AIMessage):
                yield m
            else:
                while True:
                    yield m()

    return FakeChat(messages=gen(), max_tokens=max_tokens)


def runaway(tool: str = "search") -> FakeChat:
    """A model that calls ``tool`` forever: the agent loop never ends on its own."""
    return scripted(lambda: reply(tool=tool, q="refund policy"))


def spent(cy: Cycles, scope: str) -> int:
    """What ``scope`` has spent, checking nothing is left reserved there."""
    balance = cy.budgets.get(scope)
    assert balance.reserved is None or balance.reserved.amount == 0, f"{scope}: a reservation was left open"
    return balance.spent.amount if balance.spent else 0
