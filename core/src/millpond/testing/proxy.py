"""A TCP proxy you control, for network faults between a worker and its broker.

Point a client at `proxy.port` instead of the server's port and switch faults on while traffic
flows: `reset()` aborts every open connection with a TCP RST (a crashed middlebox, a killed
server), `drop()` closes them with a normal FIN (a load balancer timing out), `stall()` stops
forwarding bytes in both directions while keeping the connections open (a partition: packets
vanish, nobody is told) until `resume()`, and `block()` makes new connections fail at once
until `unblock()` (the server is unreachable). Faults cover connections made later too, so a
client that reconnects during a stall or a block finds the network still broken.

With `tls=` (a server-side `ssl.SSLContext`) the proxy terminates TLS towards the client and
speaks plain TCP upstream: a cheap way to test a client's `rediss://` or `amqps://` path against
a server that has no TLS listener of its own.

Stdlib only, one thread per connection; meant for tests and benchmarks, not for production.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import struct
import threading
from types import TracebackType

_CHUNK = 256 * 1024
_TICK = 0.05  # how soon a pump notices a fault switched on while it waits for traffic


class _Link:
    """One client connection and its upstream twin."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.closed = False

    def shut(self, rst: bool) -> None:
        if self.closed:
            return
        self.closed = True
        for sock in (self.client, self.upstream):
            if rst:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


class Proxy:
    """Forwards `127.0.0.1:<port>` to `upstream`; faults are switched on and off from any thread."""

    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.upstream = upstream
        self.tls = tls
        self._listener = socket.create_server((host, port))
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._flowing = threading.Event()
        self._flowing.set()
        self._blocked = False
        self._closed = False
        #: connections accepted so far (a reconnecting client makes this grow)
        self.accepted = 0
        #: bytes forwarded client -> server and server -> client
        self.sent = 0
        self.received = 0
        self._acceptor = threading.Thread(
            target=self._accept, name=f"proxy-{self.port}-accept", daemon=True
        )
        self._acceptor.start()

    # -- faults ----------------------------------------------------------------------------------
    def reset(self) -> int:
        """Abort every open connection with a TCP RST; returns how many were cut."""
        return self._cut(rst=True)

    def drop(self) -> int:
        """Close every open connection with a FIN (both sides see end of stream)."""
        return self._cut(rst=False)

    def stall(self) -> None:
        """Stop forwarding in both directions; connections stay open and new ones hang too."""
        self._flowing.clear()

    def resume(self) -> None:
        """Forward again (bytes held during a stall are delivered, like TCP retransmission)."""
        self._flowing.set()

    def block(self) -> None:
        """Refuse new connections (reset at once) until `unblock()`; open ones are untouched."""
        self._blocked = True

    def unblock(self) -> None:
        self._blocked = False

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._links)

    # -- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop accepting and reset every connection."""
        self._closed = True
        with contextlib.suppress(OSError):
            # close() alone does not wake a thread blocked in accept(); shutdown() does (Linux)
            self._listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._listener.close()
        self._cut(rst=True)
        self._acceptor.join(timeout=2)

    def __enter__(self) -> Proxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = (
            "stalled"
            if not self._flowing.is_set()
            else "blocked"
            if self._blocked
            else "forwarding"
        )
        return f"Proxy({self.host}:{self.port} -> {self.upstream[0]}:{self.upstream[1]}, {state})"

    # -- internals -------------------------------------------------------------------------------
    def _cut(self, *, rst: bool) -> int:
        with self._lock:
            links, self._links = list(self._links), set()
        for link in links:
            link.shut(rst)
        return len(links)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            if self._blocked:
                _Link(client, socket.socket()).shut(rst=True)
                continue
            threading.Thread(
                target=self._serve, args=(client,), name=f"proxy-{self.port}-pump", daemon=True
            ).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            _Link(client, socket.socket()).shut(rst=True)  # the server is down: so are we
            return
        upstream.settimeout(None)
        if self.tls is not None:
            try:
                client.settimeout(10)
                client = self.tls.wrap_socket(client, server_side=True)
                client.settimeout(None)
            except (OSError, ssl.SSLError):
                _Link(client, upstream).shut(rst=True)
                return
        for sock in (client, upstream):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = _Link(client, upstream)
        with self._lock:
            if self._closed:
                link.shut(rst=True)
                return
            self._links.add(link)
        try:
            self._pump(link)
        finally:
            with self._lock:
                self._links.discard(link)
            link.shut(rst=False)

    def _pump(self, link: _Link) -> None:
        client, upstream = link.client, link.upstream
        while not link.closed:
            if not self._flowing.is_set():
                # read nothing: the bytes stay in the kernel buffers, as in a partition
                self._flowing.wait(_TICK)
                continue
            try:
                ready, _, _ = select.select([client, upstream], [], [], _TICK)
            except (OSError, ValueError):
                return
            for sock in ready:
                if not self._flowing.is_set():
                    break
                other = upstream if sock is client else client
                try:
                    data = self._recv(sock)
                except ssl.SSLWantReadError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                try:
                    other.sendall(data)
                except OSError:
                    return
                if sock is client:
                    self.sent += len(data)
                else:
                    self.received += len(data)

    @staticmethod
    def _recv(sock: socket.socket) -> bytes:
        data = sock.recv(_CHUNK)
        if data and isinstance(sock, ssl.SSLSocket):
            # TLS records already decrypted sit in the SSL object, invisible to select()
            while sock.pending():
                more = sock.recv(_CHUNK)
                if not more:
                    break
                data += more
        return data
