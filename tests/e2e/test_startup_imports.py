"""What `millpond worker --help` and a worker with tracing off import (issue: start-up time).

Start-up time is mostly imports, and a time is no assertion a loaded machine can keep; so these
tests pin the set of modules instead. A worker that runs its first task with tracing off must not
have imported the OpenTelemetry SDK or an exporter (nor what exporters pull in: protobuf, gRPC,
an HTTP client), nor the `inspect`/`control` command table, nor the metrics API;
`--help` must not even import the settings loader, the logging set-up, the tracing API or
`http.server`. The last test turns tracing on and sees the SDK arrive, so the worker check is
known to be able to fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from millpond.testing.harness import WorkerProcess, wait_until
from tests.e2e.harness import ROOT

pytestmark = pytest.mark.e2e

#: modules only tracing (or the CLI's remote-control commands) needs, by prefix
TRACING_ONLY = (
    "opentelemetry.sdk",
    "opentelemetry.exporter",
    "opentelemetry.proto",
    "google.protobuf",
    "grpc",
    "requests",
    "urllib3",
)
CLI_ONLY = ("millpond_control.cli", "millpond_cli.scaffold", "millpond_cli.settings_docs")
#: what a worker asking for no metrics does without: the OpenTelemetry metrics API (~8 ms)
DEFERRED = ("opentelemetry.metrics",)
#: what printing `worker --help` needs none of
NOT_FOR_HELP = (
    *TRACING_ONLY,
    *CLI_ONLY,
    *DEFERRED,
    "http.server",
    "opentelemetry",
    "structlog",
    "dynaconf",
    "millpond.consume",
    "millpond_control",
    "millpond.observe",
    "millpond_cli.logs",
    "millpond.produce",
    "millpond.config.settings",
)
#: OTEL_* values that turn tracing off whatever the calling environment sets
TRACING_OFF = {
    "OTEL_TRACES_EXPORTER": "none",
    "OTEL_EXPORTER_OTLP_ENDPOINT": "",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "",
}

APP = """
import json, os, sys
from millpond import Millpond

app = Millpond("startup")

@app.task(name="startup.modules")
def modules():
    with open(os.environ["MODULES_OUT"] + ".tmp", "w") as fh:
        json.dump(sorted(sys.modules), fh)
    os.replace(os.environ["MODULES_OUT"] + ".tmp", os.environ["MODULES_OUT"])
"""


def imported(modules: list[str], prefixes: tuple[str, ...]) -> list[str]:
    """The modules that are one of `prefixes` or inside one of them."""
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes))


def test_worker_help_imports_only_the_parser() -> None:
    script = textwrap.dedent("""
        import contextlib, io, json, runpy, sys
        sys.argv = ["millpond", "worker", "--help"]
        with contextlib.redirect_stdout(io.StringIO()) as shown:
            try:
                runpy.run_module("millpond", run_name="__main__")
            except SystemExit:
                pass
        assert "--pool" in shown.getvalue(), shown.getvalue()
        print(json.dumps(sorted(sys.modules)))
    """)
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **TRACING_OFF},
    )
    assert done.returncode == 0, done.stderr
    modules = json.loads(done.stdout)
    assert "millpond_cli.parser" in modules  # the run did reach the command line
    assert imported(modules, NOT_FOR_HELP) == []


def _first_task_modules(tmp_path: Path, e2e_env: dict[str, str], otel: dict[str, str]) -> list[str]:
    """The modules a solo worker on the embedded broker has imported when its first task runs."""
    (tmp_path / "startup_app.py").write_text(APP)
    out = tmp_path / "modules.json"
    env = {
        **e2e_env,
        **otel,
        "MODULES_OUT": str(out),
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
    }
    worker = WorkerProcess(["-A", "startup_app:app", "-P", "solo"], env, tmp_path, cwd=ROOT)
    try:
        worker.wait_ready()
        sent = subprocess.run(
            [sys.executable, "-m", "millpond", "send", "startup.modules"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **env},
        )
        assert sent.returncode == 0, sent.stderr
        wait_until(out.exists, 20, f"the first task to run; worker log:\n{worker.text()}")
        return list(json.loads(out.read_text()))
    finally:
        worker.kill()


def test_worker_with_tracing_off_imports_no_sdk_no_exporter(
    tmp_path: Path, e2e_env: dict[str, str]
) -> None:
    modules = _first_task_modules(tmp_path, e2e_env, TRACING_OFF)
    assert "millpond.consume.worker" in modules  # the task ran in a worker
    assert imported(modules, TRACING_ONLY + CLI_ONLY + DEFERRED) == []


def test_the_probe_module_imports_no_http_server_until_it_serves() -> None:
    # every worker imports it (through the hooks); http.server comes only with a probe port
    script = "import sys, millpond_health.hooks; print('http.server' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_worker_with_tracing_on_does_import_the_sdk(
    tmp_path: Path, e2e_env: dict[str, str]
) -> None:
    modules = _first_task_modules(
        tmp_path, e2e_env, {**TRACING_OFF, "OTEL_TRACES_EXPORTER": "console"}
    )
    assert imported(modules, ("opentelemetry.sdk",)) != []
