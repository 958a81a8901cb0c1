"""Structured access log: one JSON object per request on the ``cycles.server.access`` logger.

What is logged is chosen field by field, never copied from headers or bodies, so no API key or
admin key can reach the log. The query string is left out too: a key pasted into a URL by
mistake must not end up on disk.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

__all__ = ["ACCESS_LOGGER", "AUDIT_LOGGER", "access_record", "configure_logging"]

ACCESS_LOGGER = logging.getLogger("cycles.server.access")
AUDIT_LOGGER = logging.getLogger("cycles.server.audit")


def access_record(
    *,
    request_id: str,
    trace_id: str,
    method: str,
    path: str,
    route: str,
    status: int,
    duration_s: float,
    tenant: str | None,
    key_id: str | None,
    actor: str,
    error: str | None,
    client: str | None,
) -> str:
    record: dict[str, Any] = {
        "ts": round(time.time(), 3),
        "request_id": request_id,
        "trace_id": trace_id,
        "method": method,
        "path": path if len(path) <= 256 else path[:253] + "...",
        "route": route,
        "status": status,
        "duration_ms": round(duration_s * 1000, 3),
        "actor": actor,
    }
    if tenant is not None:
        record["tenant"] = tenant
    if key_id is not None:
        record["key_id"] = key_id
    if error is not None:
        record["error"] = error
    if client is not None:
        record["client"] = client
    return json.dumps(record, separators=(",", ":"))


class _JsonLines(logging.Formatter):
    """Access records are already JSON; anything else is wrapped into one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name == ACCESS_LOGGER.name:
            return record.getMessage()
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        extra = getattr(record, "cycles", None)
        if isinstance(extra, dict):
            out.update(extra)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"), default=str)


def configure_logging(level: str = "info") -> None:
    """Send the server's logs to stderr as JSON lines (used by ``cycles serve``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonLines())
    root = logging.getLogger("cycles")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
