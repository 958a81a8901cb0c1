"""Prometheus text-format metrics, kept by hand: a few counters and histograms need no library.

Labels come from closed sets (route templates, protocol codes, decisions), never from tenants or
request data, so the series count stays bounded whatever clients send. Values are per process:
with ``--workers N`` each worker reports its own, as with any multi-process Python exporter.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable

__all__ = ["Metrics"]

# Latency buckets (seconds): sub-millisecond ledger calls up to the 50 ms p99 target and beyond.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    inner = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


class Counter:
    def __init__(self, name: str, help_text: str, labels: tuple[str, ...]) -> None:
        self.name, self.help, self.label_names = name, help_text, labels
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: str, by: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + by

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        for labels, value in sorted(self.values.items()):
            yield f"{self.name}{_labels(self.label_names, labels)} {_num(value)}"


class Histogram:
    def __init__(self, name: str, help_text: str, labels: tuple[str, ...], buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.label_names, self.buckets = name, help_text, labels, buckets
        # per label set: [count per bucket (non-cumulative, +Inf last)], sum
        self.values: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}

    def observe(self, value: float, *labels: str) -> None:
        entry = self.values.get(labels)
        if entry is None:
            entry = self.values[labels] = ([0] * (len(self.buckets) + 1), [0.0])
        entry[0][bisect_left(self.buckets, value)] += 1
        entry[1][0] += value

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        names = (*self.label_names, "le")
        for labels, (counts, total) in sorted(self.values.items()):
            running = 0
            for bound, count in zip((*self.buckets, float("inf")), counts, strict=True):
                running += count
                le = "+Inf" if bound == float("inf") else _num(bound)
                yield f"{self.name}_bucket{_labels(names, (*labels, le))} {running}"
            yield f"{self.name}_sum{_labels(self.label_names, labels)} {total[0]!r}"
            yield f"{self.name}_count{_labels(self.label_names, labels)} {running}"


class Metrics:
    def __init__(self) -> None:
        self.started = time.time()
        self.requests = Counter(
            "cycles_http_requests_total",
            "HTTP requests by route template, method and status.",
            ("route", "method", "status"),
        )
        self.latency = Histogram(
            "cycles_http_request_duration_seconds",
            "Time from request to response, by route template.",
            ("route",),
            LATENCY_BUCKETS,
        )
        self.ledger_latency = Histogram(
            "cycles_ledger_operation_duration_seconds",
            "Time spent in the ledger, by operation.",
            ("operation",),
            LATENCY_BUCKETS,
        )
        self.decisions = Counter(
            "cycles_decisions_total",
            "Budget decisions of reserve, dry-run reserve and decide, by decision and reason "
            "(a live reserve denied with 409 counts as DENY with the error code as reason).",
            ("operation", "decision", "reason"),
        )
        self.over_limit = Counter(
            "cycles_scope_over_limit_total",
            "Scopes reported over their overdraft limit after a commit or event (once per such balance).",
            (),
        )
        self.auth_failures = Counter("cycles_auth_failures_total", "Requests refused with 401.", ("header",))
        self.active_reservations: int | None = None

    def render(self) -> str:
        lines: list[str] = [
            "# HELP cycles_server_start_time_seconds Unix time the server process started.",
            "# TYPE cycles_server_start_time_seconds gauge",
            f"cycles_server_start_time_seconds {self.started!r}",
        ]
        for metric in (
            self.requests,
            self.latency,
            self.ledger_latency,
            self.decisions,
            self.over_limit,
            self.auth_failures,
        ):
            lines.extend(metric.render())
        if self.active_reservations is not None:
            lines += [
                "# HELP cycles_active_reservations Reservations in the ledger that are ACTIVE "
                "(the ledger's maintained count, read at most every few seconds; absent on Redis).",
                "# TYPE cycles_active_reservations gauge",
                f"cycles_active_reservations {self.active_reservations}",
            ]
        return "\n".join(lines) + "\n"
