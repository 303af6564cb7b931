"""rpc:// between Celery 5.7 and millpond, both ways, on the real RabbitMQ: a Celery producer with
`result_backend = "rpc://"` (a subprocess) gets its results from a `millpond worker`, and a
millpond producer (this process) gets its results from a `celery worker`: a success, a failure and
its exception type, a retry, a long task, a held task whose result comes after later ones, and a
chain (its later steps sent by the worker, replying to the caller)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import amqp
import pytest

from millpond import Millpond, chain
from millpond.contracts.broker import dead_letter_queue
from millpond.exceptions import TimeoutError as ResultTimeout
from millpond.states import TaskState
from millpond.testing.harness import WorkerProcess, wait_until
from tests.e2e.harness import ROOT
from tests.e2e.rpc_app import declare_gate, open_gate

pytestmark = [pytest.mark.amqp, pytest.mark.e2e, pytest.mark.slow]

URL = "amqp://guest:guest@127.0.0.1:5672//"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def names() -> Iterator[dict[str, str]]:
    """A work queue and a gate queue for this test, deleted afterwards."""
    made = {"queue": unique("mp-rpc-interop"), "gate": unique("mp-rpc-gate")}
    yield made
    with amqp.Connection("127.0.0.1:5672", userid="guest", password="guest") as conn:
        chan = conn.channel()
        for queue in (made["queue"], dead_letter_queue(made["queue"]), made["gate"]):
            chan.queue_delete(queue)
        chan.exchange_delete(made["queue"])


CELERY_CALLER = """
import json, os
from celery import Celery, chain
from tests.e2e.rpc_app import declare_gate, open_gate

app = Celery("caller", broker="pyamqp://guest:guest@127.0.0.1:5672//", backend="rpc://")
app.conf.task_default_queue = os.environ["RPC_QUEUE"]
gate = os.environ["RPC_GATE"]
out = {}
out["add"] = app.send_task("rpc.add", (2, 3)).get(timeout=30)
failed = app.send_task("rpc.fail", ("bad input",))
try:
    failed.get(timeout=30)
except Exception as exc:
    out["fail"] = [type(exc).__module__, type(exc).__name__, str(exc), failed.state]
out["flaky"] = app.send_task("rpc.flaky", (2,)).get(timeout=30)
declare_gate(gate)
held = app.send_task("rpc.gated", (gate, {"late": True}))
slow = app.send_task("rpc.slow", (2.0,))
quick = app.send_task("rpc.add", (1, 1))
out["quick"] = quick.get(timeout=30)
out["slow"] = slow.get(timeout=30)
out["held_before"] = held.state
open_gate(gate)
out["held"] = held.get(timeout=30)
steps = chain(app.signature("rpc.add", (1, 1)), app.signature("rpc.add", (10,)))
out["chain"] = steps.apply_async().get(timeout=30)
app.close()
print(json.dumps(out))
"""


def test_celery_producer_gets_results_from_a_millpond_worker(
    names: dict[str, str], tmp_path: Path
) -> None:
    queue = names["queue"]
    env = {
        "MILLPOND_BROKER_URL": URL,
        "MILLPOND_RESULT_BACKEND": "rpc://",
        "MILLPOND_QUEUES": queue,
        "MILLPOND_DEFAULT_QUEUE": queue,
    }
    worker = WorkerProcess(
        ["-A", "tests.e2e.rpc_app:app", "-P", "threads", "-c", "4"], env, tmp_path, cwd=ROOT
    )
    try:
        worker.wait_ready()
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(CELERY_CALLER)],
            cwd=ROOT,
            env={
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "RPC_QUEUE": queue,
                "RPC_GATE": names["gate"],
            },
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, f"{done.stderr}\n--- worker ---\n{worker.text()}"
        out = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        worker.kill()
    assert out["add"] == 5
    # Celery rebuilds the failure as the builtin type millpond stored
    assert out["fail"] == ["builtins", "ValueError", "bad input", "FAILURE"]
    assert out["flaky"] == 2  # millpond's retries kept the Celery caller's reply_to
    assert (out["quick"], out["slow"], out["held_before"]) == (2, 2.0, "PENDING")
    assert out["held"] == {"late": True}
    assert out["chain"] == 12  # the second step, sent by the millpond worker, replied to Celery


@pytest.fixture
def celery_worker(names: dict[str, str], tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A Celery 5.7 worker with rpc:// results on the test's queue, killed by PID afterwards."""
    log = tmp_path / "celery.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tests.interop.celery_rpc_app",
                "worker",
                "-P",
                "threads",
                "-c",
                "4",
                "-Q",
                names["queue"],
                "--without-mingle",
                "--without-gossip",
                "--without-heartbeat",
                "--loglevel",
                "INFO",
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "RPC_QUEUE": names["queue"]},
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the Celery worker exited:\n{log.read_text()}")
        return " ready." in log.read_text()

    try:
        wait_until(ready, 60, "the Celery worker to be ready")
        yield proc
    finally:
        proc.kill()  # Celery's own warm shutdown takes seconds; nothing runs any more
        proc.wait(10)


def test_millpond_producer_gets_results_from_a_celery_worker(
    celery_worker: subprocess.Popen[bytes], names: dict[str, str]
) -> None:
    queue, gate = names["queue"], names["gate"]
    app = Millpond("caller", broker_url=URL, result_backend="rpc://", default_queue=queue)
    try:
        assert app.send_task("rpc.add", (2, 3)).get(timeout=30) == 5
        failed = app.send_task("rpc.fail", ("bad input",))
        with pytest.raises(ValueError, match="bad input"):
            failed.get(timeout=30)
        assert failed.state == TaskState.FAILURE
        assert "ValueError: bad input" in (failed.traceback or "")
        assert app.send_task("rpc.flaky", (2,)).get(timeout=30) == 2  # Celery kept reply_to
        declare_gate(gate)
        held = app.send_task("rpc.gated", (gate, {"late": True}))
        slow = app.send_task("rpc.slow", (2.0,))
        quick = app.send_task("rpc.add", (1, 1))
        assert quick.get(timeout=30) == 2
        assert slow.get(timeout=30) == 2.0
        assert held.state == TaskState.PENDING
        with pytest.raises(ResultTimeout):
            held.get(timeout=0.2)
        open_gate(gate)
        assert held.get(timeout=30) == {"late": True}
        # the Celery worker sends the second step with the reply_to millpond put in its options
        add = app.signature
        steps = chain(add("rpc.add", (1, 1), queue=queue), add("rpc.add", (10,), queue=queue))
        assert steps.apply_async().get(timeout=30) == 12
    finally:
        app.close()
