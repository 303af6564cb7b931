"""Capturing spans in tests: one SDK tracer provider per process, shared by every kit."""

from __future__ import annotations

from typing import Any

_exporter: Any = None


def memory_exporter() -> Any:
    """An InMemorySpanExporter receiving every span of this process from now on.

    OpenTelemetry lets a process install its tracer provider once; if one is installed already
    (by another kit, or the app), the exporter is added to it instead of replacing it.
    """
    global _exporter
    if _exporter is not None:
        return _exporter
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _exporter = exporter
    return exporter
