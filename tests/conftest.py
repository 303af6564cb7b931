"""Shared fixtures: in-process workers on the memory broker, unique names, tracing capture."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from millpond import Millpond
from millpond.settings import load_settings


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class RunningWorker:
    """A real Worker running `run()` in a background thread, stopped by the fixture."""

    def __init__(self, app: Millpond, **flags: Any) -> None:
        from millpond.worker import Worker

        settings = load_settings(flags, env={}, code=app.code_config)
        self.worker = Worker(app, settings=settings)
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="test-worker", daemon=True)

    def _run(self) -> None:
        try:
            self.exit_code = self.worker.run()
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def start(self) -> RunningWorker:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.worker.ready.wait(0.01):
            if self.error is not None:
                raise self.error
            if time.monotonic() > deadline:
                raise AssertionError("worker did not become ready within 15 s")
        return self

    def stop(self, cold: bool = False, timeout: float = 30) -> int | None:
        self.worker.stop(cold=cold)
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError(f"worker did not stop within {timeout} s")
        if self.error is not None:
            raise self.error
        return self.exit_code


@pytest.fixture
def memory_app() -> Iterator[Millpond]:
    """An app on a private memory:// broker with a unique queue."""
    name = unique("mem")
    app = Millpond("test", broker_url=f"memory://{name}", default_queue=name, queues=[name])
    yield app
    app.close()


@pytest.fixture
def start_worker() -> Iterator[Any]:
    started: list[RunningWorker] = []

    def start(app: Millpond, **flags: Any) -> RunningWorker:
        running = RunningWorker(app, **flags).start()
        started.append(running)
        return running

    yield start
    for running in started:
        if running.thread.is_alive():
            running.stop(cold=True)


@pytest.fixture(scope="session")
def span_exporter() -> Any:
    """An in-memory span exporter attached to this process's (single) SDK tracer provider."""
    from millpond.testing.otel import memory_exporter

    return memory_exporter()
