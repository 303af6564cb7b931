"""`OTLPSpanExporter`: an OpenTelemetry SDK span exporter for OTLP/HTTP protobuf, on `http.client`.

A drop-in for the standard `opentelemetry.exporter.otlp.proto.http.trace_exporter.OTLPSpanExporter`:
the same constructor arguments and the same `OTEL_EXPORTER_OTLP_*` variables, each with its
`_TRACES_` form winning (endpoint, headers, compression, timeout, certificate, client certificate
and key), the same retries (429, 502, 503, 504 and connection errors, exponential backoff with
jitter or the server's `Retry-After`, within the timeout), the same bytes on the wire. What differs
is the cost: the request is written by `millpond_otlp.encode` instead of protobuf message objects,
and sent over one kept-alive `http.client` connection instead of requests.

Not supported (use the standard exporter if you need them): HTTP proxies (`HTTPS_PROXY`...), the
`OTEL_PYTHON_EXPORTER_OTLP_HTTP_*_CREDENTIAL_PROVIDER` sessions, the exporter's own SDK metrics.
TLS verifies against the system's certificate store (or `OTEL_EXPORTER_OTLP_CERTIFICATE`), where
requests uses certifi's.
"""

from __future__ import annotations

import gzip
import http.client
import logging
import math
import os
import random
import ssl
import threading
import time
import weakref
import zlib
from collections.abc import Mapping, Sequence
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.util.re import parse_env_headers

from millpond_otlp.encode import encode_request

__all__ = ["DEFAULT_ENDPOINT", "OTLPSpanExporter"]

_log = logging.getLogger("millpond_otlp")

VERSION = "0.1.0"
USER_AGENT = f"millpond-otlp/{VERSION}"
DEFAULT_ENDPOINT = "http://localhost:4318/v1/traces"
DEFAULT_TIMEOUT = 10.0
#: a request larger than this (before compression) is dropped, as the standard exporter does
DEFAULT_MAX_REQUEST_SIZE = 64 * 1024 * 1024
MAX_ATTEMPTS = 6
RETRYABLE = frozenset({429, 502, 503, 504})
COMPRESSIONS = ("none", "gzip", "deflate")
#: gzip level 6 (zlib's default): within a few per cent of level 9's size on OTLP requests, for
#: a fraction of its CPU (the standard exporter uses gzip's default, 9)
GZIP_LEVEL = 6


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def _signal_env(suffix: str) -> str | None:
    """`OTEL_EXPORTER_OTLP_TRACES_<suffix>`, else `OTEL_EXPORTER_OTLP_<suffix>`."""
    return _env(f"OTEL_EXPORTER_OTLP_TRACES_{suffix}", f"OTEL_EXPORTER_OTLP_{suffix}")


def _endpoint() -> str:
    full = _env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if full:
        return full
    base = _env("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not base:
        return DEFAULT_ENDPOINT
    return f"{base.removesuffix('/')}/v1/traces"


def _compression(value: Any) -> str:
    if value is not None:
        name = str(getattr(value, "value", value)).strip().lower()
    else:
        name = (_signal_env("COMPRESSION") or "none").strip().lower()
    if name not in COMPRESSIONS:
        _log.warning("Unsupported compression type: %s (use none, gzip or deflate)", name)
        return "none"
    return name


def _timeout(value: float | None) -> float:
    if value is not None:
        return float(value)
    raw = _signal_env("TIMEOUT")
    if raw is None:
        return DEFAULT_TIMEOUT
    try:
        return float(raw)
    except ValueError:
        _log.warning("Invalid timeout value %r, using default of %s seconds", raw, DEFAULT_TIMEOUT)
        return DEFAULT_TIMEOUT


class OTLPSpanExporter(SpanExporter):
    """Exports SDK spans to an OTLP/HTTP collector (`POST <endpoint>`, protobuf body).

    Every argument defaults to its environment variable, then to the OTLP default; `endpoint` is
    the full URL, signal path included (`http://collector:4318/v1/traces`).
    """

    def __init__(  # noqa: PLR0917 - the standard exporter's positional signature
        self,
        endpoint: str | None = None,
        certificate_file: str | None = None,
        client_key_file: str | None = None,
        client_certificate_file: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        compression: Any = None,
        *,
        max_request_size: int | None = None,
    ) -> None:
        self.endpoint = endpoint or _endpoint()
        parts = urlsplit(self.endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"the OTLP traces endpoint {self.endpoint!r} is not an http:// or https:// URL "
                "(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT)"
            )
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.compression = _compression(compression)
        self.timeout = _timeout(timeout)
        self.max_request_size = (
            DEFAULT_MAX_REQUEST_SIZE if max_request_size is None else max_request_size
        )
        self.headers: dict[str, str] = {
            "content-type": "application/x-protobuf",
            "user-agent": USER_AGENT,
        }
        self.headers.update(parse_env_headers(_signal_env("HEADERS") or "", liberal=True))
        if headers:
            self.headers.update({key.lower(): value for key, value in headers.items()})
        if self.compression != "none" and "content-encoding" not in self.headers:
            self.headers["content-encoding"] = self.compression
        self._ssl: ssl.SSLContext | None = None
        if self._https:
            self._ssl = ssl.create_default_context(
                cafile=certificate_file or _signal_env("CERTIFICATE")
            )
            client_cert = client_certificate_file or _signal_env("CLIENT_CERTIFICATE")
            client_key = client_key_file or _signal_env("CLIENT_KEY")
            if client_cert:
                self._ssl.load_cert_chain(client_cert, client_key)
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self._stopping = threading.Event()
        self._shutdown = False
        if hasattr(os, "register_at_fork"):
            reset = weakref.WeakMethod(self._after_fork)

            def after_in_child() -> None:
                method = reset()
                if method is not None:
                    method()

            os.register_at_fork(after_in_child=after_in_child)

    def __repr__(self) -> str:
        return f"<millpond_otlp.OTLPSpanExporter {self.endpoint}>"

    # -- SpanExporter -------------------------------------------------------------------------
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._shutdown:
            _log.warning("Exporter already shutdown, ignoring batch")
            return SpanExportResult.FAILURE
        try:
            body = encode_request(spans)
        except Exception as error:
            _log.error("Failed to encode span batch: %s", error)
            return SpanExportResult.FAILURE
        if 0 < self.max_request_size < len(body):
            _log.warning(
                "Dropping span batch: serialized size %d bytes exceeds max_request_size %d bytes.",
                len(body),
                self.max_request_size,
            )
            return SpanExportResult.FAILURE
        if self.compression == "gzip":
            body = gzip.compress(body, compresslevel=GZIP_LEVEL)
        elif self.compression == "deflate":
            body = zlib.compress(body)
        with self._lock:
            return self._send(body, len(spans))

    def shutdown(self) -> None:
        if self._shutdown:
            _log.warning("Exporter already shutdown, ignoring call")
            return
        self._shutdown = True
        self._stopping.set()  # wakes an export waiting to retry
        with self._lock:
            self._close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Nothing is buffered in the exporter: the batch processor holds the spans."""
        return True

    # -- HTTP ---------------------------------------------------------------------------------
    def _send(self, body: bytes, count: int) -> SpanExportResult:
        """POST with retries, as the standard exporter retries; one log line when it gives up."""
        deadline = time.monotonic() + self.timeout
        problem = "no attempt"
        for attempt in range(MAX_ATTEMPTS):
            backoff = 2**attempt * random.uniform(0.8, 1.2)
            try:
                status, reason, retry_after, detail = self._post(body, deadline)
            except (OSError, http.client.HTTPException) as error:
                self._close()
                problem = f"{type(error).__name__}: {error}"
                retryable = True
            else:
                if 200 <= status < 400:
                    return SpanExportResult.SUCCESS
                problem = f"HTTP {status} {reason}" + (f": {detail}" if detail else "")
                retryable = status in RETRYABLE
                if retryable and retry_after is not None:
                    backoff = retry_after
            if not retryable:
                _log.error(
                    "Failed to export %d spans to %s: %s (not retried; the spans are dropped)",
                    count,
                    self.endpoint,
                    problem,
                )
                return SpanExportResult.FAILURE
            left = deadline - time.monotonic()
            if attempt + 1 == MAX_ATTEMPTS or backoff > left or self._stopping.is_set():
                why = "shutting down" if self._stopping.is_set() else f"{attempt + 1} attempts"
                _log.error(
                    "Failed to export %d spans to %s: %s (gave up after %s within the %gs "
                    "timeout; the spans are dropped)",
                    count,
                    self.endpoint,
                    problem,
                    why,
                    self.timeout,
                )
                return SpanExportResult.FAILURE
            _log.warning(
                "Transient error %s exporting spans to %s, retrying in %.2fs.",
                problem,
                self.endpoint,
                backoff,
            )
            if self._stopping.wait(backoff):
                _log.warning("Shutdown in progress, aborting retry.")
                return SpanExportResult.FAILURE
        return SpanExportResult.FAILURE

    def _post(self, body: bytes, deadline: float) -> tuple[int, str, float | None, str]:
        """One POST: (status, reason, Retry-After seconds or None, a short text of an error
        body). A kept-alive connection the server closed meanwhile is retried once at once."""
        for fresh in (self._conn is None, True):
            conn = self._connection(max(deadline - time.monotonic(), 0.001))
            try:
                conn.request("POST", self._path, body=body, headers=self.headers)
                response = conn.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self._close()
                if fresh:
                    raise
                continue
            if response.will_close:
                self._close()
            status = response.status
            detail = ""
            if not 200 <= status < 400:
                detail = data[:200].decode("utf-8", "replace").strip()
            return status, response.reason, _retry_after(response.getheader("retry-after")), detail
        raise AssertionError("unreachable")  # pragma: no cover

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        conn = self._conn
        if conn is None:
            if self._https:
                conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=timeout, context=self._ssl
                )
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
            self._conn = conn
        elif conn.sock is not None:
            conn.sock.settimeout(timeout)
        else:
            conn.timeout = timeout
        return conn

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass

    def _after_fork(self) -> None:
        """In a forked child: the parent's connection and lock are not this process's."""
        self._conn = None
        self._lock = threading.Lock()


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delay-seconds or an HTTP date), else None."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(when.timestamp() - time.time(), 0.0)
