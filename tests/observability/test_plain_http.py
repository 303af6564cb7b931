"""The span recorder's plain-HTTP transport against answers http.server does not give.

A scripted server on 127.0.0.1 reads each request whole and writes back exactly the bytes a test
gives it: chunked bodies, bodies that end when the connection closes, HTTP/1.0, an interim
100 Continue, a malformed status line.
"""

from __future__ import annotations

import socket
import threading

import pytest

from millpond import plain_http
from millpond.exceptions import ConfigurationError
from millpond.otlp_http import OtlpHttpSender


class RawServer:
    """Answers the n-th request with the n-th scripted reply; None closes the connection."""

    def __init__(self, replies: list[bytes | None]) -> None:
        self.replies = list(replies)
        self.requests: list[bytes] = []
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(10)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return host, port

    def _serve(self) -> None:
        while self.replies:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                while self.replies:
                    request = self._read_request(conn)
                    if request is None:
                        break
                    self.requests.append(request)
                    reply = self.replies.pop(0)
                    if reply is None:
                        break
                    conn.sendall(reply)
                    if b"Connection: close" in reply or b"HTTP/1.0" in reply:
                        break

    @staticmethod
    def _read_request(conn: socket.socket) -> bytes | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        while len(body) < length:
            body += conn.recv(65536)
        return head + b"\r\n\r\n" + body

    def close(self) -> None:
        self._listener.close()
        self._thread.join(10)


@pytest.fixture
def head() -> bytes:
    return plain_http.request_head("POST", "/v1/traces", "collector:4318", {"X-Team": "a b"})


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def test_the_request_is_a_valid_http_11_post(head: bytes) -> None:
    server = RawServer([OK])
    try:
        connection = plain_http.PlainHttpConnection(server.address)
        assert connection.post(head, b"\x00body", 10) == (200, None)
        (request,) = server.requests
        assert request == (
            b"POST /v1/traces HTTP/1.1\r\nHost: collector:4318\r\nX-Team: a b\r\n"
            b"Content-Length: 5\r\n\r\n\x00body"
        )
    finally:
        server.close()


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\nX-T: 1\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n" + OK,
        b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
    ],
)
def test_one_connection_carries_on_after_each_kind_of_answer(head: bytes, reply: bytes) -> None:
    server = RawServer([reply, OK])
    try:
        connection = plain_http.PlainHttpConnection(server.address)
        assert connection.post(head, b"one", 10)[0] in (200, 204)
        assert connection.post(head, b"two", 10) == (200, None)
        assert server.connections == 1
    finally:
        server.close()


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nbody until close",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ],
)
def test_an_answer_that_ends_the_connection_gets_a_new_one(head: bytes, reply: bytes) -> None:
    server = RawServer([reply, OK])
    try:
        connection = plain_http.PlainHttpConnection(server.address)
        assert connection.post(head, b"one", 10) == (200, None)
        assert connection.sock is None
        assert connection.post(head, b"two", 10) == (200, None)
        assert server.connections == 2
    finally:
        server.close()


def test_retry_after_and_a_malformed_answer(head: bytes) -> None:
    server = RawServer([b"HTTP/1.1 503 Busy\r\nRetry-After: 3\r\nContent-Length: 0\r\n\r\n"])
    try:
        assert plain_http.PlainHttpConnection(server.address).post(head, b"x", 10) == (503, "3")
    finally:
        server.close()
    server = RawServer([b"SMTP ready\r\n\r\n"])
    try:
        with pytest.raises(plain_http.http.client.BadStatusLine):
            plain_http.PlainHttpConnection(server.address).post(head, b"x", 10)
    finally:
        server.close()


def test_a_closed_connection_is_a_stale_error(head: bytes) -> None:
    server = RawServer([None])
    try:
        with pytest.raises(plain_http.STALE):
            plain_http.PlainHttpConnection(server.address).post(head, b"x", 10)
    finally:
        server.close()


def test_a_header_with_a_line_break_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="invalid HTTP header"):
        plain_http.request_head("POST", "/", "h", {"X-Bad": "a\r\nInjected: 1"})
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-bad=a%0D%0Ab")
    with pytest.raises(ConfigurationError, match="OTEL_EXPORTER_OTLP_HEADERS"):
        OtlpHttpSender()
