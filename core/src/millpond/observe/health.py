"""Kubernetes probes for a worker: `/livez` and `/readyz` over plain HTTP, from one small thread.

Liveness asks "is the consumer loop still turning?": the loop stamps `Worker.last_turn` on every
iteration (it wakes at least once a second even when idle), so a loop stuck in a broker call or a
deadlock fails the probe after `health_liveness_timeout` seconds and the kubelet restarts the pod.
A task running inline on the solo pool holds the loop by design; that counts as turning, or every
long solo task would get its worker killed and its message redelivered forever.

Readiness asks "can this worker take work now?": started, consuming, its pool started, its broker
connection up (`Consumer.connected`), and not shutting down. A broker outage makes the worker
unready but still live, so Kubernetes waits for the broker instead of restarting pods in a loop.

The server is the standard library's `ThreadingHTTPServer` (under gevent or eventlet its threads
are greenlets). `HealthHooks` (the `health` entry of `millpond.hooks`) starts it when the worker is
ready, after the pool (a prefork pool forks before any thread exists). Other hooks can serve routes
on the same port (`serve`): the metrics plugin's `/metrics` shares it when both name one port.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from millpond.contracts.hooks import Hooks
from millpond.exceptions import ConfigurationError

if TYPE_CHECKING:
    from millpond.contracts.hooks import WorkerView as Worker

#: a route: returns (HTTP status, content type, body)
Route = Callable[[], tuple[int, str, bytes]]

_JSON = "application/json"


def liveness(worker: Worker, timeout: float) -> tuple[bool, dict[str, Any]]:
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


def readiness(worker: Worker, timeout: float) -> tuple[bool, dict[str, Any]]:
    """Whether the worker is started, consuming, connected, live, and not shutting down."""
    checks: dict[str, bool] = {}
    checks["started"] = worker.ready.is_set()
    checks["accepting"] = worker.accepting
    pool = worker.pool
    checks["pool"] = bool(pool is not None and pool.started)
    try:
        connected = worker.broker_connected
    except Exception:
        connected = False  # a probe never raises: a consumer that cannot say is not ready
    checks["broker"] = connected
    checks["loop"] = liveness(worker, timeout)[0]
    return all(checks.values()), {"checks": checks}


class ProbeServer:
    """A tiny HTTP server with fixed routes, on its own daemon thread."""

    def __init__(self, host: str, port: int, routes: dict[str, Route]) -> None:
        # imported here, where a port was asked for: every worker imports this module (through
        # the hooks), and `http.server` with `http.client`, `html` and `mimetypes` is about 8 ms
        # of each start that a worker without probes or /metrics never uses
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.routes = dict(routes)
        server_routes = self.routes

        class Handler(BaseHTTPRequestHandler):
            timeout = 10  # a stalled client cannot hold a handler thread for long

            def do_GET(self) -> None:
                route = server_routes.get(self.path.split("?", 1)[0])
                if route is None:
                    body = json.dumps(
                        {"error": f"no route {self.path!r}", "routes": sorted(server_routes)}
                    ).encode()
                    status, kind = 404, _JSON
                else:
                    try:
                        status, kind, body = route()
                    except Exception as exc:  # report, never kill the probe thread
                        status, kind = 500, _JSON
                        body = json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # probes every few seconds would drown the worker's own log

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot listen on {host}:{port} for the health/metrics endpoint: {exc}; choose "
                "another port (health_port / OTEL_EXPORTER_PROMETHEUS_PORT) or free this one"
            ) from exc
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    def start(self) -> ProbeServer:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.5},
            name="millpond-probes",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()


def _json(ok: bool, details: dict[str, Any]) -> tuple[int, str, bytes]:
    body = {"status": "ok" if ok else "fail", **details}
    return (200 if ok else 503), _JSON, json.dumps(body).encode()


def routes_for(worker: Worker, liveness_timeout: float) -> dict[str, Route]:
    """The probe routes of a worker: /livez, /readyz (and /healthz, an alias of /livez)."""

    def livez() -> tuple[int, str, bytes]:
        return _json(*liveness(worker, liveness_timeout))

    def readyz() -> tuple[int, str, bytes]:
        return _json(*readiness(worker, liveness_timeout))

    return {"/livez": livez, "/healthz": livez, "/readyz": readyz}


#: the HTTP servers started for each worker, by the port asked for: hooks asking for the same
#: port (0 included: "any free one") share one server (`serve`)
_servers: dict[int, dict[int, ProbeServer]] = {}


def serve(worker: Worker, host: str, port: int, routes: dict[str, Route]) -> ProbeServer:
    """Serve `routes` for `worker` on `port`, on the server already asked for that port if
    there is one (a port has one listener: the first host wins)."""
    mine = _servers.setdefault(id(worker), {})
    server = mine.get(port)
    if server is not None:
        server.routes.update(routes)
        return server
    server = mine[port] = ProbeServer(host, port, routes).start()
    return server


def stop_serving(worker: Worker) -> None:
    for server in _servers.pop(id(worker), {}).values():
        server.stop()


class HealthHooks(Hooks):
    """`/livez`, `/readyz` (and `/healthz`) on `health_port`, when that setting is set."""

    def worker_ready(self, worker: Worker) -> None:
        settings = worker.settings
        if settings.health_port is None:
            return
        routes = routes_for(worker, settings.health_liveness_timeout)
        server = serve(worker, settings.health_host, settings.health_port, routes)
        structlog.get_logger("millpond.health").info(
            "http endpoint listening", host=server.host, port=server.port, routes=sorted(routes)
        )

    def worker_stopped(self, worker: Worker) -> None:
        stop_serving(worker)
