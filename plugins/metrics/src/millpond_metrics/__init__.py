"""millpond-metrics: the worker's OpenTelemetry metrics, as a hooks implementation.

`MetricsHooks` is the `metrics` entry of the `millpond.hooks` group. When the worker starts it reads
the standard variables (`OTEL_METRICS_EXPORTER`: `otlp`, `console`, `prometheus`, `none`;
`OTEL_EXPORTER_PROMETHEUS_HOST`/`_PORT`; the OTLP endpoint variables) and checks them before the
pool forks; once the pool has started it installs a meter provider (unless the application
installed one, which it then uses), registers the instruments (see `aggregate`) and serves
`/metrics` for Prometheus, on the health endpoint's port when both name the same one. With nothing
asked for, the hooks switch themselves off and the worker never calls them.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import structlog

from millpond.contracts.hooks import Hooks, WorkerView
from millpond.contracts.pool import Job, Outcome
from millpond.exceptions import ConfigurationError
from millpond_health import server as probe_server
from millpond_metrics import aggregate
from millpond_tracing import otel

__all__ = ["MetricsHooks", "MetricsPlan", "configure_metrics", "plan_metrics"]

METRIC_EXPORTERS = ("otlp", "console", "prometheus")


@dataclass(frozen=True, slots=True)
class MetricsPlan:
    """What metrics the environment asks for, checked before the pool forks, built after."""

    exporters: tuple[str, ...]
    prometheus_host: str = "localhost"
    prometheus_port: int = 9464
    service_name: str = "millpond"


def plan_metrics(default_service_name: str = "millpond") -> MetricsPlan | None:
    """Read and check the metrics variables; None when metrics are off."""
    if otel.sdk_disabled():
        return None
    names = otel.exporter_names("OTEL_METRICS_EXPORTER", "metrics")
    if not names:
        return None
    bad = [n for n in names if n not in METRIC_EXPORTERS]
    if bad:
        raise ConfigurationError(
            f"OTEL_METRICS_EXPORTER={otel.env('OTEL_METRICS_EXPORTER')!r}: "
            f"{', '.join(repr(b) for b in bad)} is not supported; use "
            f"{', '.join(METRIC_EXPORTERS)} or none (comma-separated for several)"
        )
    if "otlp" in names:
        otel.protocol("metrics")
    host = otel.env("OTEL_EXPORTER_PROMETHEUS_HOST") or "localhost"
    raw_port = otel.env("OTEL_EXPORTER_PROMETHEUS_PORT") or "9464"
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


def configure_metrics(plan: MetricsPlan) -> tuple[Any, Any, Any]:
    """Install a meter provider for `plan`: (provider, resource, Prometheus reader or None).

    Every exporter is wrapped so it also sends the histograms aggregated here (see `aggregate`:
    recording through the SDK per task would cost more than the task).
    """
    from opentelemetry import metrics as otel_metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        InMemoryMetricReader,
        MetricExporter,
        MetricReader,
        PeriodicExportingMetricReader,
    )

    res = otel.resource(plan.service_name)
    readers: list[MetricReader] = []
    prometheus_reader: Any = None
    for name in plan.exporters:
        exporter: MetricExporter
        if name == "prometheus":
            prometheus_reader = InMemoryMetricReader()
            readers.append(prometheus_reader)
            continue
        if name == "console":
            from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

            exporter = ConsoleMetricExporter()
        elif otel.protocol("metrics") == "grpc":
            try:
                from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                    OTLPMetricExporter as GrpcMetricExporter,
                )
            except ImportError as exc:
                raise otel.grpc_missing(exc) from exc
            exporter = GrpcMetricExporter()
        else:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )

            exporter = OTLPMetricExporter()
        readers.append(PeriodicExportingMetricReader(aggregate.merging_exporter(exporter, res)))
    provider = MeterProvider(metric_readers=readers, resource=res)
    otel_metrics.set_meter_provider(provider)
    aggregate.install(provider, aggregate_histograms=True)
    return provider, res, prometheus_reader


class MetricsHooks(Hooks):
    """Counts every job's way through the worker; see the package docstring."""

    def __init__(self) -> None:
        self._plan: MetricsPlan | None = None
        self._provider: Any = None

    def worker_starting(self, worker: WorkerView) -> None:
        self._plan = plan_metrics("millpond-worker")
        provider = _global_provider()
        self.enabled = self._plan is not None or (
            provider is not None and aggregate.is_real_provider(provider)
        )

    def worker_ready(self, worker: WorkerView) -> None:
        """After the pool started (forked): the provider, its export thread, `/metrics`."""
        plan, self._plan = self._plan, None
        prometheus: Any = None
        if plan is not None:
            self._provider, res, prometheus = configure_metrics(plan)
        if aggregate.install():  # ours, just installed, or one the application installed
            aggregate.observe(worker)
        if prometheus is None or plan is None:
            return
        text = aggregate.PrometheusText(prometheus, res)

        def scrape() -> tuple[int, str, bytes]:
            return 200, text.content_type, text.render().encode()

        server = probe_server.serve(
            worker, plan.prometheus_host, plan.prometheus_port, {"/metrics": scrape}
        )
        structlog.get_logger("millpond.metrics").info(
            "http endpoint listening", host=server.host, port=server.port, routes=["/metrics"]
        )

    def worker_stopped(self, worker: WorkerView) -> None:
        """Push the last metrics out and stop the provider this hook installed."""
        probe_server.stop_serving(worker)  # /metrics, if it had a port of its own
        provider, self._provider = self._provider, None
        aggregate.disable()
        if provider is None:
            return
        try:
            provider.force_flush(5000)
            provider.shutdown()
        except Exception as exc:
            structlog.get_logger("millpond.metrics").warning(
                "could not export the last metrics", error=f"{type(exc).__name__}: {exc}"
            )

    def received(self, job: Job) -> None:
        aggregate.received(job)

    def started(self, job: Job) -> None:
        aggregate.started(job)

    def finished(self, job: Job, outcome: Outcome) -> None:
        aggregate.finished(job, outcome)


def _global_provider() -> Any:
    """The meter provider the application installed, None when it cannot have installed one.

    Installing one means importing `opentelemetry.metrics` (or naming one in
    `OTEL_PYTHON_METER_PROVIDER`, which the API loads on first use): without either, the answer
    is the API's no-op default, known without importing the metrics API (about 8 ms of every
    worker start that asks for no metrics).
    """
    if "opentelemetry.metrics" not in sys.modules and not os.environ.get(
        "OTEL_PYTHON_METER_PROVIDER"
    ):
        return None
    from opentelemetry import metrics as otel_metrics

    return otel_metrics.get_meter_provider()
