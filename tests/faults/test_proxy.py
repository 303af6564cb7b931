"""`millpond.testing.proxy.Proxy` itself, against a local echo server: each fault does what the
fault tests rely on."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from millpond.testing.harness import wait_until
from millpond.testing.proxy import Proxy
from millpond.testing.servers import make_certs

pytestmark = pytest.mark.fault


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            while not stop.is_set():
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield ("127.0.0.1", server.getsockname()[1])
    finally:
        stop.set()
        server.close()


def connect(proxy: Proxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    sock.settimeout(5)
    return sock


def test_forwards_both_ways(echo: tuple[str, int]) -> None:
    with Proxy(echo) as proxy, connect(proxy) as sock:
        sock.sendall(b"hello")
        assert sock.recv(100) == b"hello"
        assert proxy.open_connections == 1
        # the proxy counts after forwarding: the echo may be back before the count is
        wait_until(lambda: proxy.sent == proxy.received == 5, 5, "the byte counts")


def test_reset_aborts_open_connections(echo: tuple[str, int]) -> None:
    with Proxy(echo) as proxy, connect(proxy) as sock:
        sock.sendall(b"x")
        assert sock.recv(10) == b"x"
        assert proxy.reset() == 1
        with pytest.raises(ConnectionResetError):
            sock.sendall(b"y")
            sock.recv(10)
        with connect(proxy) as again:  # new connections work
            again.sendall(b"z")
            assert again.recv(10) == b"z"


def test_drop_ends_the_stream(echo: tuple[str, int]) -> None:
    with Proxy(echo) as proxy, connect(proxy) as sock:
        sock.sendall(b"x")
        assert sock.recv(10) == b"x"
        proxy.drop()
        assert sock.recv(10) == b""


def test_stall_holds_bytes_until_resume(echo: tuple[str, int]) -> None:
    with Proxy(echo) as proxy, connect(proxy) as sock:
        proxy.stall()
        sock.sendall(b"held")
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(10)
        proxy.resume()
        sock.settimeout(5)
        assert sock.recv(10) == b"held"


def test_block_refuses_new_connections_only(echo: tuple[str, int]) -> None:
    with Proxy(echo) as proxy, connect(proxy) as kept:
        kept.sendall(b"a")
        assert kept.recv(10) == b"a"
        proxy.block()
        # the reset may arrive during connect() already, or at the first read or write
        with pytest.raises((ConnectionResetError, BrokenPipeError)), connect(proxy) as refused:
            refused.sendall(b"b")
            if refused.recv(10) == b"":
                raise ConnectionResetError("closed")
        kept.sendall(b"c")
        assert kept.recv(10) == b"c"
        proxy.unblock()
        with connect(proxy) as fine:
            fine.sendall(b"d")
            assert fine.recv(10) == b"d"


def test_upstream_down_means_connection_reset() -> None:
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        port = spare.getsockname()[1]  # nothing listens on it once closed
    with Proxy(("127.0.0.1", port)) as proxy:
        data = b""
        try:
            with connect(proxy) as sock:  # the reset may come during connect() already
                data = sock.recv(10)
        except ConnectionResetError:
            pass
        assert data == b""
        wait_until(lambda: proxy.open_connections == 0, 5, "the link to be gone")


def test_tls_termination(echo: tuple[str, int], tmp_path: Path) -> None:
    ca, cert, key = make_certs(tmp_path)
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(cert, key)
    client_side = ssl.create_default_context(cafile=str(ca))
    with Proxy(echo, tls=server_side) as proxy:
        raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        with client_side.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(b"secret")
            assert sock.recv(100) == b"secret"
        untrusting = ssl.create_default_context()
        raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        with pytest.raises(ssl.SSLCertVerificationError):
            untrusting.wrap_socket(raw, server_hostname="localhost")
        raw.close()
