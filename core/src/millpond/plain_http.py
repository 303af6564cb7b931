"""One keep-alive HTTP/1.1 connection that posts bytes: the span recorder's plain-HTTP transport.

`http.client` spends about 170 us of CPU on a post to a collector on loopback: it builds and checks
every header on every request, sends them and the body in separate calls, and parses the answer's
headers with the `email` package. The recorder posts the same request head every time, differing
only in its length, so this writes the head once (`request_head`), sends head and body in one
call, and reads just what it needs from the answer (status line, `Content-Length` or chunked
body, `Connection`, `Retry-After`): about a third of the CPU. `millpond.otlp_http` uses it for
http:// collectors (directly or through an HTTP proxy); https:// stays with `http.client`, which
does TLS and proxy tunnels.
"""

from __future__ import annotations

import http.client
import socket
from collections.abc import Mapping

#: what a connection the peer closed while idle raises (or looks like) on its next use
STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)
_MAX_HEAD = 64 * 1024


def request_head(method: str, target: str, host: str, headers: Mapping[str, str]) -> bytes:
    """A request's line and headers, all but `Content-Length`, which `PlainHttpConnection.post`
    appends. Raises ValueError for a header that would break the request (a line break in it)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    for name, value in headers.items():
        if not name or any(c in name for c in ":\r\n ") or "\r" in value or "\n" in value:
            raise ValueError(f"invalid HTTP header {name!r}: {value!r}")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\nContent-Length: ").encode("latin-1")


class PlainHttpConnection:
    """A keep-alive connection to `address`, opened on first use and again after the peer closes."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.sock: socket.socket | None = None
        self._buffer = b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None
        self._buffer = b""

    def post(self, head: bytes, body: bytes, timeout: float) -> tuple[int, str | None]:
        """Send one request (`head` from `request_head`) and read its answer: (status,
        Retry-After). Raises OSError or http.client.HTTPException; a connection the peer closed
        while idle raises one of `STALE`."""
        sock = self.sock
        if sock is None:
            sock = self.sock = socket.create_connection(self.address, timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            sock.settimeout(timeout)
        sock.sendall(b"".join((head, str(len(body)).encode(), b"\r\n\r\n", body)))
        status, headers = self._read_head()
        while 100 <= status < 200:  # an interim answer (100 Continue): the real one follows
            status, headers = self._read_head()
        self._read_body(headers)
        connection = headers.get("connection", "").lower()
        if connection == "close" or ("content-length" not in headers and not _chunked(headers)):
            self.close()
        return status, headers.get("retry-after")

    # -- reading the answer -------------------------------------------------------------------------
    def _fill(self) -> None:
        assert self.sock is not None
        data = self.sock.recv(65536)
        if not data:
            raise http.client.RemoteDisconnected("the collector closed the connection")
        self._buffer += data

    def _read_head(self) -> tuple[int, dict[str, str]]:
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            if len(self._buffer) > _MAX_HEAD:
                raise http.client.LineTooLong("response head")
            self._fill()
        head, self._buffer = self._buffer[:end], self._buffer[end + 4 :]
        status_line, *lines = head.decode("latin-1").split("\r\n")
        version, _, rest = status_line.partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise http.client.BadStatusLine(status_line)
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if version == "HTTP/1.0" and headers.get("connection", "").lower() != "keep-alive":
            headers["connection"] = "close"
        return int(code), headers

    def _take(self, size: int) -> bytes:
        while len(self._buffer) < size:
            self._fill()
        taken, self._buffer = self._buffer[:size], self._buffer[size:]
        return taken

    def _read_body(self, headers: dict[str, str]) -> None:
        """Read (and drop) the answer's body, so the connection can carry the next request."""
        if _chunked(headers):
            while True:
                while (end := self._buffer.find(b"\r\n")) < 0:
                    self._fill()
                size_field = self._buffer[:end].split(b";", 1)[0].strip()
                self._buffer = self._buffer[end + 2 :]
                try:
                    size = int(size_field, 16)
                except ValueError:
                    raise http.client.HTTPException(f"bad chunk size {size_field!r}") from None
                if size == 0:  # the last chunk, then trailer lines up to an empty one
                    while (end := self._buffer.find(b"\r\n")) != 0:
                        if end < 0:
                            self._fill()
                        else:
                            self._buffer = self._buffer[end + 2 :]
                    self._buffer = self._buffer[2:]
                    return
                self._take(size + 2)
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise http.client.HTTPException(f"bad Content-Length {length!r}")
            self._take(int(length))
            return
        try:  # no length: the body ends when the collector closes the connection
            while True:
                self._fill()
                self._buffer = b""
        except http.client.RemoteDisconnected:
            return


def _chunked(headers: Mapping[str, str]) -> bool:
    return "chunked" in headers.get("transfer-encoding", "").lower()
