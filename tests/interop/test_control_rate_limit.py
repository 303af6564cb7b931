"""Real Celery 5.7 `control rate_limit` (the CLI and `app.control.rate_limit`) against a `millpond
worker` subprocess on Redis and on RabbitMQ: Celery's replies, and the new rate as the tasks'
own start times show it.

The worker runs the rate-limit e2e app (`rl.free` has no limit of its own) on a queue and a
control namespace of its own, fed by a Celery producer.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from millpond.testing.harness import WorkerProcess, forget_queue
from tests.interop.conftest import BROKERS, REDIS, ROOT, WAIT, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.e2e]


@dataclass
class Node:
    broker: str
    name: str
    queue: str
    home: Path
    worker: WorkerProcess
    celery: Any
    env: dict[str, str]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "celery", "-A", "tests.interop.celery_app", "control", *args,
             "-d", self.name, "--timeout", "5"],
            cwd=ROOT, env={**os.environ, **self.env}, capture_output=True, text=True,
            timeout=WAIT, check=False,
        )  # fmt: skip

    def starts(self, kind: str) -> list[float]:
        path = self.home / "runs.log"
        if not path.exists():
            return []
        return sorted(
            float(line.split()[1])
            for line in path.read_text().splitlines()
            if line.split()[0] == kind
        )

    def run_free(self, count: int) -> list[float]:
        before = len(self.starts("free"))
        for n in range(count):
            self.celery.send_task("rl.free", (n,), queue=self.queue)
        return wait_until(
            lambda: len(self.starts("free")) >= before + count and self.starts("free")[before:],
            WAIT,
            lambda: f"{count} rl.free tasks to run\n{self.worker.text()[-3000:]}",
        )


@pytest.fixture(scope="module", params=["redis", pytest.param("amqp", marks=pytest.mark.amqp)])
def node(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Node]:
    from tests.interop.celery_app import make_app

    broker = BROKERS[request.param]
    tag = uuid.uuid4().hex[:10]
    namespace, queue, name = f"rl-ctl-{tag}", f"rl-ctl-{tag}-q", f"rl-{tag}@test"
    home = tmp_path_factory.mktemp(f"rate-limit-control-{request.param}")
    worker = WorkerProcess(
        ["-A", "tests.e2e.ratelimit_app:app", "-P", "threads", "-c", "4", "-Q", queue],
        {
            "MILLPOND_BROKER_URL": broker,
            "MILLPOND_RESULT_BACKEND": REDIS,
            "MILLPOND_IGNORE_RESULT": "true",
            "MILLPOND_RATE_LIMIT_STORE": REDIS,
            "MILLPOND_CONTROL__EXCHANGE": namespace,
            "MILLPOND_WORKER_NAME": name,
            "MILLPOND_HOME": str(home),
            "E2E_DIR": str(home),
        },
        home,
        cwd=ROOT,
    )
    app = make_app(broker, REDIS, queue, control_exchange=namespace)
    env = {
        "INTEROP_BROKER": broker,
        "INTEROP_BACKEND": REDIS,
        "INTEROP_QUEUE": queue,
        "INTEROP_CONTROL_EXCHANGE": namespace,
    }
    try:
        worker.wait_ready(WAIT)
        yield Node(request.param, name, queue, home, worker, app, env)
    finally:
        app.close()
        worker.kill()
        forget_queue(broker, queue)


def test_celery_cli_sets_a_rate_limit_that_the_worker_keeps(node: Node) -> None:
    unlimited = node.run_free(8)
    assert unlimited[-1] - unlimited[0] < 1.0, "rl.free has no limit of its own"
    done = node.cli("rate_limit", "rl.free", "4/s")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"->  {node.name}: OK" in done.stdout
    assert "new rate limit set successfully" in done.stdout
    starts = node.run_free(9)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) > 0.2, f"two starts {min(gaps):.3f} s apart after rate_limit 4/s"
    assert (len(starts) - 1) / (starts[-1] - starts[0]) <= 4.2

    done = node.cli("rate_limit", "rl.free", "0")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rate limit disabled successfully" in done.stdout
    starts = node.run_free(8)
    assert starts[-1] - starts[0] < 1.0, "the limit is off again"


def test_app_control_rate_limit_answers_errors_as_celery_does(node: Node) -> None:
    control = node.celery.control
    assert control.rate_limit("rl.free", "10/m", destination=[node.name], reply=True,
                              timeout=5.0) == [{node.name: {"ok": "new rate limit set successfully"}}]  # fmt: skip
    assert control.rate_limit("rl.nope", "1/s", destination=[node.name], reply=True,
                              timeout=5.0) == [{node.name: {"error": "unknown task"}}]  # fmt: skip
    (reply,) = control.rate_limit(
        "rl.free", "1/fortnight", destination=[node.name], reply=True, timeout=5.0
    )
    assert reply[node.name]["error"].startswith("Invalid rate limit string: ")
    assert control.rate_limit("rl.free", "", destination=[node.name], reply=True,
                              timeout=5.0) == [{node.name: {"ok": "rate limit disabled successfully"}}]  # fmt: skip


def test_millpond_cli_sets_it_too(node: Node) -> None:
    def millpond_control(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "millpond", "control", "rate_limit", *args,
             "-d", node.name, "-t", "5"],
            cwd=ROOT, capture_output=True, text=True, timeout=WAIT, check=False,
            env={**os.environ, "MILLPOND_BROKER_URL": BROKERS[node.broker],
                 "MILLPOND_CONTROL__EXCHANGE": node.env["INTEROP_CONTROL_EXCHANGE"]},
        )  # fmt: skip

    done = millpond_control("rl.free", "30/m")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"->  {node.name}: OK" in done.stdout
    assert "new rate limit set successfully" in done.stdout
    done = millpond_control("rl.free", "0")
    assert "rate limit disabled successfully" in done.stdout, done.stdout + done.stderr
