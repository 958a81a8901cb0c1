"""How every benchmark reports its targets: each figure next to its target, marked met or MISSED.

A benchmark never fails a test run (figures depend on the machine and its load); it says plainly
which targets this run met, so a missed one cannot pass unnoticed in a long table.
"""

from __future__ import annotations

__all__ = ["Targets"]


class Targets:
    """Collects ``check(what, figure, ok)`` results and prints them as one block."""

    def __init__(self) -> None:
        self.results: list[tuple[str, str, bool]] = []

    def check(self, what: str, figure: str, ok: bool) -> str:
        self.results.append((what, figure, ok))
        return "met" if ok else "MISSED"

    def report(self) -> None:
        if not self.results:
            return
        met = sum(ok for _, _, ok in self.results)
        print(f"\ntargets: {met} of {len(self.results)} met")
        for what, figure, ok in self.results:
            print(f"  {'met   ' if ok else 'MISSED'}  {what}: {figure}")
