"""Sending encoded OTLP trace requests over HTTP, configured like the OpenTelemetry exporter.

The span recorder (`millpond.span_recorder`) writes its requests as bytes already; this posts them
where `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (as given) or `OTEL_EXPORTER_OTLP_ENDPOINT` (plus
`/v1/traces`) points, default `http://localhost:4318/v1/traces`, with the `_HEADERS`,
`_COMPRESSION` (gzip, deflate, none), `_TIMEOUT` (seconds, as the Python exporter reads it),
`_CERTIFICATE`, `_CLIENT_CERTIFICATE` and `_CLIENT_KEY` variables, each in its `_TRACES_` form
first. Transient failures (connection errors, 408, 429, 502, 503, 504) are retried with
exponential back-off within the export timeout, as the specification asks.
"""

from __future__ import annotations

import gzip
import os
import random
import time
import zlib
from typing import Any

from opentelemetry.util.re import parse_env_headers

from millpond.exceptions import ConfigurationError

DEFAULT_ENDPOINT = "http://localhost:4318/"
RETRYABLE_STATUS = frozenset({408, 429, 502, 503, 504})
COMPRESSIONS = ("none", "gzip", "deflate")
USER_AGENT = "millpond-span-recorder"


def _env(name: str) -> str:
    """`OTEL_EXPORTER_OTLP_TRACES_<name>`, else `OTEL_EXPORTER_OTLP_<name>`, else ''."""
    return (
        os.environ.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}")
        or os.environ.get(f"OTEL_EXPORTER_OTLP_{name}")
        or ""
    ).strip()


def endpoint() -> str:
    own = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or "").strip()
    if own:
        return own
    base = (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "").strip() or DEFAULT_ENDPOINT
    return f"{base.removesuffix('/')}/v1/traces"


class OtlpHttpSender:
    """Posts OTLP/HTTP protobuf trace requests; one keep-alive session, retries within a deadline."""

    def __init__(self) -> None:
        import requests

        self.endpoint = endpoint()
        if not self.endpoint.startswith(("http://", "https://")):
            raise ConfigurationError(
                f"the OTLP traces endpoint {self.endpoint!r} (from OTEL_EXPORTER_OTLP_ENDPOINT or "
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) must be an http:// or https:// URL, e.g. "
                "http://localhost:4318"
            )
        compression = (_env("COMPRESSION") or "none").lower()
        if compression not in COMPRESSIONS:
            raise ConfigurationError(
                f"OTEL_EXPORTER_OTLP_COMPRESSION={compression!r} is not supported; use "
                f"{', '.join(COMPRESSIONS)}"
            )
        self.compression = compression
        raw_timeout = _env("TIMEOUT") or "10"
        try:
            self.timeout = float(raw_timeout)
            if self.timeout <= 0:
                raise ValueError
        except ValueError:
            raise ConfigurationError(
                f"OTEL_EXPORTER_OTLP_TIMEOUT={raw_timeout!r} must be a positive number of seconds"
            ) from None
        from millpond import __version__

        headers = {
            "Content-Type": "application/x-protobuf",
            "User-Agent": f"{USER_AGENT}/{__version__}",
        }
        headers.update(parse_env_headers(_env("HEADERS"), liberal=True))
        if compression != "none":
            headers["Content-Encoding"] = compression
        self._session = requests.Session()
        self._session.headers.update(headers)
        # What requests would read from the environment on every request (proxies, a CA bundle),
        # read once: per request it costs more than encoding a few spans.
        self._session.proxies.update(requests.utils.get_environ_proxies(self.endpoint))
        self._session.trust_env = False
        certificate = _env("CERTIFICATE")
        bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        self._verify: Any = certificate or bundle or True
        client_cert, client_key = _env("CLIENT_CERTIFICATE"), _env("CLIENT_KEY")
        self._cert: Any = (
            (client_cert, client_key) if client_cert and client_key else client_cert or None
        )
        self.last_error: str | None = None

    def _body(self, data: bytes) -> bytes:
        if self.compression == "gzip":
            return gzip.compress(data, compresslevel=6)
        if self.compression == "deflate":
            return zlib.compress(data)
        return data

    def send(self, data: bytes, timeout: float | None = None) -> bool:
        """Post one request; True when the collector accepted it (retrying transient failures)."""
        import requests

        body = self._body(data)
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        delay = 0.5
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            retry_after: float | None = None
            try:
                response = self._session.post(
                    self.endpoint,
                    data=body,
                    timeout=min(self.timeout, remaining),
                    verify=self._verify,
                    cert=self._cert,
                )
            except requests.RequestException as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                retryable = isinstance(exc, requests.ConnectionError | requests.Timeout)
            else:
                if response.ok:
                    self.last_error = None
                    return True
                self.last_error = f"HTTP {response.status_code} from {self.endpoint}"
                retryable = response.status_code in RETRYABLE_STATUS
                retry_after = _retry_after(response.headers.get("Retry-After"))
            if not retryable:
                return False
            wait = retry_after if retry_after is not None else delay * (0.5 + random.random())
            if time.monotonic() + wait >= deadline:
                return False
            time.sleep(wait)
            delay = min(delay * 2, 8.0)

    def close(self) -> None:
        self._session.close()


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
