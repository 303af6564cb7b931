"""Worker metrics: exported over OTLP to a real receiver, scraped as Prometheus text, and cheap."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from metrics_receiver import MetricsReceiver
from tests.observability.conftest import Proc, run_python

from millpond.contracts.pool import Job, Outcome
from millpond_metrics import aggregate as metrics

PRODUCE = """
import json
from tests.observability.obs_app import add, fail, flaky
results = [add.delay(i, i) for i in range(3)] + [fail.delay("x"), fail.delay("y")]
results.append(flaky.delay(1))
for r in results:
    r.get(timeout=20, propagate=False)
print(json.dumps([r.id for r in results]))
"""

ADD = "tests.observability.obs_app.add"
FAIL = "tests.observability.obs_app.fail"
FLAKY = "tests.observability.obs_app.flaky"


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


@pytest.mark.e2e
def test_worker_metrics_over_otlp_and_prometheus(
    spawn: Callable[..., Proc], obs_env: dict[str, str]
) -> None:
    queue = obs_env["MILLPOND_QUEUES"]
    with MetricsReceiver() as receiver:
        worker = spawn(
            "-P",
            "threads",
            "-c",
            "2",
            env={
                "OTEL_SERVICE_NAME": "obs-metrics",
                "OTEL_METRICS_EXPORTER": "otlp,prometheus",
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": receiver.url,
                "OTEL_METRIC_EXPORT_INTERVAL": "200",
                "OTEL_EXPORTER_PROMETHEUS_HOST": "127.0.0.1",
                "OTEL_EXPORTER_PROMETHEUS_PORT": "0",
            },
        ).wait_ready()
        port = worker.endpoint_port("/metrics")
        run_python(PRODUCE, obs_env)

        def counted() -> bool:
            return (
                receiver.total("millpond.task.succeeded") == 4
                and receiver.total("millpond.task.failed") == 2
                and receiver.total("millpond.task.retried") == 1
                and receiver.total("millpond.task.received") == 7
            )

        receiver.wait(counted, 20, "the task counters")
        assert receiver.total("millpond.task.succeeded", **{"millpond.task.name": ADD}) == 3
        assert receiver.total("millpond.task.received", **{"millpond.task.name": FLAKY}) == 2
        assert (
            receiver.total(
                "millpond.task.failed",
                **{
                    "millpond.task.name": FAIL,
                    "millpond.task.state": "FAILURE",
                    "messaging.destination.name": queue,
                },
            )
            == 2
        )
        duration = receiver.latest("millpond.task.duration")
        assert duration is not None
        assert duration.kind == "histogram"
        assert duration.unit == "s"
        assert sum(p.count for p in duration.points) == 7  # every run, by outcome state
        assert receiver.total("millpond.task.queue_wait") == 7
        wait = receiver.latest("millpond.task.queue_wait")
        assert wait is not None
        assert all(0 <= p.sum < 60 for p in wait.points)
        size = receiver.latest("millpond.pool.size")
        assert size is not None
        assert [p.value for p in size.points] == [2.0]
        assert size.points[0].attributes == {"millpond.pool": "threads"}
        assert receiver.latest("millpond.task.active") is not None
        assert receiver.latest("millpond.task.received").service_name == "obs-metrics"  # type: ignore[union-attr]

        status, kind, text = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        assert kind.startswith("text/plain; version=0.0.4")
        assert re.search(r'^target_info\{.*service_name="obs-metrics".*\} 1$', text, re.M)
        assert "# TYPE millpond_task_succeeded_total counter" in text
        assert (
            f'millpond_task_succeeded_total{{messaging_destination_name="{queue}",'
            f'millpond_task_name="{ADD}"}} 3'
        ) in text
        assert "# TYPE millpond_task_duration_seconds histogram" in text
        assert "millpond_task_duration_seconds_bucket{" in text
        assert 'le="+Inf"} ' in text
        assert 'millpond_pool_size{millpond_pool="threads"} 2' in text
        assert worker.stop() == 0


@pytest.mark.e2e
def test_metrics_and_probes_share_one_port(
    spawn: Callable[..., Proc], obs_env: dict[str, str]
) -> None:
    worker = spawn(
        "-P",
        "solo",
        env={
            "OTEL_METRICS_EXPORTER": "prometheus",
            "OTEL_EXPORTER_PROMETHEUS_PORT": "0",
            "MILLPOND_HEALTH__PORT": "0",
            "MILLPOND_HEALTH__HOST": "127.0.0.1",
        },
    ).wait_ready()
    port = worker.endpoint_port("/metrics")
    assert worker.endpoint_port("/readyz") == port
    status, _, text = _get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    assert 'millpond_pool_size{millpond_pool="solo"} 1' in text
    assert re.search(r'^target_info\{.*service_name="millpond-worker".*\} 1$', text, re.M)
    assert _get(f"http://127.0.0.1:{port}/livez")[0] == 200
    assert worker.stop() == 0


@pytest.fixture
def local_meter() -> Iterator[Any]:
    """A private MeterProvider with an in-memory reader, installed into millpond.metrics."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    assert metrics.install(provider, aggregate_histograms=True)
    metrics.reset()
    try:
        yield reader
    finally:
        metrics.disable()
        provider.shutdown()


def test_prometheus_text_names_labels_and_escaping(local_meter: Any) -> None:
    job = Job(task_id="1", task_name='odd "name"\\x\n', args=(), kwargs={}, queue="q")
    metrics.received(job)
    metrics.finished(job, Outcome(state="FAILURE", runtime=0.003))
    metrics.started(
        Job(task_id="2", task_name="t", args=(), kwargs={}, queue="q", sent_at=time.time() - 0.5)
    )
    text = metrics.PrometheusText(local_meter).render()
    escaped = 'millpond_task_name="odd \\"name\\"\\\\x\\n"'
    assert f'millpond_task_received_total{{messaging_destination_name="q",{escaped}}} 1' in text
    assert (
        f'millpond_task_failed_total{{messaging_destination_name="q",{escaped},'
        'millpond_task_state="FAILURE"} 1' in text
    )
    assert 'millpond_task_duration_seconds_bucket{messaging_destination_name="q",' in text
    assert 'le="0.005"} 1' in text  # 3 ms lands in the 5 ms bucket, cumulatively
    assert (
        'millpond_task_queue_wait_seconds_count{messaging_destination_name="q",'
        'millpond_task_name="t"} 1' in text
    )
    assert text.endswith("\n")


def test_prometheus_names() -> None:
    assert (
        metrics.prometheus_name("millpond.task.duration", "s", counter=False)
        == "millpond_task_duration_seconds"
    )
    assert (
        metrics.prometheus_name("millpond.task.received", "{task}", counter=True)
        == "millpond_task_received_total"
    )
    assert (
        metrics.prometheus_name("http.server.request.body.size", "By", counter=False)
        == "http_server_request_body_size_bytes"
    )


def test_metrics_hooks_switch_themselves_off_with_nothing_configured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No exporter asked for and no provider of the application's: the worker leaves the hooks
    out of the chain, so metrics off cost nothing per task (what on costs is a benchmark)."""
    from millpond.contracts.hooks import HookChain
    from millpond_metrics import MetricsHooks

    for name in ("OTEL_METRICS_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(metrics, "is_real_provider", lambda _provider: False)
    hooks = MetricsHooks()
    hooks.worker_starting(None)  # type: ignore[arg-type]
    assert not hooks.enabled
    assert HookChain([hooks]).active().hooks == ()


def test_an_application_meter_provider_gets_histograms_through_the_api() -> None:
    """A provider millpond did not install: counters are observed, histograms recorded per task
    (millpond cannot reach its exporters to merge aggregated ones)."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    metrics.reset()
    assert metrics.install(provider)
    try:
        job = Job(task_id="1", task_name="app.t", args=(), kwargs={}, queue="q")
        metrics.received(job)
        metrics.finished(job, Outcome(state="SUCCESS", runtime=0.02))
        data = reader.get_metrics_data()
        found = {
            m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
        }
        (point,) = found["millpond.task.duration"].data.data_points
        assert point.count == 1
        assert point.sum == pytest.approx(0.02)
        assert point.attributes == {
            "millpond.task.name": "app.t",
            "messaging.destination.name": "q",
            "millpond.task.state": "SUCCESS",
        }
        (received,) = found["millpond.task.received"].data.data_points
        assert received.value == 1
    finally:
        metrics.disable()
        provider.shutdown()


def test_merging_exporter_sends_deltas_when_the_exporter_prefers_them() -> None:
    from opentelemetry.sdk.metrics import Histogram as HistogramInstrument
    from opentelemetry.sdk.metrics.export import (
        AggregationTemporality,
        MetricExporter,
        MetricExportResult,
    )
    from opentelemetry.sdk.resources import Resource

    class Collect(MetricExporter):
        def __init__(self) -> None:
            super().__init__(
                preferred_temporality={HistogramInstrument: AggregationTemporality.DELTA}
            )
            self.batches: list[Any] = []

        def export(
            self, metrics_data: Any, timeout_millis: float = 10_000, **kwargs: Any
        ) -> MetricExportResult:
            self.batches.append(metrics_data)
            return MetricExportResult.SUCCESS

        def force_flush(self, timeout_millis: float = 10_000) -> bool:
            return True

        def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
            pass

    inner = Collect()
    exporter = metrics.merging_exporter(inner, Resource.create({"service.name": "delta"}))
    metrics.reset()
    job = Job(task_id="1", task_name="d.t", args=(), kwargs={}, queue="q")

    def duration_points() -> list[Any]:
        exporter.export(None)
        data = inner.batches[-1]
        if data is None:  # nothing of millpond's to add, and the SDK had nothing either
            return []
        return [
            p
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
            if m.name == "millpond.task.duration"
            for p in m.data.data_points
        ]

    for _ in range(3):
        metrics.finished(job, Outcome(state="SUCCESS", runtime=0.01))
    (first,) = duration_points()
    assert first.count == 3
    metrics.finished(job, Outcome(state="SUCCESS", runtime=0.2))
    (second,) = duration_points()
    assert second.count == 1
    assert second.sum == pytest.approx(0.2)
    assert second.start_time_unix_nano == first.time_unix_nano
    assert duration_points() == []  # nothing new: no point at all
    assert inner.batches[0].resource_metrics[0].resource.attributes["service.name"] == "delta"
    metrics.reset()


def _gauge(text: str, name: str, queue: str) -> float | None:
    found = re.search(
        rf'^{name}{{messaging_destination_name="{re.escape(queue)}"}} (\S+)$', text, re.M
    )
    return float(found.group(1)) if found else None


@pytest.mark.e2e
def test_the_autoscaling_signal_on_prometheus_and_queue_stats(
    spawn: Callable[..., Proc], obs_env: dict[str, str]
) -> None:
    """12 five-second naps on a threads worker with 2 slots and a prefetch of 4: 2 run, 2 wait in
    the worker's buffer, 8 stay in the broker, so the load is (8 + 2 + 2) / 2 = 6, and
    `millpond queue-stats` reports the same 8 ready messages."""
    queue = obs_env["MILLPOND_QUEUES"]
    worker = spawn(
        "-P",
        "threads",
        "-c",
        "2",
        env={
            "OTEL_METRICS_EXPORTER": "prometheus",
            "OTEL_EXPORTER_PROMETHEUS_HOST": "127.0.0.1",
            "OTEL_EXPORTER_PROMETHEUS_PORT": "0",
            "MILLPOND_PREFETCH_MULTIPLIER": "2",
        },
    ).wait_ready()
    port = worker.endpoint_port("/metrics")
    run_python(
        "from tests.observability.obs_app import nap\n"
        "[nap.delay(5) for _ in range(12)]\nprint('[]')",
        obs_env,
    )
    seen: dict[str, float | None] = {}

    def settled() -> bool:
        text = _get(f"http://127.0.0.1:{port}/metrics")[2]
        for name in ("ready", "reserved", "running", "load"):
            seen[name] = _gauge(text, f"millpond_queue_{name}", queue)
        picture = (seen["ready"], seen["reserved"], seen["running"], seen["load"])
        return picture == (8, 2, 2, 6.0)

    deadline = time.monotonic() + 4  # the naps last 5 s: the picture holds until then
    while not settled():
        assert time.monotonic() < deadline, f"the queue gauges never showed 8/2/2, load 6: {seen}"
        time.sleep(0.05)
    stats = run_python(
        "import json, subprocess, sys\n"
        "out = subprocess.run([sys.executable, '-m', 'millpond', 'queue-stats', '--json',"
        " '--slots', '2'], capture_output=True, text=True, check=True).stdout\n"
        "print(json.dumps(json.loads(out.splitlines()[-1])))",
        obs_env,
    )
    assert stats["queue"] == queue and stats["ready"] == 8 and stats["load"] >= 4.0, stats
    assert worker.stop() == 0
