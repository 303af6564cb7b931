"""Setting up OpenTelemetry the OpenTelemetry way: from the standard `OTEL_*` variables.

`OTEL_TRACES_EXPORTER` (`otlp`, `console`, `none`), `OTEL_EXPORTER_OTLP_ENDPOINT` and its
`_PROTOCOL`/`_HEADERS` companions, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` and
`OTEL_TRACES_SAMPLER` are read by the SDK itself. With neither an exporter nor an endpoint set,
nothing is installed and tracing costs nothing (`millpond.telemetry.TRACING` stays False).

If the application already installed its own tracer provider, millpond uses it and installs
nothing. Call `configure_tracing()` in a producer process to get the same set-up there.
"""

from __future__ import annotations

import os
from typing import Any

from opentelemetry import trace

from millpond import telemetry
from millpond.exceptions import ConfigurationError

_provider: Any = None


def _wanted_exporter() -> str:
    exporter = os.environ.get("OTEL_TRACES_EXPORTER")
    if exporter:
        return exporter.strip().lower()
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )
    return "otlp" if endpoint else "none"


def configure_tracing(default_service_name: str = "millpond") -> bool:
    """Install a tracer provider from the environment; returns whether tracing is on."""
    global _provider
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return telemetry.refresh()  # the application configured OpenTelemetry itself
    exporter_name = _wanted_exporter()
    if exporter_name == "none":
        return telemetry.refresh()
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

    exporter: SpanExporter
    if exporter_name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        exporter = ConsoleSpanExporter()
    elif exporter_name == "otlp":
        protocol = (
            os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf"
        )
        if protocol != "http/protobuf":
            raise ConfigurationError(
                f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported: millpond ships the "
                "OTLP/HTTP exporter; use http/protobuf (port 4318)"
            )
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    else:
        raise ConfigurationError(
            f"OTEL_TRACES_EXPORTER={exporter_name!r} is not supported; use otlp, console or none"
        )
    resource = Resource.create(
        {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: default_service_name}
    )
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    return telemetry.refresh()


def configure_worker(settings: Any) -> bool:
    """The worker's set-up (called after early patching, before the app is imported)."""
    parenting = "link" if getattr(settings, "trace_link", False) else "parent"
    on = configure_tracing("millpond-worker")
    telemetry.refresh(parenting=parenting)
    return on


def flush(timeout_millis: int = 5000) -> None:
    """Export every finished span now (a prefork child calls this before `os._exit`)."""
    provider = trace.get_tracer_provider()
    force = getattr(provider, "force_flush", None)
    if force is not None:
        force(timeout_millis)


def shutdown() -> None:
    provider = trace.get_tracer_provider()
    stop = getattr(provider, "shutdown", None)
    if stop is not None:
        stop()
