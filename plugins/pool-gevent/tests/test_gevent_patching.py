"""Early patching for the gevent pool: the `millpond` command patches quietly, however the pool is
chosen, and a gevent pool in an unpatched interpreter refuses to start instead of hanging."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

from millpond import Millpond
from millpond.exceptions import ConfigurationError
from millpond.testing import tasks
from millpond.testing.harness import WorkerProcess, assert_clean_stderr, sqlite_url, unique
from millpond.testing.pool_kit import kit_executor
from millpond_green.kit import check_warm_shutdown_finishes_running_tasks
from millpond_pool_gevent import GeventPool
from millpond_pool_gevent.patch import missing, patch

pytestmark = pytest.mark.green

APP = "millpond_green.kit_app:app"


def _worker_for(how: str, tmp_path: Path, broker: str, queue: str) -> WorkerProcess:
    env = {"MILLPOND_BROKER_URL": broker, "MILLPOND_QUEUES": queue}
    if how == "flag":
        return WorkerProcess(["-A", APP, "-P", "gevent", "-c", "20"], env, tmp_path)
    if how == "env":
        return WorkerProcess(["-A", APP], {**env, "MILLPOND_POOL": "gevent"}, tmp_path)
    (tmp_path / "millpond.toml").write_text(f'app = "{APP}"\npool = "gevent"\n')
    return WorkerProcess([], env, tmp_path, cwd=tmp_path)


@pytest.mark.e2e
@pytest.mark.parametrize("how", ["flag", "env", "file"])
def test_the_millpond_command_patches_first_and_quietly(how: str, tmp_path: Path) -> None:
    broker, queue = sqlite_url(tmp_path), unique("patch")
    worker = _worker_for(how, tmp_path, broker, queue)
    producer = Millpond("producer", broker_url=broker, default_queue=queue, queues=[queue])
    try:
        worker.wait_ready()
        ready = worker.events("worker ready")[0]
        assert ready["pool"] == "gevent", ready
        seen: dict[str, Any] = producer.send_task("millpond_green.kit_app.probe").get(timeout=20)
        assert seen["patched_env"] == "gevent"
        assert seen["socket_module"].startswith("gevent."), seen
        assert seen["sleep_module"].startswith("gevent"), seen
        # Every Python thread (span exporter, broker lease keeper) is a greenlet in the main OS
        # thread: proof that they were created after patching.
        assert all(t["same_os_thread"] for t in seen["threads"]), seen["threads"]
        assert worker.stop() == 0
    finally:
        worker.kill()
        producer.close()
    assert worker.events("worker stopped"), worker.stderr()[-3000:]
    assert_clean_stderr(worker)


def test_the_warning_check_would_catch_a_late_patch() -> None:
    """The stderr check above is not vacuous: patching after ssl users were imported warns."""
    code = "import requests\nfrom millpond_pool_gevent.patch import patch\npatch()\n"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "MonkeyPatchWarning" in proc.stderr


def test_an_unpatched_worker_refuses_to_start(tmp_path: Path) -> None:
    code = f"""
from millpond import Millpond
from millpond.exceptions import ConfigurationError
from millpond.consume.worker import Worker
app = Millpond("plain", broker_url={sqlite_url(tmp_path)!r}, queues=["q"], default_queue="q")
Worker(app, pool="gevent").run()
"""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: the gevent pool needs this process monkey-patched"), (
        proc.stderr
    )
    assert "millpond worker -P gevent" in last
    assert "millpond_pool_gevent.patch.patch()" in last
    assert "socket" in last


def test_the_pool_accepts_this_patched_interpreter() -> None:
    assert missing() == []
    GeventPool.check_environment()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch()  # a second call is a quiet no-op


def test_declares_what_a_greenlet_can_do() -> None:
    caps = GeventPool.capabilities
    assert caps.hard_time_limit
    assert caps.soft_time_limit
    assert caps.terminate_job
    assert caps.resize
    assert not caps.max_tasks_per_child
    assert not caps.max_memory_per_child
    assert caps.concurrent
    assert GeventPool.default_concurrency() == 100
    assert GeventPool.needs_patching


@pytest.mark.e2e
def test_sigterm_lets_running_tasks_finish(tmp_path: Path) -> None:
    check_warm_shutdown_finishes_running_tasks("gevent", tmp_path)


def test_settings_it_does_not_have_are_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"the gevent pool has no settings, but got size"):
        GeventPool(10, lambda job, outcome: None, {"size": 5}, execution=kit_executor(tasks.app))
