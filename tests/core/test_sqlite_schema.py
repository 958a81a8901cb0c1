"""SQLite schema versions: a file from before the kv table (schema 1) is upgraded in place; a file
from a newer Cycles is refused rather than half understood."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from cycles import Cycles, InvalidRequest, tokens
from cycles.ledger.sqlite import SCHEMA_VERSION


def _version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])


def test_an_older_file_is_upgraded_and_keeps_its_budgets(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with Cycles(f"sqlite:///{path}") as cy:
        cy.budgets.set("tenant:acme", tokens(100))
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE kv")
        db.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
        db.execute("PRAGMA user_version=1")
    with Cycles(f"sqlite:///{path}") as cy:
        assert cy.budgets.get("tenant:acme").allocated == tokens(100)
        cy.budgets.set("tenant:acme", tokens(100), period="day")
    assert _version(path) == SCHEMA_VERSION == 3


def test_a_file_from_a_newer_cycles_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    Cycles(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
        db.execute("PRAGMA user_version=99")  # what a newer Cycles stamps on the file
    with pytest.raises(InvalidRequest, match="newer Cycles"):
        Cycles(f"sqlite:///{path}")
