"""One MCP session, one run: its own workflow scope under the policy's subject, with the policy's
per-session budgets set on it when it starts and closed when it ends.

Stand-in for the core's run (``acy.run(subject, budgets=...)``): same shape (``id``, ``subject``,
``guard(action, estimate=...)``, async start/end), so the core run can replace it without touching
the gate. Settlement of every guarded call stays in the core guard.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Sequence
from typing import Any

import anyio

from cycles import Action, Amount, AsyncCycles, AsyncGuard, CyclesError, NotFound, Subject
from cycles.scopes import derive_scopes

__all__ = ["SessionRun", "session_id"]


def session_id(prefix: str = "mcp") -> str:
    return f"{prefix}-{secrets.token_hex(8)}"


class SessionRun:
    """Budgets of one session: ``subject`` is the policy subject with ``workflow=<session id>``."""

    def __init__(
        self,
        cycles: AsyncCycles,
        subject: Subject,
        budgets: Sequence[Amount] = (),
        *,
        run_id: str | None = None,
        keep_budgets: bool = False,
    ) -> None:
        self.cycles = cycles
        self.id = run_id or session_id()
        self.subject = subject.merged(workflow=self.id)
        self.scope = derive_scopes(self.subject)[-1]
        self.budgets = tuple(budgets)
        self.keep_budgets = keep_budgets
        self.started = False
        self._lock = anyio.Lock()

    async def start(self) -> SessionRun:
        """Set the session budgets (a resumed session whose budgets exist keeps what it spent)."""
        async with self._lock:
            if self.started:
                return self
            for amount in self.budgets:
                try:
                    await self.cycles.budgets.get(self.scope, unit=amount.unit)
                except NotFound:
                    await self.cycles.budgets.set(self.scope, amount)
            self.started = True
        return self

    def guard(self, action: Action, *, estimate: Amount, **options: Any) -> AsyncGuard:
        return self.cycles.guard(self.subject, action, estimate, **options)

    async def end(self) -> None:
        """Close the session budgets (kept when ``keep_budgets``), so nothing more is charged to them."""
        if not self.started or self.keep_budgets:
            return
        self.started = False
        for amount in self.budgets:
            with contextlib.suppress(CyclesError):  # already closed or gone: nothing left to protect
                await self.cycles.budgets.close(self.scope, unit=amount.unit)
