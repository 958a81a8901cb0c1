"""``cycles keys`` and ``cycles serve`` argument handling (the server itself runs in other tests)."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import pytest

from cycles.cli import add_server_commands
from cycles.server.cli import main
from cycles.server.keys import open_key_store


def test_keys_create_prints_the_key_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/ledger.db"
    assert main(["keys", "--ledger", url, "create", "--tenant", "acme", "--name", "ci"]) == 0
    out, err = capsys.readouterr()
    api_key = out.strip()
    assert api_key.startswith("cyc_") and "\n" not in api_key
    assert api_key not in err and "not shown again" in err

    async def verify() -> str | None:
        store = open_key_store(url)
        try:
            info = await store.verify(api_key)
            return info.tenant if info else None
        finally:
            await store.aclose()

    assert asyncio.run(verify()) == "acme"

    assert main(["--ledger", url, "keys", "list", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["tenant"] == "acme" and listed["status"] == "ACTIVE"
    assert api_key not in json.dumps(listed)

    assert main(["keys", "revoke", listed["key_id"], "--ledger", url]) == 0  # either position
    capsys.readouterr()
    assert asyncio.run(verify()) is None
    assert main(["keys", "list", "--ledger", url]) == 0
    assert "revoked" in capsys.readouterr().out


def test_keys_errors_are_one_line_with_the_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/ledger.db"
    assert main(["keys", "--ledger", url, "create", "--tenant", "bad/tenant"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "tenant" in err and err.count("\n") == 1
    assert main(["keys", "--ledger", url, "revoke", "0123456789abcdef"]) == 1
    assert capsys.readouterr().err.startswith("error: NOT_FOUND: ")
    assert main(["keys", "--ledger", "ftp://elsewhere", "list"]) == 2
    assert "cannot keep API keys" in capsys.readouterr().err
    assert main(["keys", "--ledger", "http://elsewhere", "list"]) == 2  # a server's keys need its admin key
    assert "--admin-key" in capsys.readouterr().err


def test_serve_refuses_workers_over_memory(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--ledger", "memory://", "--workers", "2"]) == 2
    assert "shared ledger" in capsys.readouterr().err


def test_serve_reports_a_bad_ledger_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--ledger", "ftp://nowhere", "--port", "0"]) == 2
    assert "unsupported ledger URL" in capsys.readouterr().err


def test_commands_plug_into_a_parser() -> None:
    parser = argparse.ArgumentParser(prog="cycles")
    add_server_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--port", "9000", "--host", "0.0.0.0", "--ledger", "memory://"])
    assert (args.port, args.host, args.workers, args.ledger) == (9000, "0.0.0.0", 1, "memory://")
    args = parser.parse_args(["keys", "create", "--tenant", "acme"])
    assert args.handler.__name__ == "cmd_keys_create"
