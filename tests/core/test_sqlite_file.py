"""What the SQLite ledger does with the file it is given: marks its own (application_id,
user_version), opens and migrates ledgers written before the marker, refuses anything else untouched."""

from __future__ import annotations

import hashlib
import multiprocessing
import sqlite3
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from cycles import Cycles, LedgerUnavailable, usd
from cycles.errors import InvalidRequest
from cycles.ledger.sqlite import APPLICATION_ID, SCHEMA_VERSION


def _pragmas(path: Path) -> tuple[int, int, str]:
    with sqlite3.connect(path) as db:
        return (
            db.execute("PRAGMA application_id").fetchone()[0],
            db.execute("PRAGMA user_version").fetchone()[0],
            db.execute("PRAGMA journal_mode").fetchone()[0],
        )


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_new_ledger_is_marked_as_ours(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    with Cycles(f"sqlite:///{path}") as cy:
        cy.budgets.set("tenant:a", usd(1))
    assert _pragmas(path) == (APPLICATION_ID, SCHEMA_VERSION, "wal")


def test_an_existing_empty_file_becomes_a_ledger(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    path.touch()
    with Cycles(f"sqlite:///{path}") as cy:
        cy.budgets.set("tenant:a", usd(1))
    assert _pragmas(path)[:2] == (APPLICATION_ID, SCHEMA_VERSION)


def test_a_ledger_written_before_the_marker_opens_with_its_data_and_gets_marked(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with Cycles(f"sqlite:///{path}") as cy:
        cy.budgets.set("tenant:a", usd(7))
    with sqlite3.connect(path) as db:  # as the first releases left it: tables and meta, no marker
        db.execute("PRAGMA application_id=0")
        db.execute("PRAGMA user_version=0")
    db.close()
    assert _pragmas(path)[:2] == (0, 0)
    with Cycles(f"sqlite:///{path}") as cy:
        assert cy.budgets.get("tenant:a").allocated == usd(7)
    assert _pragmas(path)[:2] == (APPLICATION_ID, SCHEMA_VERSION)


def test_a_ledger_from_a_newer_cycles_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    Cycles(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    before = _digest(path)
    with pytest.raises(InvalidRequest, match="newer Cycles"):
        Cycles(f"sqlite:///{path}")
    assert _digest(path) == before


@pytest.mark.parametrize(
    "setup",
    [
        ["CREATE TABLE albums (id INTEGER PRIMARY KEY, name TEXT)", "INSERT INTO albums (name) VALUES ('x')"],
        ["PRAGMA application_id=1196444237"],  # another program's marker, no tables yet
        ["CREATE TABLE budgets (x)", "CREATE TABLE notes (y)"],  # a table name we use, not our ledger
    ],
)
def test_another_programs_database_is_refused_and_left_untouched(tmp_path: Path, setup: list[str]) -> None:
    path = tmp_path / "theirs.db"
    with sqlite3.connect(path) as db:
        for statement in setup:
            db.execute(statement)
    db.close()
    before, pragmas = _digest(path), _pragmas(path)
    with pytest.raises(InvalidRequest, match="another program's SQLite database"):
        Cycles(f"sqlite:///{path}")
    assert _digest(path) == before and _pragmas(path) == pragmas  # not even switched to WAL
    assert not (tmp_path / "theirs.db.lock").exists()


def test_a_file_that_is_not_a_database_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("shopping list\n" * 200)
    before = _digest(path)
    with pytest.raises(LedgerUnavailable, match="not a readable SQLite database"):
        Cycles(f"sqlite:///{path}")
    assert _digest(path) == before


def _open_and_fund(url: str) -> int:
    with Cycles(url) as cy:
        cy.budgets.set("tenant:a", usd(1))
        allocated = cy.budgets.get("tenant:a").allocated
        assert allocated is not None
        return allocated.amount


def test_processes_racing_to_create_the_ledger_all_succeed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/race.db"
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert list(pool.map(_open_and_fund, [url] * 8)) == [usd(1).amount] * 8
    assert _pragmas(tmp_path / "race.db")[:2] == (APPLICATION_ID, SCHEMA_VERSION)
