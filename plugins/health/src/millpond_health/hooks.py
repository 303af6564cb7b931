"""`HealthHooks`, the `health` entry of `millpond.hooks`: the probes' server for each worker.

It starts the server when the worker is ready, after the pool (a prefork pool forks before any
thread exists), and stops it when the worker stopped. Importing this module costs no HTTP code:
every worker imports it, only one with `health.port` set serves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from millpond.contracts.hooks import Hooks
from millpond_health.probes import routes_for
from millpond_health.server import serve, stop_serving
from millpond_health.settings import SECTION

if TYPE_CHECKING:
    from millpond.contracts.hooks import WorkerView


class HealthHooks(Hooks):
    """`/livez`, `/readyz` (and `/healthz`) on `health.port`, when that setting is set."""

    def describe_worker(self, worker: WorkerView) -> str:
        options = worker.settings.section(SECTION)
        if options["port"] is None:
            return ""
        where = f"{options['host']}:{options['port']}"
        return f"health:      http://{where}/livez, /readyz (health.host, health.port)"

    def worker_ready(self, worker: WorkerView) -> None:
        options = worker.settings.section(SECTION)
        if options["port"] is None:
            return
        routes = routes_for(worker, options["liveness_timeout"])
        server = serve(worker, options["host"], options["port"], routes)
        structlog.get_logger("millpond.health").info(
            "http endpoint listening", host=server.host, port=server.port, routes=sorted(routes)
        )

    def worker_stopped(self, worker: WorkerView) -> None:
        stop_serving(worker)
