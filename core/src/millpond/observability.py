"""Setting up OpenTelemetry the OpenTelemetry way: from the standard `OTEL_*` variables.

Traces: `OTEL_TRACES_EXPORTER` (`otlp`, `console`, `none`, or a comma-separated list),
`OTEL_EXPORTER_OTLP_ENDPOINT` with its `_PROTOCOL`, `_HEADERS`, `_COMPRESSION` companions (and their
`_TRACES_` forms), `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and
`OTEL_TRACES_SAMPLER_ARG`. Metrics: `OTEL_METRICS_EXPORTER` (`otlp`, `console`, `prometheus`,
`none`), `OTEL_METRIC_EXPORT_INTERVAL`, `OTEL_EXPORTER_PROMETHEUS_HOST`/`_PORT`.
`OTEL_SDK_DISABLED=true` turns everything off. With neither an exporter nor an endpoint set,
nothing is installed and telemetry costs nothing (`telemetry.TRACING`, `metrics.ENABLED` stay
False).

The SDK reads most of these itself; millpond validates them first, because the SDK only warns about
a misspelt sampler or exporter and carries on without what the user asked for.

If the application installed its own tracer or meter provider, millpond uses it and installs
nothing. A producer process calls `configure_tracing()` to get the worker's set-up.

Order in the worker (see ARCHITECTURE.md, prefork and green pools): `configure_worker` runs after
early monkey-patching and before the app is imported, installing the tracer provider (prefork
children inherit it; the SDK restarts its export thread after fork). Metrics, the Prometheus
endpoint and the health probes start in `worker_started`, after the pool has forked, so no child
inherits a metrics thread or a listening socket.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

from millpond import metrics, telemetry
from millpond.exceptions import ConfigurationError

if TYPE_CHECKING:
    from millpond.health import ProbeServer
    from millpond.span_recorder import SpanRecorder
    from millpond.worker import Worker

SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
TRACE_EXPORTERS = ("otlp", "console", "none")
METRIC_EXPORTERS = ("otlp", "console", "prometheus", "none")

_provider: Any = None
_meter_provider: Any = None
_metrics_resource: Any = None
_plan: MetricsPlan | None = None
_servers: dict[int, list[ProbeServer]] = {}


def _env(name: str) -> str:
    return (os.environ.get(name) or "").strip()


def sdk_disabled() -> bool:
    return _env("OTEL_SDK_DISABLED").lower() == "true"


def _exporters(variable: str, signal: str, allowed: tuple[str, ...]) -> list[str]:
    """The exporters a `OTEL_*_EXPORTER` variable names; default otlp when an endpoint is set."""
    raw = _env(variable)
    if not raw:
        endpoint = _env("OTEL_EXPORTER_OTLP_ENDPOINT") or _env(
            f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT"
        )
        return ["otlp"] if endpoint else []
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if bad:
        raise ConfigurationError(
            f"{variable}={raw!r}: {', '.join(repr(b) for b in bad)} is not supported; use "
            f"{', '.join(allowed)} (comma-separated for several)"
        )
    return [n for n in names if n != "none"]


def _protocol(signal: str) -> str:
    protocol = (
        _env(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL")
        or _env("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).lower()
    if protocol not in ("http/protobuf", "grpc"):
        raise ConfigurationError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported by the Python exporters "
            "millpond uses; use http/protobuf (port 4318) or grpc (port 4317, needs "
            "pip install opentelemetry-exporter-otlp-proto-grpc)"
        )
    return protocol


def _grpc_missing(exc: ImportError) -> ConfigurationError:
    return ConfigurationError(
        f"OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs the gRPC exporter ({exc}): "
        "pip install opentelemetry-exporter-otlp-proto-grpc, or use http/protobuf (port 4318)"
    )


def _check_sampler() -> None:
    name = _env("OTEL_TRACES_SAMPLER").lower()
    if not name:
        return
    if name not in SAMPLERS:
        raise ConfigurationError(
            f"OTEL_TRACES_SAMPLER={name!r} is not a sampler; use one of {', '.join(SAMPLERS)}"
        )
    if name.endswith("traceidratio"):
        arg = _env("OTEL_TRACES_SAMPLER_ARG")
        try:
            ratio = float(arg) if arg else 1.0
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise ConfigurationError(
                f"OTEL_TRACES_SAMPLER_ARG={arg!r} must be a ratio between 0 and 1 for the "
                f"{name} sampler (e.g. 0.1 keeps one trace in ten)"
            )


def resource(default_service_name: str) -> Any:
    """The SDK resource from OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES, else the default name."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    detected = Resource.create({})
    name = str(detected.attributes.get(SERVICE_NAME, ""))
    if not name or name.startswith("unknown_service"):
        return detected.merge(Resource({SERVICE_NAME: default_service_name}))
    return detected


# -- traces ----------------------------------------------------------------------------------------
def configure_tracing(
    default_service_name: str = "millpond", *, span_recorder: bool = True
) -> bool:
    """Install a tracer provider from the environment; returns whether tracing is on.

    Raises ConfigurationError (naming the variable and what is allowed) for a bad exporter,
    protocol or sampler, so a typo fails at start-up instead of silently tracing nothing.

    With `span_recorder` (the `trace_span_recorder` setting) and the one exporter `otlp` over
    http/protobuf, the worker's `process` and `run` spans go through millpond's span recorder
    instead of the SDK (see `millpond.span_recorder`); everything else uses the provider.
    """
    global _provider
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return telemetry.refresh()  # the application configured OpenTelemetry itself
    if sdk_disabled():
        return telemetry.refresh()
    names = _exporters("OTEL_TRACES_EXPORTER", "traces", TRACE_EXPORTERS)
    if not names:
        return telemetry.refresh()
    _check_sampler()
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

    exporters: list[SpanExporter] = []
    for name in names:
        if name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
        elif _protocol("traces") == "grpc":
            try:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                    OTLPSpanExporter as GrpcSpanExporter,
                )
            except ImportError as exc:
                raise _grpc_missing(exc) from exc
            exporters.append(GrpcSpanExporter())
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
    provider = TracerProvider(resource=resource(default_service_name))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    if span_recorder and names == ["otlp"] and _protocol("traces") == "http/protobuf":
        telemetry.use_recorder(_span_recorder(provider.resource.attributes))
    return telemetry.refresh()


def _bsp_number(name: str, default: float, *, minimum: float = 1) -> float:
    raw = _env(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ConfigurationError(f"{name}={raw!r} must be a number of at least {minimum:g}")
    return value


def _span_recorder(resource_attributes: Any) -> SpanRecorder:
    """The recorder for the worker's spans, with the batch processor's and span limits' settings."""
    from opentelemetry.sdk.trace import SpanLimits

    from millpond import __version__
    from millpond.otlp_http import OtlpHttpSender
    from millpond.span_recorder import SpanRecorder, sampler_from_env

    limits = SpanLimits()
    sender = OtlpHttpSender()
    log = _log()

    def on_error(message: str) -> None:
        log.warning(message, endpoint=sender.endpoint, error=sender.last_error)

    return SpanRecorder(
        sender.send,
        resource_attributes,
        __version__,
        sampler=sampler_from_env(),
        max_queue=int(_bsp_number("OTEL_BSP_MAX_QUEUE_SIZE", 2048)),
        batch_size=int(_bsp_number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)),
        delay=_bsp_number("OTEL_BSP_SCHEDULE_DELAY", 5000, minimum=0) / 1000.0,
        export_timeout=_bsp_number("OTEL_BSP_EXPORT_TIMEOUT", 30000) / 1000.0,
        max_attributes=limits.max_span_attributes or 128,
        max_events=limits.max_events or 128,
        max_links=limits.max_links or 128,
        max_attribute_length=limits.max_attribute_length,
        on_error=on_error,
    )


# -- metrics ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MetricsPlan:
    """What metrics the environment asks for, checked before the pool forks, built after."""

    exporters: tuple[str, ...]
    prometheus_host: str = "localhost"
    prometheus_port: int = 9464
    service_name: str = "millpond"


def plan_metrics(default_service_name: str = "millpond") -> MetricsPlan | None:
    """Read and check the metrics variables; None when metrics are off."""
    if sdk_disabled():
        return None
    names = _exporters("OTEL_METRICS_EXPORTER", "metrics", METRIC_EXPORTERS)
    if not names:
        return None
    if "otlp" in names:
        _protocol("metrics")
    host = _env("OTEL_EXPORTER_PROMETHEUS_HOST") or "localhost"
    raw_port = _env("OTEL_EXPORTER_PROMETHEUS_PORT") or "9464"
    try:
        port = int(raw_port)
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise ConfigurationError(
            f"OTEL_EXPORTER_PROMETHEUS_PORT={raw_port!r} is not a port number (0-65535; 0 picks "
            "a free one)"
        ) from None
    return MetricsPlan(tuple(names), host, port, default_service_name)


def configure_metrics(plan: MetricsPlan) -> Any:
    """Install a meter provider for `plan`; returns the Prometheus reader, if one was asked for.

    Every exporter is wrapped so it also sends the histograms millpond aggregates itself (see
    `millpond.metrics`: recording through the SDK per task would cost more than the task).
    """
    global _meter_provider, _metrics_resource
    from opentelemetry import metrics as otel_metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        MetricExporter,
        MetricReader,
        PeriodicExportingMetricReader,
    )

    res = _metrics_resource = resource(plan.service_name)
    readers: list[MetricReader] = []
    prometheus_reader: Any = None
    for name in plan.exporters:
        exporter: MetricExporter
        if name == "prometheus":
            from opentelemetry.sdk.metrics.export import InMemoryMetricReader

            prometheus_reader = InMemoryMetricReader()
            readers.append(prometheus_reader)
            continue
        if name == "console":
            from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

            exporter = ConsoleMetricExporter()
        elif _protocol("metrics") == "grpc":
            try:
                from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                    OTLPMetricExporter as GrpcMetricExporter,
                )
            except ImportError as exc:
                raise _grpc_missing(exc) from exc
            exporter = GrpcMetricExporter()
        else:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )

            exporter = OTLPMetricExporter()
        readers.append(PeriodicExportingMetricReader(metrics.merging_exporter(exporter, res)))
    provider = MeterProvider(metric_readers=readers, resource=res)
    otel_metrics.set_meter_provider(provider)
    _meter_provider = provider
    metrics.install(provider, aggregate_histograms=True)
    return prometheus_reader


# -- the worker ------------------------------------------------------------------------------------
def configure_worker(settings: Any) -> bool:
    """The worker's set-up before the app is imported: tracing now, metrics checked for later."""
    global _plan
    parenting = "link" if getattr(settings, "trace_link", False) else "parent"
    on = configure_tracing(
        "millpond-worker", span_recorder=getattr(settings, "trace_span_recorder", True)
    )
    telemetry.refresh(parenting=parenting)
    _plan = plan_metrics("millpond-worker")
    return on


def worker_started(worker: Worker) -> None:
    """After the pool started (forked): metrics, the Prometheus endpoint and the health probes."""
    global _plan
    from millpond import health

    plan, _plan = _plan, None
    prometheus_reader = configure_metrics(plan) if plan is not None else None
    if metrics.install():  # ours, just installed, or one the application installed itself
        metrics.observe(worker)
    settings = worker.settings
    wanted: dict[tuple[str, int], dict[str, health.Route]] = {}
    if settings.health_port is not None:
        routes = health.routes_for(worker, settings.health_liveness_timeout)
        wanted.setdefault((settings.health_host, settings.health_port), {}).update(routes)
    if prometheus_reader is not None and plan is not None:
        text = metrics.PrometheusText(prometheus_reader, _metrics_resource)

        def scrape() -> tuple[int, str, bytes]:
            return 200, text.content_type, text.render().encode()

        key = (plan.prometheus_host, plan.prometheus_port)
        if settings.health_port is not None and plan.prometheus_port == settings.health_port:
            key = (settings.health_host, settings.health_port)  # one server, all routes
        wanted.setdefault(key, {})["/metrics"] = scrape
    if not wanted:
        return
    log = _log()
    servers: list[ProbeServer] = []
    try:
        for (host, port), routes in wanted.items():
            server = health.ProbeServer(host, port, routes).start()
            servers.append(server)
            log.info(
                "http endpoint listening", host=server.host, port=server.port, routes=sorted(routes)
            )
    except BaseException:
        for server in servers:
            server.stop()
        raise
    _servers[id(worker)] = servers


def worker_stopped(worker: Worker) -> None:
    """Stop the worker's HTTP endpoints and push its last metrics out."""
    for server in _servers.pop(id(worker), []):
        server.stop()
    provider = _meter_provider
    if provider is not None:
        try:
            provider.force_flush(5000)
        except Exception as exc:
            _log().warning(
                "could not export the last metrics", error=f"{type(exc).__name__}: {exc}"
            )


def _log() -> Any:
    import structlog

    return structlog.get_logger("millpond.observability")


def flush(timeout_millis: int = 5000) -> None:
    """Export every finished span now (a prefork child calls this before `os._exit`)."""
    recorder = telemetry.recorder()
    if recorder is not None:
        recorder.force_flush(timeout_millis)
    provider = trace.get_tracer_provider()
    force = getattr(provider, "force_flush", None)
    if force is not None:
        force(timeout_millis)


def shutdown() -> None:
    """Flush and stop the providers this module installed (the end of `millpond worker`)."""
    global _meter_provider
    metrics.disable()
    if _meter_provider is not None:
        try:
            _meter_provider.shutdown()
        except Exception:
            pass
        _meter_provider = None
    recorder = telemetry.recorder()
    if recorder is not None:
        recorder.shutdown()
    provider = trace.get_tracer_provider()
    stop = getattr(provider, "shutdown", None)
    if stop is not None:
        stop()
