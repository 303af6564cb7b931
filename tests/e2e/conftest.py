from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from millpond.testing.harness import WorkerProcess
from tests.e2e.harness import ROOT


@pytest.fixture
def e2e_env(tmp_path: Path) -> dict[str, str]:
    """Settings for a worker and a producer sharing a fresh embedded broker and a unique queue."""
    queue = f"e2e-{uuid.uuid4().hex[:10]}"
    return {
        "MILLPOND_BROKER_URL": f"sqlite://{tmp_path / 'broker.sqlite3'}?lease_timeout=3&heartbeat_interval=0.5",
        "MILLPOND_QUEUES": queue,
        "MILLPOND_DEFAULT_QUEUE": queue,
        "E2E_DIR": str(tmp_path),
        "MILLPOND_SHUTDOWN_TIMEOUT": "20",
    }


@pytest.fixture
def spawn_worker(tmp_path: Path, e2e_env: dict[str, str]) -> Iterator[Any]:
    started: list[WorkerProcess] = []

    def spawn(*args: str, env: dict[str, str] | None = None, name: str = "worker") -> WorkerProcess:
        worker = WorkerProcess(
            ["-A", "tests.e2e.app:app", *args],
            {**e2e_env, **(env or {})},
            tmp_path,
            name=f"{name}-{len(started)}",
            cwd=ROOT,
        )
        started.append(worker)
        return worker

    yield spawn
    for worker in started:
        worker.kill()


@pytest.fixture
def producer(e2e_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The e2e app configured (in this test process) to send to the same broker and queue."""
    for key, value in e2e_env.items():
        monkeypatch.setenv(key, value)
    from millpond.config.settings import load_settings
    from tests.e2e.app import app

    app.configure(load_settings())
    yield app
    app.close()
