"""OpenTelemetry's SDK with in-memory exporters, and uow's instrumentation switched on for one test."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from uow.otel import UowInstrumentor


@attrs.define
class Recorded:
    """What uow recorded through OpenTelemetry during a test."""

    tracer_provider: TracerProvider
    exporter: InMemorySpanExporter
    reader: InMemoryMetricReader

    def spans(self) -> list[ReadableSpan]:
        """The finished spans, in the order they ended."""
        return list(self.exporter.get_finished_spans())

    def span(self, name: str) -> ReadableSpan:
        """The one finished span named *name*."""
        [found] = [span for span in self.spans() if span.name == name]
        return found

    def tree(self) -> list[tuple[str, str | None]]:
        """Each finished span's name and its parent's name, in the order they ended."""
        spans = self.spans()
        names = {span.context.span_id: span.name for span in spans}
        return [(span.name, names.get(span.parent.span_id, "?") if span.parent else None) for span in spans]

    def points(self, metric: str) -> list[tuple[dict[str, Any], Any]]:
        """The data points of *metric*: each with its attributes, and its value (a sum, or a histogram's count)."""
        data = self.reader.get_metrics_data()
        found: list[tuple[dict[str, Any], Any]] = []
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for recorded in scope.metrics:
                    if recorded.name == metric:
                        for point in recorded.data.data_points:
                            value = getattr(point, "value", None)
                            found.append((dict(point.attributes or {}), point.count if value is None else value))
        return found


def events(span: ReadableSpan) -> list[str]:
    """The names of *span*'s events, in order."""
    return [event.name for event in span.events]


@pytest.fixture
def otel() -> Iterator[Recorded]:
    """uow's instrumentation on, recording to in-memory exporters; switched off after the test."""
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    instrumentor = UowInstrumentor()
    instrumentor.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
    try:
        yield Recorded(tracer_provider, exporter, reader)
    finally:
        instrumentor.uninstrument()
        meter_provider.shutdown()
        tracer_provider.shutdown()
