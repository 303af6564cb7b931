"""Kubernetes probes on `millpond worker` subprocesses: /livez, /readyz, and what moves them."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tests.observability.conftest import POOLS, Proc, run_python

from millpond import Millpond
from millpond.config.settings import load_settings
from millpond.consume.worker import Worker
from millpond.testing.harness import wait_until
from millpond_health import probes

PROBES = {"MILLPOND_HEALTH__PORT": "0", "MILLPOND_HEALTH__HOST": "127.0.0.1"}
SEND_NAP = """
import json
from tests.observability.obs_app import nap
print(json.dumps(nap.delay({seconds}).id))
"""


def probe(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_probe(port: int, path: str, status: int, timeout: float = 10) -> dict[str, Any]:
    seen: list[Any] = []

    def check() -> dict[str, Any] | None:
        code, body = probe(port, path)
        seen[:] = [code, body]
        return body if code == status else None

    try:
        return wait_until(check, timeout, f"{path} to answer {status}")  # type: ignore[no-any-return]
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last answer: {seen}") from None


def _held(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(
            conn.execute("select count(*) from messages where consumer is not null").fetchone()[0]
        )


@pytest.mark.e2e
def test_live_ready_and_unready_during_a_warm_shutdown(
    spawn: Callable[..., Proc], obs_env: dict[str, str], tmp_path: Path
) -> None:
    worker = spawn("-P", "threads", "-c", "2", env=PROBES).wait_ready()
    port = worker.endpoint_port("/readyz")
    body = wait_probe(port, "/readyz", 200)
    assert body == {
        "status": "ok",
        "checks": {"started": True, "accepting": True, "pool": True, "broker": True, "loop": True},
    }
    code, live = probe(port, "/livez")
    assert code == 200
    assert live["status"] == "ok"
    assert live["loop_age_seconds"] < 5
    assert probe(port, "/healthz")[0] == 200
    code, missing = probe(port, "/nope")
    assert code == 404
    assert "/readyz" in missing["routes"]

    run_python(SEND_NAP.format(seconds=2.0), obs_env)
    wait_until(lambda: _held(tmp_path / "broker.sqlite3") == 1, 10, "the nap to be taken")
    worker.proc.send_signal(signal.SIGTERM)  # warm: the nap finishes first
    body = wait_probe(port, "/readyz", 503)
    assert body["checks"]["accepting"] is False
    assert body["checks"]["broker"] is True
    assert probe(port, "/livez")[0] == 200  # shutting down is not being dead
    assert worker.wait(30) == 0


@pytest.mark.e2e
@pytest.mark.parametrize("pool", POOLS)
def test_probes_and_scrape_on_every_pool(
    pool: str, spawn: Callable[..., Proc], obs_env: dict[str, str]
) -> None:
    """The probe thread (a greenlet under gevent and eventlet) answers on every pool, started
    after a prefork pool forked; --health-port is the command-line way to ask for it."""
    env = {
        "MILLPOND_HEALTH__HOST": "127.0.0.1",
        "OTEL_METRICS_EXPORTER": "prometheus",
        "OTEL_EXPORTER_PROMETHEUS_PORT": "0",
        "OTEL_EXPORTER_PROMETHEUS_HOST": "127.0.0.1",
    }
    worker = spawn(
        "-P", pool, "-c", "1" if pool == "solo" else "2", "--health-port", "0", env=env
    ).wait_ready()
    port = worker.endpoint_port("/readyz")
    assert worker.endpoint_port("/metrics") == port  # both asked for port 0: one server
    wait_probe(port, "/readyz", 200)
    assert probe(port, "/livez")[0] == 200
    run_python(SEND_NAP.format(seconds=0.01), obs_env)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert f'millpond_pool_size{{millpond_pool="{pool}"}} ' in text
    assert worker.stop() == 0


@pytest.mark.e2e
def test_readiness_follows_the_broker_and_liveness_does_not(
    spawn: Callable[..., Proc], obs_env: dict[str, str], tmp_path: Path
) -> None:
    """The broker's store becomes unwritable (another process holds its write lock): the
    consumer's lease heartbeat fails, /readyz turns 503 with `broker: false` while /livez stays
    200, and both recover when the store is back."""
    db = tmp_path / "broker.sqlite3"
    env = {
        **PROBES,
        "MILLPOND_BROKER_URL": f"sqlite://{db}?lease_timeout=30"
        "&heartbeat_interval=0.1&busy_timeout=0.05",
        "MILLPOND_PREFETCH_MULTIPLIER": "1",
    }
    # one unit, prefetch 1: while the nap runs the loop has no room and never touches the store,
    # so only the heartbeat meets the lock (the consumer loop itself is not under test here)
    worker = spawn("-P", "threads", "-c", "1", env=env).wait_ready()
    port = worker.endpoint_port("/readyz")
    wait_probe(port, "/readyz", 200)
    run_python(SEND_NAP.format(seconds=3.0), {**obs_env, **env})
    wait_until(lambda: _held(db) == 1, 10, "the nap to be taken")
    blocker = sqlite3.connect(db, timeout=5, isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        body = wait_probe(port, "/readyz", 503, timeout=5)
        assert body["checks"]["broker"] is False
        assert body["checks"]["started"]
        assert body["checks"]["loop"]
        code, live = probe(port, "/livez")
        assert code == 200
        assert live["status"] == "ok"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    wait_probe(port, "/readyz", 200, timeout=5)
    assert worker.stop() == 0


@pytest.mark.e2e
def test_a_long_task_on_solo_is_alive_not_stuck(
    spawn: Callable[..., Proc], obs_env: dict[str, str], tmp_path: Path
) -> None:
    worker = spawn("-P", "solo", env={**PROBES, "MILLPOND_HEALTH__LIVENESS_TIMEOUT": "1"})
    worker.wait_ready()
    port = worker.endpoint_port("/livez")
    run_python(SEND_NAP.format(seconds=2.5), obs_env)
    body = wait_probe(port, "/livez", 200)

    def inline_past_the_timeout() -> dict[str, Any] | None:
        code, live = probe(port, "/livez")
        assert code == 200, live
        return live if live.get("running_inline") and live["loop_age_seconds"] > 1 else None

    body = wait_until(inline_past_the_timeout, 10, "the loop to run the nap inline for > 1 s")
    assert body["status"] == "ok"
    assert worker.stop() == 0


@pytest.mark.e2e
def test_health_port_in_use_is_a_clear_start_up_error(
    spawn: Callable[..., Proc], obs_env: dict[str, str]
) -> None:
    first = spawn("-P", "solo", env=PROBES).wait_ready()
    port = first.endpoint_port("/livez")
    second = spawn("-P", "solo", env={**PROBES, "MILLPOND_HEALTH__PORT": str(port)})
    assert second.wait(30) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in second.text()
    assert first.stop() == 0


def test_liveness_and_readiness_logic() -> None:
    """The checks on a real (not running) Worker object: before start, fresh, stale, inline."""
    app = Millpond("probe-logic", broker_url="memory://probe-logic")
    app.task(name="probe.t")(lambda: None)
    worker = Worker(app, settings=load_settings({"pool": "solo"}, env={}, code=app.code_config))
    ok, details = probes.liveness(worker, 5)
    assert not ok
    assert details == {"loop": "not started yet"}
    worker.last_turn = time.monotonic()
    assert probes.liveness(worker, 5)[0]
    worker.last_turn = time.monotonic() - 30
    ok, details = probes.liveness(worker, 5)
    assert not ok
    assert details["loop_age_seconds"] >= 30
    worker.running_inline = True
    assert probes.liveness(worker, 5) == (
        True,
        {**probes.liveness(worker, 5)[1], "running_inline": True},
    )
    ready, details = probes.readiness(worker, 5)
    assert not ready
    assert details["checks"] == {
        "started": False,
        "accepting": True,
        "pool": False,
        "broker": False,
        "loop": True,
    }
    app.close()
