"""Tracing configured the OpenTelemetry way, from OTEL_* variables, in producers and workers.

Each case runs in a fresh interpreter: OpenTelemetry allows one tracer provider per process.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from millpond.testing.otlp import OtlpReceiver
from tests.observability.conftest import ROOT, Proc, run_python, run_python_raw

pytestmark = pytest.mark.e2e

#: a producer: configure, send one task (memory broker, no worker needed), flush, report
PRODUCER = """
import json
from opentelemetry import trace
from millpond import Millpond
from millpond_tracing.otel import configure_tracing, provider_installed, shutdown
on = configure_tracing()
app = Millpond("p", broker_url="memory://setup", default_queue="setup-q")
result = app.send_task("obs.any", (1,))
consumer = app.broker.consumer(["setup-q"], 1)
(delivery,) = consumer.fetch(1, 1.0)
shutdown()
print(json.dumps({"on": on, "tracing": provider_installed(), "id": result.id,
                  "provider": type(trace.get_tracer_provider()).__name__,
                  "traceparent": delivery.message.headers.get("traceparent")}))
"""


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


def _env(obs_env: dict[str, str], **values: str) -> dict[str, str]:
    """The producer's environment: the app in PRODUCER names its own memory:// broker."""
    base = {k: v for k, v in obs_env.items() if not k.startswith("MILLPOND_")}
    return {**base, **values}


def test_nothing_configured_means_no_tracing(obs_env: dict[str, str]) -> None:
    out = run_python(PRODUCER, _env(obs_env))
    assert out["on"] is False
    assert out["tracing"] is False
    assert out["provider"] == "ProxyTracerProvider"  # millpond installed nothing
    assert out["traceparent"] is None


def test_an_endpoint_alone_turns_otlp_on_with_the_default_service_name(
    receiver: OtlpReceiver, obs_env: dict[str, str]
) -> None:
    out = run_python(
        PRODUCER,
        _env(obs_env, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_BSP_SCHEDULE_DELAY="50"),
    )
    assert out["on"] is True
    assert out["traceparent"].startswith("00-")
    (span,) = receiver.wait_for(lambda s: len(s) == 1, timeout=10, what="the publish span")
    assert span.name == "publish setup-q"
    assert span.kind == "PRODUCER"
    assert span.service_name == "millpond"  # no OTEL_SERVICE_NAME: millpond's default
    prefix, flags = out["traceparent"].rsplit("-", 1)
    assert prefix == f"00-{span.trace_id}-{span.span_id}"
    assert int(flags, 16) & 1


def test_service_name_resource_attributes_and_gzip(
    receiver: OtlpReceiver, obs_env: dict[str, str]
) -> None:
    env = _env(
        obs_env,
        **receiver.env(),
        OTEL_EXPORTER_OTLP_COMPRESSION="gzip",
        OTEL_RESOURCE_ATTRIBUTES="service.name=shop-api,deployment.environment=test",
    )
    run_python(PRODUCER, env)
    (span,) = receiver.wait_for(lambda s: len(s) == 1, timeout=10, what="a gzip export")
    assert span.service_name == "shop-api"  # from OTEL_RESOURCE_ATTRIBUTES
    assert span.resource["deployment.environment"] == "test"
    run_python(PRODUCER, {**env, "OTEL_SERVICE_NAME": "checkout"})  # wins over the attribute
    spans = receiver.wait_for(lambda s: len(s) == 2, timeout=10, what="the second export")
    assert spans[1].service_name == "checkout"


def test_otlp_headers_reach_the_collector(obs_env: dict[str, str]) -> None:
    seen: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append({k.lower(): v for k, v in self.headers.items()} | {"path": self.path})
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        run_python(
            PRODUCER,
            _env(
                obs_env,
                OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
                OTEL_EXPORTER_OTLP_HEADERS="x-api-key=s3cret,x-tenant=acme",
            ),
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert seen, "the exporter sent nothing"
    assert seen[0]["path"] == "/v1/traces"
    assert seen[0]["x-api-key"] == "s3cret"
    assert seen[0]["x-tenant"] == "acme"


def test_console_exporter_prints_spans(obs_env: dict[str, str]) -> None:
    done = run_python_raw(PRODUCER, _env(obs_env, OTEL_TRACES_EXPORTER="console"))
    assert done.returncode == 0, done.stderr
    assert '"name": "publish setup-q"' in done.stdout
    assert '"messaging.system": "memory"' in done.stdout


@pytest.mark.parametrize(
    ("sampler", "arg", "exported"),
    [
        ("always_off", "", 0),
        ("traceidratio", "0", 0),
        ("parentbased_traceidratio", "1.0", 1),
        ("always_on", "", 1),
    ],
)
def test_sampler_from_the_environment(
    receiver: OtlpReceiver, obs_env: dict[str, str], sampler: str, arg: str, exported: int
) -> None:
    out = run_python(
        PRODUCER,
        _env(
            obs_env,
            **receiver.env("sampled"),
            OTEL_TRACES_SAMPLER=sampler,
            OTEL_TRACES_SAMPLER_ARG=arg,
        ),
    )
    assert out["tracing"] is True
    # the producer flushed synchronously before exiting: what was exported has arrived
    assert len(receiver.spans) == exported
    sampled = int(out["traceparent"].rsplit("-", 1)[1], 16) & 1
    assert sampled == exported  # the decision travels with the message


def test_sdk_disabled_turns_everything_off(receiver: OtlpReceiver, obs_env: dict[str, str]) -> None:
    out = run_python(PRODUCER, _env(obs_env, **receiver.env("off"), OTEL_SDK_DISABLED="true"))
    assert out["on"] is False
    assert out["traceparent"] is None


def test_an_application_provider_is_used_not_replaced(
    receiver: OtlpReceiver, obs_env: dict[str, str]
) -> None:
    code = """
import json
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
mine = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(mine))
trace.set_tracer_provider(provider)
from millpond import Millpond
from millpond_tracing.otel import configure_tracing
on = configure_tracing()
app = Millpond("p", broker_url="memory://own", default_queue="own-q")
app.send_task("obs.any")
print(json.dumps({"on": on, "mine": [s.name for s in mine.get_finished_spans()],
                  "same": trace.get_tracer_provider() is provider}))
"""
    out = run_python(code, _env(obs_env, **receiver.env("ignored")))
    assert out == {"on": True, "mine": ["publish own-q"], "same": True}
    assert receiver.spans == []


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "OTEL_TRACES_EXPORTER",
            "jaeger",
            "OTEL_TRACES_EXPORTER names 'jaeger', which is not an installed span exporter",
        ),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json", "'http/json' is not supported"),
        ("OTEL_TRACES_SAMPLER", "sometimes", "'sometimes' is not a sampler"),
        ("OTEL_TRACES_SAMPLER_ARG", "lots", "must be a ratio between 0 and 1"),
        ("OTEL_METRICS_EXPORTER", "statsd", "OTEL_METRICS_EXPORTER='statsd'"),
        ("OTEL_EXPORTER_PROMETHEUS_PORT", "http", "is not a port number"),
    ],
)
def test_bad_settings_stop_the_worker_with_a_clear_error(
    spawn: Callable[..., Proc], receiver: OtlpReceiver, variable: str, value: str, message: str
) -> None:
    env = {**receiver.env("bad"), variable: value}
    if variable == "OTEL_TRACES_SAMPLER_ARG":
        env["OTEL_TRACES_SAMPLER"] = "traceidratio"
    if variable == "OTEL_EXPORTER_PROMETHEUS_PORT":
        env["OTEL_METRICS_EXPORTER"] = "prometheus"
    worker = spawn("-P", "solo", env=env)
    assert worker.wait(timeout=30) == 2, worker.text()
    output = worker.text()
    assert "millpond: error:" in output, output
    assert message in output, output
    assert "worker ready" not in output  # it failed at start-up, before consuming anything


def test_millpond_send_traces_its_publish(receiver: OtlpReceiver, obs_env: dict[str, str]) -> None:
    """`millpond send` reads the same OTEL_* variables: its message starts a trace."""
    env = {**obs_env, **receiver.env("cli-sender")}
    sent = subprocess.run(
        [sys.executable, "-m", "millpond", "send", "tests.observability.obs_app.add", "1", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    task_id = sent.stdout.strip()
    (span,) = receiver.wait_for(lambda s: len(s) == 1, timeout=10, what="the send's span")
    assert span.name == f"publish {obs_env['MILLPOND_DEFAULT_QUEUE']}"
    assert span.service_name == "cli-sender"
    assert span.attributes["messaging.message.id"] == task_id
    assert span.attributes["messaging.system"] == "sqlite"
