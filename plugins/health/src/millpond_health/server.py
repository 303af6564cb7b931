"""The HTTP server behind the probes: fixed routes, one small daemon thread, shared by port.

The server is the standard library's `ThreadingHTTPServer` (under gevent or eventlet its threads
are greenlets). Hooks other than the probes serve routes on it too (`serve`): the metrics
plugin's `/metrics` shares the probes' server when both name the same port, so a pod exposes one
port for the kubelet and the scraper.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from millpond.exceptions import ConfigurationError

if TYPE_CHECKING:
    from millpond.contracts.hooks import WorkerView

#: a route: returns (HTTP status, content type, body)
Route = Callable[[], tuple[int, str, bytes]]

JSON = "application/json"


class ProbeServer:
    """A tiny HTTP server with fixed routes, on its own daemon thread."""

    def __init__(self, host: str, port: int, routes: dict[str, Route]) -> None:
        # imported here, where a port was asked for: every worker imports the health hooks, and
        # `http.server` with `http.client`, `html` and `mimetypes` is about 8 ms of each start
        # that a worker without probes or /metrics never uses
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
                    status, kind = 404, JSON
                else:
                    try:
                        status, kind, body = route()
                    except Exception as exc:  # report, never kill the probe thread
                        status, kind = 500, JSON
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
                "another port (health.port / OTEL_EXPORTER_PROMETHEUS_PORT) or free this one"
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


#: the HTTP servers started for each worker, by the port asked for: hooks asking for the same
#: port (0 included: "any free one") share one server (`serve`)
_servers: dict[int, dict[int, ProbeServer]] = {}


def serve(worker: WorkerView, host: str, port: int, routes: dict[str, Route]) -> ProbeServer:
    """Serve `routes` for `worker` on `port`, on the server already asked for that port if
    there is one (a port has one listener: the first host wins)."""
    mine = _servers.setdefault(id(worker), {})
    server = mine.get(port)
    if server is not None:
        server.routes.update(routes)
        return server
    server = mine[port] = ProbeServer(host, port, routes).start()
    return server


def stop_serving(worker: WorkerView) -> None:
    """Stop every server started for `worker` (each hook that served may call it: once is enough)."""
    for server in _servers.pop(id(worker), {}).values():
        server.stop()
