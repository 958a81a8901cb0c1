"""The package surface: what it exports, and what a missing extra tells the user."""

from __future__ import annotations

import importlib
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parents[2] / "examples" / "langgraph_support_bot.py"


def test_public_api() -> None:
    import cycles_langgraph

    assert sorted(cycles_langgraph.__all__) == [
        "CyclesCallbackHandler",
        "CyclesMiddleware",
        "SubjectLike",
        "guard_node",
        "per_run",
    ]


@pytest.mark.parametrize("framework", ["langgraph", "langchain", "langchain_core"])
def test_a_missing_framework_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch, framework: str) -> None:
    for name in [m for m in sys.modules if m == "cycles_langgraph" or m.startswith("cycles_langgraph.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, framework, None)  # what an uninstalled package looks like to import

    with pytest.raises(ImportError, match=r'pip install "cycles-langgraph\[langgraph\]"'):
        importlib.import_module("cycles_langgraph")


def test_the_support_bot_example_runs_offline(capsys: pytest.CaptureFixture[str]) -> None:
    runpy.run_path(str(EXAMPLE), run_name="__main__")

    out = capsys.readouterr().out
    assert "stopped" in out.lower()
