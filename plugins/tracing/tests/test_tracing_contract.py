"""millpond-tracing as the core sees it: the `tracing` hooks entry point, and the `OTEL_*` checks
and provider set-up it runs when a millpond command starts (`process_starting`) and ends
(`process_exiting`).

Set-up cases run in a fresh interpreter: OpenTelemetry installs one tracer provider per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from millpond.config import plugins
from millpond.exceptions import ConfigurationError
from millpond_tracing import otel
from millpond_tracing.hooks import TracingHooks


def test_the_entry_point_names_the_hooks_and_their_package() -> None:
    (hook,) = plugins.load_hooks(["tracing"])
    assert type(hook) is TracingHooks
    eps = [ep for ep in plugins.entry_points(plugins.HOOKS) if ep.name == "tracing"]
    listed = [plugins.describe(ep) for ep in eps]
    assert [(i.distribution, i.core_range) for i in listed] == [("millpond-tracing", ">=0.1,<0.2")]


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER='sometimes' is not a sampler"),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"},
            "must be a ratio between 0 and 1",
        ),
    ],
)
def test_a_bad_sampler_is_an_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], message: str
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match=message):
        otel._check_sampler()


def test_exporters_protocols_and_the_off_switch_are_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    assert otel.exporter_names("OTEL_TRACES_EXPORTER", "traces") == []
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:1/v1/traces")
    assert otel.exporter_names("OTEL_TRACES_EXPORTER", "traces") == ["otlp"]
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", " OTLP, console ,none")
    assert otel.exporter_names("OTEL_TRACES_EXPORTER", "traces") == ["otlp", "console"]
    assert otel.protocol("traces") == "http/protobuf"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with pytest.raises(ConfigurationError, match="use http/protobuf"):
        otel.protocol("traces")
    assert not otel.sdk_disabled()
    monkeypatch.setenv("OTEL_SDK_DISABLED", "TRUE")
    assert otel.sdk_disabled()


def test_an_unknown_exporter_is_an_error_listing_the_installed_ones() -> None:
    with pytest.raises(ConfigurationError, match="'nope', which is not an installed span exporter"):
        otel._registered_exporter("nope")


#: what `millpond worker` / `send` / `beat` do: the start-up hooks, one span, the exit hooks, then
#: `os._exit` (as a prefork child leaves: the SDK's own atexit flush never runs)
COMMAND = """
import json, os, sys
from opentelemetry import trace
from millpond.config import plugins
from millpond.contracts.hooks import HookChain
from millpond.exceptions import ConfigurationError
chain = HookChain(plugins.load_hooks(["tracing"]))
try:
    chain.process_starting("svc-under-test")
except ConfigurationError as exc:
    print(json.dumps({"error": str(exc)}), flush=True)
    os._exit(0)
provider = trace.get_tracer_provider()
with trace.get_tracer("t").start_as_current_span("inside"):
    pass
chain.process_exiting()
sys.stdout.flush()
print(json.dumps({"provider": type(provider).__name__}), flush=True)
os._exit(0)
"""


def _command(**variables: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(variables)
    proc = subprocess.run(
        [sys.executable, "-c", COMMAND], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_process_starting_installs_the_provider_and_process_exiting_flushes_it() -> None:
    out = "\n".join(_command(OTEL_TRACES_EXPORTER="console"))
    # the console exporter printed the span (batch processor flushed before os._exit) ...
    assert '"name": "inside"' in out
    assert '"service.name": "svc-under-test"' in out
    assert json.loads(out.splitlines()[-1]) == {"provider": "TracerProvider"}


def test_nothing_is_installed_without_otel_variables_or_with_the_sdk_disabled() -> None:
    for variables in ({}, {"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}):
        (line,) = _command(**variables)
        assert json.loads(line) == {"provider": "ProxyTracerProvider"}


def test_a_bad_exporter_stops_the_command_at_start_up() -> None:
    (line,) = _command(OTEL_TRACES_EXPORTER="nope")
    assert "'nope', which is not an installed span exporter" in json.loads(line)["error"]
