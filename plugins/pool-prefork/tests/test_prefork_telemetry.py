"""Spans made in prefork children reach a real OTLP endpoint: every span a task body opens, even
when each child exits after one task (max_tasks_per_child=1) or is stopped by a hard time limit,
and each is a child of its job's `process` span, which the worker process records."""

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

HERE = Path(__file__).resolve().parent


def _env(receiver: OtlpReceiver, service: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MILLPOND_", "OTEL_"))}
    env.update(receiver.env(service))
    return env


def test_every_task_span_arrives_from_recycled_children() -> None:
    with OtlpReceiver() as receiver:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "prefork_driver",
                json.dumps({"jobs": 50, "max_tasks_per_child": 1}),
            ],
            cwd=HERE,
            env=_env(receiver, "prefork-driver"),
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        jobs: list[dict[str, Any]] = json.loads(proc.stdout.strip().splitlines()[-1])
        traced = [j for j in jobs if j["task_name"] == "kit.traced"]
        spans = receiver.wait_for(
            lambda got: (
                sum(s.name == "kit work" for s in got) >= len(traced)
                and sum(s.name == "process kit" for s in got) >= len(jobs)
            ),
            timeout=20,
            what=f"{len(traced)} task spans from the children and {len(jobs)} process spans",
        )
    processes = {s.span_id: s for s in spans if s.name == "process kit"}
    works = {s.parent_span_id: s for s in spans if s.name == "kit work"}
    child_pids = set()
    for job in traced:
        _, trace_id, process_span_id, _ = job["traceparent"].split("-")
        work = works.get(process_span_id)
        assert work is not None, f"no task span from the child for {job['task_id']}"
        assert work.trace_id == trace_id
        assert process_span_id in processes, "the worker's process span did not arrive"
        assert work.service_name == "prefork-driver"
        child_pids.add(work.attributes["kit.pid"])
    assert len(child_pids) == len(traced), "max_tasks_per_child=1: each task in its own child"
    by_name = {j["task_name"]: j for j in jobs}
    assert by_name["kit.sleep"]["state"] == "TIMEOUT"
    timed_out = processes[by_name["kit.sleep"]["traceparent"].split("-")[2]]
    assert timed_out.status_code == "ERROR"
    assert "TimeLimitExceeded" in timed_out.status_message
    # the child's log line carries its task's context and its process span's ids
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    hello = [line for line in lines if line.get("event") == "hello from a child"]
    assert len(hello) == 1, proc.stderr[-2000:]
    assert hello[0]["task_id"] == by_name["kit.log"]["task_id"]
    _, log_trace, log_span, _ = by_name["kit.log"]["traceparent"].split("-")
    assert (hello[0]["trace_id"], hello[0]["span_id"]) == (log_trace, log_span)


def test_worker_with_prefork_exports_every_task_span(tmp_path: Path) -> None:
    from millpond.produce.app import Millpond
    from millpond.testing.harness import WorkerProcess

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
            tmp_path,
        )
        app = Millpond("producer", broker_url=url, default_queue=queue)
        try:
            worker.wait_ready(30)
            results = [app.send_task("kit.traced", (i, i)) for i in range(50)]
            assert [r.get(timeout=60) for r in results] == [2 * i for i in range(50)]
            ids = {r.id for r in results}

            def complete(got: list[Any]) -> bool:
                processes = {
                    s.attributes.get("messaging.message.id")
                    for s in got
                    if s.name == f"process {queue}"
                }
                return ids <= processes and sum(s.name == "kit work" for s in got) >= len(ids)

            spans = receiver.wait_for(
                complete, timeout=30, what="the process and task spans of each of the 50 tasks"
            )
            assert worker.stop(30) == 0, worker.stderr()[-3000:]
        finally:
            worker.kill()
            app.close()
    works = [s for s in spans if s.name == "kit work"]
    processes = {s.span_id: s for s in spans if s.name == f"process {queue}"}
    assert all(s.service_name == "prefork-worker" for s in works)
    for work in works:
        assert work.parent_span_id in processes, "a task span's process span is missing"
