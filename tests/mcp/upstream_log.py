"""The call log the test upstream servers keep: one JSON line per event, in the file ``UPSTREAM_LOG``
names (so a test can prove what reached the upstream and what it was answered)."""

from __future__ import annotations

import json
import os


def log_event(event: str, **fields: object) -> None:
    path = os.environ.get("UPSTREAM_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"tool": event, "args": fields}) + "\n")
