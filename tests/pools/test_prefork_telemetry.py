"""Spans from prefork children reach a real OTLP endpoint: every `run` span, even when each
child exits after one task (max_tasks_per_child=1) or is stopped by a hard time limit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from millpond.testing.otlp import OtlpReceiver

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _env(receiver: OtlpReceiver, service: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MILLPOND_", "OTEL_"))}
    env.update(receiver.env(service))
    return env


def test_every_run_span_arrives_from_recycled_children() -> None:
    with OtlpReceiver() as receiver:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.pools.prefork_driver",
                json.dumps({"jobs": 50, "max_tasks_per_child": 1}),
            ],
            cwd=ROOT,
            env=_env(receiver, "prefork-driver"),
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        jobs: list[dict[str, Any]] = json.loads(proc.stdout.strip().splitlines()[-1])
        spans = receiver.wait_for(
            lambda got: sum(s.name.startswith("run ") for s in got) >= len(jobs),
            timeout=20,
            what=f"{len(jobs)} run spans",
        )
    runs = {s.attributes["messaging.message.id"]: s for s in spans if s.name.startswith("run ")}
    processes = {s.span_id: s for s in spans if s.name == "process kit"}
    for job in jobs:
        run = runs.get(job["task_id"])
        assert run is not None, f"no run span for {job['task_name']}[{job['task_id']}]"
        _, trace_id, process_span_id, _ = job["traceparent"].split("-")
        assert (run.trace_id, run.parent_span_id) == (trace_id, process_span_id)
        assert process_span_id in processes, "the parent's process span did not arrive"
        assert run.service_name == "prefork-driver"
    by_name = {j["task_name"]: j for j in jobs}
    timed_out = runs[by_name["kit.sleep"]["task_id"]]
    assert by_name["kit.sleep"]["state"] == "TIMEOUT"
    assert timed_out.status_code == "ERROR"
    assert "TimeLimitExceeded" in timed_out.status_message
    assert by_name["kit.add"]["state"] == "SUCCESS"
    # the child's log line carries its task's context
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    hello = [line for line in lines if line.get("event") == "hello from a child"]
    assert len(hello) == 1, proc.stderr[-2000:]
    assert hello[0]["task_id"] == by_name["kit.log"]["task_id"]
    assert hello[0]["trace_id"] == runs[by_name["kit.log"]["task_id"]].trace_id


def _sqlite_available() -> bool:
    try:
        import millpond.brokers.sqlite  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _sqlite_available(), reason="the sqlite:// broker is not in this core yet")
def test_worker_with_prefork_exports_every_task_run(tmp_path: Path) -> None:
    from millpond.app import Millpond
    from tests.e2e.harness import WorkerProcess

    queue = f"prefork-{uuid.uuid4().hex[:8]}"
    url = f"sqlite://{tmp_path / 'b.db'}"
    with OtlpReceiver() as receiver:
        env = {
            **receiver.env("prefork-worker"),
            "MILLPOND_BROKER_URL": url,
            "MILLPOND_QUEUES": queue,
            "MILLPOND_PREFORK__MAX_TASKS_PER_CHILD": "1",
            "MILLPOND_SHUTDOWN_TIMEOUT": "20",
        }
        worker = WorkerProcess(
            ["-A", "millpond.testing.tasks:app", "-P", "prefork", "-c", "2"],
            env,
            tmp_path / "worker.log",
        )
        app = Millpond("producer", broker_url=url, default_queue=queue)
        try:
            worker.wait_ready(30)
            results = [app.send_task("kit.add", (i, i)) for i in range(50)]
            assert [r.get(timeout=60) for r in results] == [2 * i for i in range(50)]
            ids = {r.id for r in results}

            def complete(got: list[Any]) -> bool:
                runs = {
                    s.attributes.get("messaging.message.id") for s in got if s.name == "run kit.add"
                }
                processes = {
                    s.attributes.get("messaging.message.id")
                    for s in got
                    if s.name == f"process {queue}"
                }
                return ids <= runs and ids <= processes

            spans = receiver.wait_for(
                complete, timeout=30, what="the run and process spans of each of the 50 tasks"
            )
            worker.signal(15)
            assert worker.wait(30) == 0, worker.text()[-3000:]
        finally:
            worker.stop()
            app.close()
    runs = [s for s in spans if s.name == "run kit.add"]
    processes = {s.span_id: s for s in spans if s.name == f"process {queue}"}
    assert all(s.service_name == "prefork-worker" for s in runs)
    for run in runs:
        assert run.parent_span_id in processes, "a run span's process span is missing"
