"""A twelve-factor worker: `millpond worker` with no settings file and no flags, configured only
by MILLPOND_* and OTEL_* variables, as a container platform would start it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest

from millpond.produce.app import Millpond
from tests.install.venvs import clean_env, wait_for

REDIS_URL = "redis://127.0.0.1:6379/0"
APP = textwrap.dedent("""
    import asyncio

    import structlog

    from millpond import Millpond

    app = Millpond("orders")


    @app.task(name="orders.confirm")
    async def confirm(order_id):
        await asyncio.sleep(0.01)
        structlog.get_logger("orders").info("order confirmed", order_id=order_id)
        return {"order_id": order_id, "log": dict(structlog.contextvars.get_contextvars())}
""")


def spans_in(text: str) -> list[dict[str, Any]]:
    """The spans the console exporter printed (one JSON object per span, pretty-printed)."""
    decoder = json.JSONDecoder()
    spans, index = [], 0
    while (start := text.find('{\n    "name"', index)) != -1:
        span, index = decoder.raw_decode(text, start)
        spans.append(span)
    return spans


@pytest.mark.e2e
@pytest.mark.redis
def test_worker_configured_only_by_environment_variables(tmp_path: Path) -> None:
    (tmp_path / "orders_app.py").write_text(APP)
    assert not (tmp_path / "millpond.toml").exists()
    queue = f"tf-{uuid.uuid4().hex[:10]}"
    env = clean_env(
        {
            "MILLPOND_APP": "orders_app:app",
            "MILLPOND_POOL": "asyncio",
            "MILLPOND_CONCURRENCY": "20",
            "MILLPOND_BROKER_URL": REDIS_URL,
            "MILLPOND_QUEUES": queue,
            "MILLPOND_DEFAULT_QUEUE": queue,
            "MILLPOND_WORKER_NAME": "orders-7f9c",
            "MILLPOND_LOG_FORMAT": "json",
            "MILLPOND_SHUTDOWN_TIMEOUT": "10",
            "MILLPOND_ASYNCIO__SYNC_TASKS": "refuse",
            "MILLPOND_REDIS__LEASE_TIMEOUT": "20",
            "MILLPOND_ACKS_LATE": "yes",
            "MILLPOND_IGNORE_RESULT": "off",
            "OTEL_TRACES_EXPORTER": "console",
            "OTEL_SERVICE_NAME": "orders-worker",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
        }
    )
    millpond = str(Path(sys.executable).parent / "millpond")
    # what the worker will use, as `millpond config` shows it from the same environment
    shown = subprocess.run(
        [millpond, "config"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    rows = {line.split()[0]: line.split()[1:4] for line in shown.stdout.splitlines()}
    assert rows["pool"] == ["asyncio", "env", "MILLPOND_POOL"]
    assert rows["acks_late"] == ["True", "env", "MILLPOND_ACKS_LATE"]
    assert rows["ignore_result"] == ["False", "env", "MILLPOND_IGNORE_RESULT"]
    assert rows["asyncio.sync_tasks"] == ["refuse", "env", "MILLPOND_ASYNCIO__SYNC_TASKS"]
    assert rows["redis.lease_timeout"] == ["20.0", "env", "MILLPOND_REDIS__LEASE_TIMEOUT"]
    assert rows["redis.heartbeat_interval"][:2] == ["2.0", "default"]
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        worker = subprocess.Popen(
            [millpond, "worker"], cwd=tmp_path, env=env, stdout=stdout, stderr=stderr
        )
    producer = Millpond("orders-producer", broker_url=REDIS_URL, default_queue=queue)
    try:
        wait_for(
            lambda: worker.poll() is not None or "worker ready" in err.read_text(),
            30,
            "the worker to start",
        )
        assert worker.poll() is None, err.read_text()
        handles = [producer.send_task("orders.confirm", (f"o-{i}",)) for i in range(5)]
        results = [h.get(timeout=20) for h in handles]
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0, err.read_text()
    finally:
        producer.close()
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
    for handle, got in zip(handles, results, strict=True):
        assert got["log"]["task_id"] == handle.id
    logs = [json.loads(line) for line in err.read_text().splitlines() if line.startswith("{")]
    ready = next(line for line in logs if line["event"] == "worker ready")
    assert (ready["worker"], ready["pool"], ready["concurrency"], ready["queues"]) == (
        "orders-7f9c",
        "asyncio",
        20,
        [queue],
    )
    confirmed = [line for line in logs if line["event"] == "order confirmed"]
    assert {line["task_id"] for line in confirmed} == {h.id for h in handles}
    assert all(line["trace_id"] and line["span_id"] for line in confirmed), confirmed
    banner = out.read_text()
    assert "broker:      redis://127.0.0.1:6379/0" in banner
    assert "orders.confirm" in banner
    processes = [s for s in spans_in(banner) if s["name"] == f"process {queue}"]
    assert len(processes) == 5, banner[-3000:]
    assert {s["resource"]["attributes"]["service.name"] for s in processes} == {"orders-worker"}
    traces = {line["task_id"]: line["trace_id"] for line in confirmed}
    for span in processes:
        task_id = span["attributes"]["messaging.message.id"]
        assert span["context"]["trace_id"] == "0x" + traces[task_id]
