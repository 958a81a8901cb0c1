"""The SDK's in-memory exporters behind ``cycles.otel.instrument``, shared by the OTel tests of the
core and of every adapter (each adapter's environment has the SDK)."""

from __future__ import annotations

import builtins
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import cycles.otel


class Telemetry:
    def __init__(self) -> None:
        # CrewAI's tests run with OTEL_SDK_DISABLED=true (to keep CrewAI's own telemetry off), which
        # would make these providers no-ops too: they are the test's, so they ignore it.
        disabled = os.environ.pop("OTEL_SDK_DISABLED", None)
        try:
            self.spans = InMemorySpanExporter()
            self.tracer_provider = TracerProvider()
            self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
            self.reader = InMemoryMetricReader()
            self.meter_provider = MeterProvider(metric_readers=[self.reader])
        finally:
            if disabled is not None:
                os.environ["OTEL_SDK_DISABLED"] = disabled

    def finished(self, name: str | None = None) -> list[Any]:
        return [s for s in self.spans.get_finished_spans() if name is None or s.name == name]

    def ancestors(self, span: Any) -> list[str]:
        """The names of a span's ancestors, nearest first (all in the span's trace)."""
        by_id = {s.context.span_id: s for s in self.finished() if s.context.trace_id == span.context.trace_id}
        names = []
        while span.parent is not None and span.parent.span_id in by_id:
            span = by_id[span.parent.span_id]
            names.append(span.name)
        return names

    def points(self, metric: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        assert data is not None
        return [
            p
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
            if m.name == metric
            for p in m.data.data_points
        ]


@contextmanager
def instrumented(**options: Any) -> Iterator[Telemetry]:
    """``cycles.otel.instrument`` into fresh in-memory exporters, undone after."""
    t = Telemetry()
    cycles.otel.instrument(tracer_provider=t.tracer_provider, meter_provider=t.meter_provider, **options)
    try:
        yield t
    finally:
        cycles.otel.uninstrument()
        t.meter_provider.shutdown()
        t.tracer_provider.shutdown()


@contextmanager
def without_opentelemetry() -> Iterator[None]:
    """Every ``import opentelemetry...`` fails, as when the ``otel`` extra is not installed."""
    real_import = builtins.__import__

    def no_otel(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("opentelemetry"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    builtins.__import__ = no_otel
    try:
        yield
    finally:
        builtins.__import__ = real_import
