"""The gevent pool against real brokers: one greenlet owns the consumer, and the brokers' helper
threads (leases, AMQP heartbeats) keep beating while tasks yield; a task that never yields stops
them (the documented limit of green pools)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from millpond import Millpond
from millpond.testing.harness import forget_queue
from millpond_green.kit import (
    check_a_task_that_never_yields_starves_the_heartbeat,
    check_broker_io_in_one_greenlet,
    check_heartbeats_while_tasks_yield,
    green_app,
)

pytestmark = pytest.mark.green

POOL = "gevent"
#: liveness windows of about a second, so a three-second task outlives several of them
URLS = {
    "redis": "redis://127.0.0.1:6379/0?lease_timeout=1&heartbeat_interval=0.2",
    "amqp": "amqp://guest:guest@127.0.0.1:5672//?heartbeat=1",
}
BROKERS = [pytest.param(name, marks=getattr(pytest.mark, name)) for name in URLS]


@pytest.fixture
def real_app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Millpond]:
    name = request.param
    url = URLS.get(name) or f"sqlite://{tmp_path / 'b.db'}?lease_timeout=1&heartbeat_interval=0.2"
    app = green_app(url, f"green-{POOL}-{name}")
    yield app
    app.close()
    forget_queue(url, app.settings.default_queue)


@pytest.mark.parametrize("real_app", BROKERS, indirect=True)
def test_the_consumer_is_used_from_one_greenlet_only(
    real_app: Millpond, start_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_broker_io_in_one_greenlet(real_app, start_worker, POOL, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("real_app", [*BROKERS, "sqlite"], indirect=True)
def test_heartbeats_keep_running_while_tasks_yield(
    real_app: Millpond, start_worker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    check_heartbeats_while_tasks_yield(real_app, start_worker, POOL, caplog, hold=3.0)


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.parametrize("real_app", ["redis"], indirect=True)
def test_a_task_that_never_yields_starves_the_heartbeat(
    real_app: Millpond, start_worker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    check_a_task_that_never_yields_starves_the_heartbeat(
        real_app, start_worker, POOL, caplog, burn=2.5
    )
