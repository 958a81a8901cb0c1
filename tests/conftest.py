"""Shared test configuration: service URLs and the ledger invariant check."""

from __future__ import annotations

import os

REDIS_URL = os.environ.get("CYCLES_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
