"""What live and ready mean for a worker, and the routes that answer them.

Liveness asks "is the consumer loop still turning?": the loop stamps `Worker.last_turn` on every
iteration (it wakes at least once a second even when idle), so a loop stuck in a broker call or a
deadlock fails the probe after `health.liveness_timeout` seconds and the kubelet restarts the pod.
A task running inline on the solo pool holds the loop by design; that counts as turning, or every
long solo task would get its worker killed and its message redelivered forever.

Readiness asks "can this worker take work now?": started, consuming, its pool started, its broker
connection up (`Consumer.connected`), and not shutting down. A broker outage makes the worker
unready but still live, so Kubernetes waits for the broker instead of restarting pods in a loop.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from millpond_health.server import JSON, Route

if TYPE_CHECKING:
    from millpond.contracts.hooks import WorkerView


def liveness(worker: WorkerView, timeout: float) -> tuple[bool, dict[str, Any]]:
    """Whether the consumer loop turned within `timeout` seconds, and the details."""
    last = worker.last_turn
    if not last:
        return False, {"loop": "not started yet"}
    age = time.monotonic() - last
    inline = worker.running_inline
    ok = age <= timeout or inline
    details: dict[str, Any] = {"loop_age_seconds": round(age, 3), "timeout_seconds": timeout}
    if inline:
        details["running_inline"] = True  # solo: the loop is running a task, not stuck
    return ok, details


def readiness(worker: WorkerView, timeout: float) -> tuple[bool, dict[str, Any]]:
    """Whether the worker is started, consuming, connected, live, and not shutting down."""
    checks: dict[str, bool] = {}
    checks["started"] = worker.ready.is_set()
    checks["accepting"] = not worker.stopping.is_set()
    pool, consumer = worker.pool, worker.consumer
    checks["pool"] = bool(pool is not None and pool.started)
    try:
        connected = bool(consumer is not None and consumer.connected)
    except Exception:
        connected = False  # a probe never raises: a consumer that cannot say is not ready
    checks["broker"] = connected
    checks["loop"] = liveness(worker, timeout)[0]
    return all(checks.values()), {"checks": checks}


def _json(ok: bool, details: dict[str, Any]) -> tuple[int, str, bytes]:
    body = {"status": "ok" if ok else "fail", **details}
    return (200 if ok else 503), JSON, json.dumps(body).encode()


def routes_for(worker: WorkerView, liveness_timeout: float) -> dict[str, Route]:
    """The probe routes of a worker: /livez, /readyz (and /healthz, an alias of /livez)."""

    def livez() -> tuple[int, str, bytes]:
        return _json(*liveness(worker, liveness_timeout))

    def readyz() -> tuple[int, str, bytes]:
        return _json(*readiness(worker, liveness_timeout))

    return {"/livez": livez, "/healthz": livez, "/readyz": readyz}
