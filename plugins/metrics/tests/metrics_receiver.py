"""An OTLP/HTTP receiver for `/v1/metrics` that decodes what it gets (the shared
`millpond.testing.otlp.OtlpReceiver` decodes traces and only counts metric exports).

Point a process at it with `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT=<receiver.url>`; traces can keep
going to the shared receiver through `OTEL_EXPORTER_OTLP_ENDPOINT`.
"""

from __future__ import annotations

import gzip
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from millpond.testing.otlp import any_value


@dataclass(frozen=True)
class Point:
    attributes: dict[str, Any]
    value: float | None = None  # sums and gauges
    count: int = 0  # histograms
    sum: float = 0.0


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    kind: str  # sum, gauge, histogram
    monotonic: bool
    service_name: str
    points: tuple[Point, ...]


def _decode(body: bytes) -> list[Metric]:
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest,
    )

    request = ExportMetricsServiceRequest()
    request.ParseFromString(body)
    out: list[Metric] = []
    for rm in request.resource_metrics:
        resource = {kv.key: any_value(kv.value) for kv in rm.resource.attributes}
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                kind = metric.WhichOneof("data")
                points: list[Point] = []
                monotonic = False
                if kind in ("sum", "gauge"):
                    data = getattr(metric, kind)
                    monotonic = kind == "sum" and bool(data.is_monotonic)
                    for dp in data.data_points:
                        which = dp.WhichOneof("value")
                        points.append(
                            Point(
                                {kv.key: any_value(kv.value) for kv in dp.attributes},
                                value=float(getattr(dp, which)) if which else None,
                            )
                        )
                elif kind == "histogram":
                    for dp in metric.histogram.data_points:
                        points.append(
                            Point(
                                {kv.key: any_value(kv.value) for kv in dp.attributes},
                                count=int(dp.count),
                                sum=float(dp.sum),
                            )
                        )
                out.append(
                    Metric(
                        metric.name,
                        metric.unit,
                        str(kind),
                        monotonic,
                        str(resource.get("service.name", "")),
                        tuple(points),
                    )
                )
    return out


class MetricsReceiver:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.metrics: list[Metric] = []
        self.errors: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    if (self.headers.get("Content-Encoding") or "") == "gzip":
                        body = gzip.decompress(body)
                    decoded = _decode(body)
                except Exception as exc:
                    with receiver._cond:
                        receiver.errors.append(f"{type(exc).__name__}: {exc}")
                    self.send_response(400)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                with receiver._cond:
                    receiver.metrics.extend(decoded)
                    receiver._cond.notify_all()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> MetricsReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1/metrics"

    def latest(self, name: str) -> Metric | None:
        """The most recent export of instrument `name` (cumulative: it has every total)."""
        with self._cond:
            found = [m for m in self.metrics if m.name == name]
        return found[-1] if found else None

    def total(self, name: str, **attrs: Any) -> float:
        """Sum of the latest values (or histogram counts) of `name` whose attributes match."""
        metric = self.latest(name)
        if metric is None:
            return 0.0
        total = 0.0
        for point in metric.points:
            if all(point.attributes.get(k) == v for k, v in attrs.items()):
                total += point.count if metric.kind == "histogram" else (point.value or 0.0)
        return total

    def wait(self, check: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not check():
                left = deadline - time.monotonic()
                if left <= 0:
                    names = sorted({m.name for m in self.metrics})
                    raise AssertionError(
                        f"timed out after {timeout:g}s waiting for {what}; "
                        f"metrics received: {names}; errors: {self.errors}"
                    )
                self._cond.wait(min(left, 0.2))
