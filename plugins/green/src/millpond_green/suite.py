"""Test classes shared by the gevent and eventlet suites: each suite subclasses them, names its
pool in class attributes, and adds only what is really its own (eventlet's deprecation notice,
gevent's late-patch warning).

Like `millpond_green.kit`, import this module from test modules only, after the suite's
conftest.py has patched the interpreter. A third-party green pool gets the same checks by
subclassing them (see docs/green-pools.md); it needs pytest (`millpond-green[testing]`).
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import pytest

from millpond import Millpond
from millpond.contracts.pool import BasePool
from millpond.exceptions import ConfigurationError
from millpond.testing import tasks
from millpond.testing.harness import (
    WorkerProcess,
    assert_clean_stderr,
    forget_queue,
    sqlite_url,
    unique,
)
from millpond.testing.pool_kit import kit_executor
from millpond_green.kit import (
    APP,
    TASKS,
    check_a_task_that_never_yields_starves_the_heartbeat,
    check_broker_io_in_one_greenlet,
    check_heartbeats_while_tasks_yield,
    check_warm_shutdown_finishes_running_tasks,
    green_app,
)

#: liveness windows of about a second, so a three-second task outlives several of them
BROKER_URLS = {
    "redis": "redis://127.0.0.1:6379/0?lease_timeout=1&heartbeat_interval=0.2",
    "amqp": "amqp://guest:guest@127.0.0.1:5672//?heartbeat=1",
}
BROKERS = [pytest.param(name, marks=getattr(pytest.mark, name)) for name in BROKER_URLS]


class GreenBrokerIOSuite:
    """The pool against real brokers: one green unit owns the consumer, and the brokers' helper
    threads (leases, AMQP heartbeats) keep beating while tasks yield; a task that never yields
    stops them (the documented limit of green pools)."""

    pool: ClassVar[str]

    @pytest.fixture
    def real_app(self, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Millpond]:
        name = request.param
        url = BROKER_URLS.get(name) or (
            f"sqlite://{tmp_path / 'b.db'}?lease_timeout=1&heartbeat_interval=0.2"
        )
        app = green_app(url, f"green-{self.pool}-{name}")
        yield app
        app.close()
        forget_queue(url, app.settings.default_queue)

    @pytest.mark.parametrize("real_app", BROKERS, indirect=True)
    def test_the_consumer_is_used_from_one_green_unit_only(
        self, real_app: Millpond, start_worker: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        check_broker_io_in_one_greenlet(real_app, start_worker, self.pool, monkeypatch)

    @pytest.mark.slow
    @pytest.mark.parametrize("real_app", [*BROKERS, "sqlite"], indirect=True)
    def test_heartbeats_keep_running_while_tasks_yield(
        self, real_app: Millpond, start_worker: Any, caplog: pytest.LogCaptureFixture
    ) -> None:
        check_heartbeats_while_tasks_yield(real_app, start_worker, self.pool, caplog, hold=3.0)

    @pytest.mark.slow
    @pytest.mark.redis
    @pytest.mark.parametrize("real_app", ["redis"], indirect=True)
    def test_a_task_that_never_yields_starves_the_heartbeat(
        self, real_app: Millpond, start_worker: Any, caplog: pytest.LogCaptureFixture
    ) -> None:
        check_a_task_that_never_yields_starves_the_heartbeat(
            real_app, start_worker, self.pool, caplog, burn=2.5
        )


class GreenPatchingSuite:
    """Early patching: the `millpond` command patches quietly, however the pool is chosen, and the
    pool in an unpatched interpreter refuses to start instead of hanging."""

    pool: ClassVar[str]
    pool_class: ClassVar[type[BasePool]]
    #: the plugin's `patch` module: `missing()` (what is still unpatched) and `patch()`
    patch_module: ClassVar[ModuleType]

    def check_worker_output(self, worker: WorkerProcess) -> None:
        """What else a patched worker's output must (not) say; a suite overrides it."""

    def _worker_for(self, how: str, tmp_path: Path, broker: str, queue: str) -> WorkerProcess:
        env = {"MILLPOND_BROKER_URL": broker, "MILLPOND_QUEUES": queue}
        if how == "flag":
            return WorkerProcess(["-A", APP, "-P", self.pool, "-c", "20"], env, tmp_path)
        if how == "env":
            return WorkerProcess(["-A", APP], {**env, "MILLPOND_POOL": self.pool}, tmp_path)
        (tmp_path / "millpond.toml").write_text(f'app = "{APP}"\npool = "{self.pool}"\n')
        return WorkerProcess([], env, tmp_path, cwd=tmp_path)

    @pytest.mark.e2e
    @pytest.mark.parametrize("how", ["flag", "env", "file"])
    def test_the_millpond_command_patches_first_and_quietly(self, how: str, tmp_path: Path) -> None:
        broker, queue = sqlite_url(tmp_path), unique("patch")
        worker = self._worker_for(how, tmp_path, broker, queue)
        producer = Millpond("producer", broker_url=broker, default_queue=queue, queues=[queue])
        try:
            worker.wait_ready()
            ready = worker.events("worker ready")[0]
            assert ready["pool"] == self.pool, ready
            seen: dict[str, Any] = producer.send_task(f"{TASKS}.probe").get(timeout=20)
            assert seen["patched_env"] == self.pool
            assert seen["socket_module"].startswith(f"{self.pool}."), seen
            assert seen["sleep_module"].startswith(self.pool), seen
            # Every Python thread (span exporter, broker lease keeper) is a green unit in the
            # main OS thread: proof that they were created after patching.
            assert all(t["same_os_thread"] for t in seen["threads"]), seen["threads"]
            assert worker.stop() == 0
        finally:
            worker.kill()
            producer.close()
        assert worker.events("worker stopped"), worker.stderr()[-3000:]
        assert_clean_stderr(worker)
        self.check_worker_output(worker)

    def test_an_unpatched_worker_refuses_to_start(self, tmp_path: Path) -> None:
        code = f"""
from millpond import Millpond
from millpond.consume.worker import Worker
app = Millpond("plain", broker_url={sqlite_url(tmp_path)!r}, queues=["q"], default_queue="q")
Worker(app, pool={self.pool!r}).run()
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
        assert last.startswith(
            f"RuntimeError: the {self.pool} pool needs this process monkey-patched"
        ), proc.stderr
        assert f"millpond worker -P {self.pool}" in last
        assert f"millpond_pool_{self.pool}.patch.patch()" in last
        assert "socket" in last

    def test_the_pool_accepts_this_patched_interpreter(self) -> None:
        assert self.patch_module.missing() == []
        self.pool_class.check_environment()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            self.patch_module.patch()  # a second call is a quiet no-op

    def test_declares_what_a_green_unit_can_do(self) -> None:
        caps = self.pool_class.capabilities
        assert caps.hard_time_limit
        assert caps.soft_time_limit
        assert caps.terminate_job
        assert caps.resize
        assert caps.concurrent
        assert self.pool_class.default_concurrency() == 100

    @pytest.mark.e2e
    def test_sigterm_lets_running_tasks_finish(self, tmp_path: Path) -> None:
        check_warm_shutdown_finishes_running_tasks(self.pool, tmp_path)

    def test_settings_it_does_not_have_are_refused(self) -> None:
        with pytest.raises(
            ConfigurationError, match=rf"the {self.pool} pool has no settings, but got size"
        ):
            self.pool_class(
                10, lambda job, outcome: None, {"size": 5}, execution=kit_executor(tasks.app)
            )
