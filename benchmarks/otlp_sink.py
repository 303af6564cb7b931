"""An OTLP/HTTP receiver that discards what it reads, in a process of its own.

    python -m benchmarks.otlp_sink          # prints {"port": N} once listening; stops on SIGTERM

`benchmarks/tracing_overhead.py` points the worker under test at it. It stands in for a collector
that runs elsewhere: it reads every `POST /v1/traces` body, answers 200 with an empty
`ExportTraceServiceResponse`, and keeps only the raw bodies until asked for a count, so during a
drain it does little more than read sockets. Its CPU is its own process's, never the worker's.

`GET /stats` decodes what arrived since the previous call (with opentelemetry-proto, after the
drain: the harness asks once the worker's spans are in), adds it to the totals and drops the
bodies; it answers JSON: spans, requests, bytes (as sent, before decompression), spans per
User-Agent (which exporter sent them), rejected requests, and requests to any other path (metrics
or logs, accepted and counted so a worker exporting more than spans is noticed). `POST /reset`
zeroes everything.
"""

from __future__ import annotations

import gzip
import json
import signal
import sys
import threading
import zlib
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TRACES = "/v1/traces"


class Sink:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: list[tuple[str, str, bytes]] = []  # (user agent, content encoding, body)
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.pending.clear()
            self.spans = 0
            self.requests = 0
            self.bytes = 0
            self.by_agent: dict[str, int] = {}
            self.rejected: list[str] = []
            self.other: dict[str, int] = {}  # requests to /v1/metrics, /v1/logs, anything else

    def stats(self) -> dict[str, Any]:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        with self.lock:
            pending, self.pending = self.pending, []
        for agent, encoding, body in pending:
            try:
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
            except Exception as exc:
                with self.lock:
                    self.rejected.append(f"{agent}: {type(exc).__name__}: {exc}")
                continue
            count = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            with self.lock:
                self.spans += count
                self.by_agent[agent] = self.by_agent.get(agent, 0) + count
        with self.lock:
            return {
                "spans": self.spans,
                "requests": self.requests,
                "bytes": self.bytes,
                "by_agent": dict(self.by_agent),
                "rejected": list(self.rejected),
                "other": dict(self.other),
            }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as exporters expect
    server: Server

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        sink = self.server.sink
        if self.path == "/reset":
            sink.reset()
            self._reply(HTTPStatus.OK, b"{}", "application/json")
            return
        path = self.path.split("?", 1)[0]
        if path != TRACES:
            with sink.lock:
                sink.other[path] = sink.other.get(path, 0) + 1
            self._reply(HTTPStatus.OK, b"", "application/x-protobuf")
            return
        agent = self.headers.get("User-Agent") or ""
        encoding = (self.headers.get("Content-Encoding") or "").strip().lower()
        with sink.lock:
            sink.pending.append((agent, encoding, body))
            sink.requests += 1
            sink.bytes += len(body)
        self._reply(HTTPStatus.OK, b"", "application/x-protobuf")

    def do_GET(self) -> None:
        if self.path != "/stats":
            self._reply(HTTPStatus.NOT_FOUND, b"", "text/plain")
            return
        self._reply(
            HTTPStatus.OK, json.dumps(self.server.sink.stats()).encode(), "application/json"
        )

    def _reply(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        self.sink = Sink()
        super().__init__(("127.0.0.1", 0), Handler)


def main() -> None:
    server = Server()
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(json.dumps({"port": server.server_address[1]}), flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    server.server_close()
    sys.exit(0)


if __name__ == "__main__":
    main()
