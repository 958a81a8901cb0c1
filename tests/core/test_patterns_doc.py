"""Every example in docs/patterns.md runs as written (each block on its own, in a fresh namespace)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "patterns.md"
_BLOCK = re.compile(r"^## (?P<title>.+?)$.*?^```python\n(?P<code>.*?)^```$", re.S | re.M)


def _examples() -> list[tuple[str, str]]:
    return [(m["title"], m["code"]) for m in _BLOCK.finditer(DOC.read_text())]


def test_the_doc_has_the_patterns_the_issue_asks_for() -> None:
    titles = [title for title, _ in _examples()]
    assert titles == [
        "Tenant isolation",
        "Per-workflow caps",
        "Per-run budget with graceful degradation to a cheaper model",
        "Shadow rollout",
        "Tokens and dollars together",
        "A shared pool with priorities",
        "Recurring daily budget",
        "Quota of emails per run",
    ]


@pytest.mark.parametrize(("title", "code"), _examples(), ids=[t for t, _ in _examples()])
def test_pattern_runs(title: str, code: str) -> None:
    exec(compile(code, f"{DOC.name}: {title}", "exec"), {"__name__": "__pattern__"})
