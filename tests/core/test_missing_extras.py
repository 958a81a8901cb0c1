"""Without an optional extra, every command and import that needs it names the exact ``pip install``.

Each case runs in a fresh interpreter whose import system refuses the extra's packages, as an
install without them would.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REDIS_URL

_PRELUDE = textwrap.dedent(
    """
    import sys

    BLOCKED = set(sys.argv[1].split(","))

    class _WithoutExtra:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, _WithoutExtra())
    """
)
_CLI = _PRELUDE + "from cycles.cli import main\nsys.exit(main(sys.argv[2:]))\n"


def _cli(blocked: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _CLI, blocked, *argv], capture_output=True, text=True, timeout=120)


def _code(blocked: str, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _PRELUDE + textwrap.dedent(code), blocked], capture_output=True, text=True, timeout=120
    )


SERVER = "starlette,uvicorn,httptools,uvloop"


@pytest.mark.parametrize(
    ("blocked", "argv", "extra"),
    [
        (SERVER, ["serve", "--port", "0", "--ledger", "memory://"], "server"),
        ("uvicorn", ["serve", "--port", "0", "--ledger", "memory://"], "server"),
        (SERVER, ["keys", "list", "--ledger", "sqlite:///{tmp}/k.db"], "server"),
        (SERVER, ["keys", "create", "--tenant", "a", "--ledger", "sqlite:///{tmp}/k.db"], "server"),
        (SERVER, ["tenants", "list", "--ledger", "sqlite:///{tmp}/g.db"], "server"),
        (SERVER, ["audit", "--ledger", "sqlite:///{tmp}/g.db"], "server"),
        (SERVER, ["dashboard", "--no-browser", "--port", "0", "--ledger", "sqlite:///{tmp}/g.db"], "server"),
        ("httpx", ["tenants", "list", "--ledger", "http://127.0.0.1:9", "--admin-key", "k"], "server"),
        ("redis", ["budget", "list", "--ledger", REDIS_URL], "redis"),
        ("redis", ["keys", "list", "--ledger", REDIS_URL], "redis"),
    ],
)
def test_a_command_names_the_pip_install_that_adds_its_extra(
    tmp_path: Path, blocked: str, argv: list[str], extra: str
) -> None:
    result = _cli(blocked, *(a.format(tmp=tmp_path) for a in argv))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert f"pip install 'cycles-core[{extra}]'" in result.stderr


def test_help_lists_every_command_without_the_extras() -> None:
    result = _cli(SERVER + ",redis,aiohttp,httpx,rich", "--help")
    assert result.returncode == 0
    assert "serve" in result.stdout and "keys" in result.stdout and "needs the server extra" in result.stdout


@pytest.mark.parametrize(
    ("blocked", "code", "extra"),
    [
        (SERVER, "import cycles.server", "server"),
        (SERVER, "from cycles.server import create_app", "server"),
        ("redis", "from cycles import Cycles; Cycles('redis://127.0.0.1:6379/0')", "redis"),
        ("redis", "from cycles import AsyncCycles; AsyncCycles('redis://127.0.0.1:6379/0')", "redis"),
        ("aiohttp", "from cycles import AsyncCycles; AsyncCycles('http://127.0.0.1:7878')", "http"),
    ],
)
def test_an_import_names_the_pip_install_that_adds_its_extra(blocked: str, code: str, extra: str) -> None:
    result = _code(blocked, code)
    assert result.returncode == 1
    assert f"pip install 'cycles-core[{extra}]'" in result.stderr.strip().splitlines()[-1]


def test_without_opentelemetry_adapters_and_annotated_steps_run_and_never_import_it() -> None:
    """The adapters annotate every step for OpenTelemetry; without the otel extra that must cost
    nothing but a dict: no import of opentelemetry, the same settlement."""
    result = _code(
        "opentelemetry",
        """
        from cycles import Cycles, Subject, usd
        from cycles.otel import current_trace_ids
        from cycles.pricing import register_price
        from cycles_langgraph import CyclesCallbackHandler
        from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
        from langchain_core.messages import AIMessage

        register_price("fake-model", input_per_mtok=100, output_per_mtok=400)
        usage = {"input_tokens": 1000, "output_tokens": 500, "total_tokens": 1500}

        class FakeChat(GenericFakeChatModel):
            model_name: str = "fake-model"  # what the handler prices the call with

        model = FakeChat(messages=iter([AIMessage("hi", usage_metadata=usage)]))
        with Cycles("memory://", heartbeat=False) as cy:
            cy.budgets.set("tenant:acme", usd(1))
            model.invoke("hi", config={"callbacks": [CyclesCallbackHandler(cy, Subject(tenant="acme"))]})
            assert cy.budgets.get("tenant:acme").spent == usd("0.30"), cy.budgets.get("tenant:acme")
        assert current_trace_ids() == {}
        assert not [m for m in sys.modules if m.startswith("opentelemetry")], "opentelemetry was imported"
        print("ok")
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
