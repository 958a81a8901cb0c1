"""Fixtures for the dashboard tests: a real server over a fresh SQLite ledger."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cycles.server import create_app
from cycles.server.testing import ServerThread

ADMIN_KEY = "dashboard-admin-key-0123456789"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(ledger URL, server URL) of a server with the dashboard, admin key ``ADMIN_KEY``."""
    url = f"sqlite:///{tmp_path}/ledger.db"
    with ServerThread(create_app(url, admin_key=ADMIN_KEY, sweep_interval_s=0, access_log=False)) as srv:
        yield url, srv.url
