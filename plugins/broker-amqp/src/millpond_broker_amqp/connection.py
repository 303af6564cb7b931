"""Open py-amqp connections from `AmqpConfig`, and sort AMQP failures into "retry" and "give up".

py-amqp is used for everything except the consumer's hot path (see `frames`): the handshake, TLS,
channel management and the synchronous methods. Its failures come as a zoo of socket errors and
AMQP reply codes; `is_transient` is the one place that decides which of them a reconnect can cure.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import amqp
from amqp import exceptions as amqp_exc
from amqp.transport import SSLTransport

from millpond.exceptions import AccessDenied, BrokerError, PublishError
from millpond_broker_amqp.settings import AmqpConfig

log = logging.getLogger("millpond.broker.amqp")

#: what the broker reports to RabbitMQ (shown in the management UI's connection list)
_CLIENT_PROPERTIES = {"product": "millpond", "information": "millpond AMQP broker plugin"}

#: errors a new connection can cure: the server went away, restarted, or closed us on purpose
TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,  # ConnectionRefused/Reset, BrokenPipe, socket.timeout, SSL errors
    amqp_exc.RecoverableConnectionError,  # ConnectionForced (server shutdown), Blocked, ...
    amqp_exc.IrrecoverableConnectionError,  # UnexpectedFrame, InternalError: start afresh
    amqp_exc.RecoverableChannelError,
    EOFError,
)


class _ContextSSLTransport(SSLTransport):  # type: ignore[misc]
    """py-amqp's TLS transport, but wrapping with the caller's own `ssl.SSLContext`."""

    context: ssl.SSLContext
    server_hostname: str | None

    def _wrap_socket(self, sock: socket.socket, context: Any = None, **sslopts: Any) -> Any:
        return self.context.wrap_socket(sock, server_hostname=self.server_hostname)


class _Connection(amqp.Connection):  # type: ignore[misc]
    """An `amqp.Connection` whose TLS comes from a ready `ssl.SSLContext`."""

    tls_context: ssl.SSLContext | None = None
    tls_server_hostname: str | None = None

    def Transport(  # noqa: PLR0917 - py-amqp's hook, called positionally
        self,
        host: str,
        connect_timeout: float | None,
        ssl: Any = False,
        read_timeout: float | None = None,
        write_timeout: float | None = None,
        socket_settings: Any = None,
        **kwargs: Any,
    ) -> Any:
        if self.tls_context is None:
            return super().Transport(
                host, connect_timeout, False, read_timeout, write_timeout, socket_settings, **kwargs
            )
        transport = _ContextSSLTransport(
            host,
            connect_timeout=connect_timeout,
            ssl={},
            read_timeout=read_timeout,
            write_timeout=write_timeout,
            socket_settings=socket_settings,
        )
        transport.context = self.tls_context
        transport.server_hostname = self.tls_server_hostname or host.rsplit(":", 1)[0]
        return transport


def open_connection(settings: AmqpConfig, *, heartbeat: float, purpose: str) -> amqp.Connection:
    """A connected, handshaken connection; raises `BrokerError` (transient cause chained) if not.

    With a failover URL the nodes are tried in order and the first that answers serves; a
    refusal that another node would repeat (credentials, virtual host) is raised at once.
    `purpose` names the connection in RabbitMQ's management UI ("publisher", "consumer").
    """
    nodes = settings.nodes
    last: BrokerError | None = None
    for index, (host, port) in enumerate(nodes):
        try:
            conn = _open_one(settings, host, port, heartbeat=heartbeat, purpose=purpose)
        except BrokerError as exc:
            if not is_transient(exc) or len(nodes) == 1:
                raise
            last = exc
            continue
        if index:
            log.info(
                "amqp: %s connected to %s:%d, node %d of %d in the broker URL (the ones before "
                "it did not answer)",
                purpose,
                host,
                port,
                index + 1,
                len(nodes),
            )
        return conn
    assert last is not None
    raise BrokerError(
        f"cannot connect to any of the {len(nodes)} RabbitMQ nodes of {settings.safe_url}; the "
        f"last said: {last}"
    ) from last.__cause__


def _open_one(
    settings: AmqpConfig, host: str, port: int, *, heartbeat: float, purpose: str
) -> amqp.Connection:
    conn = _Connection(
        host=f"{host}:{port}",
        userid=settings.userid,
        password=settings.password,
        virtual_host=settings.virtual_host,
        heartbeat=round(heartbeat) if heartbeat > 0 else 0,
        connect_timeout=settings.connect_timeout,
        write_timeout=settings.operation_timeout,
        client_properties={**_CLIENT_PROPERTIES, "connection_name": f"millpond {purpose}"},
        confirm_publish=False,
    )
    conn.tls_context = settings.tls
    conn.tls_server_hostname = settings.ssl_server_hostname
    try:
        conn.connect()
    except amqp_exc.AccessRefused as exc:
        _quiet_close(conn)
        raise AccessDenied(
            f"RabbitMQ at {settings.safe_url} refused the credentials ({exc.reply_text or exc}); "
            "check the user and password in the broker URL (rabbitmqctl authenticate_user "
            "checks them); retrying cannot help"
        ) from exc
    except (amqp_exc.NotAllowed, amqp_exc.InvalidPath) as exc:
        _quiet_close(conn)
        raise AccessDenied(
            f"RabbitMQ at {settings.safe_url} does not allow virtual host "
            f"{settings.virtual_host!r} ({exc.reply_text or exc}); create it "
            "(rabbitmqctl add_vhost) or grant the user access (rabbitmqctl set_permissions)"
        ) from exc
    except TRANSIENT as exc:
        _quiet_close(conn)
        raise BrokerError(
            f"cannot connect to RabbitMQ at {settings.safe_url}: {describe(exc)}; is the server "
            "running and reachable?"
        ) from exc
    return conn


def describe(exc: BaseException) -> str:
    """A one-line description of an AMQP or socket failure, never including credentials."""
    if isinstance(exc, amqp_exc.AMQPError) and exc.reply_text:
        return f"{type(exc).__name__}: {exc.reply_text}"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text


def is_transient(exc: BaseException) -> bool:
    """Whether reconnecting may cure `exc` (as opposed to a mistake the caller must fix)."""
    if isinstance(exc, PublishError):
        return False  # raised on purpose: a nack, an unroutable or unencodable message
    if isinstance(exc, BrokerError):
        return isinstance(exc.__cause__, TRANSIENT) and is_transient(exc.__cause__)
    if isinstance(exc, amqp_exc.AccessRefused | amqp_exc.NotAllowed | amqp_exc.InvalidPath):
        return False
    return isinstance(exc, TRANSIENT)


def _quiet_close(conn: amqp.Connection) -> None:
    """Drop a connection without the closing handshake (it may be half-open or dead)."""
    try:
        conn.collect()
    except Exception:
        pass
    transport = getattr(conn, "_transport", None)
    if transport is not None:
        try:
            transport.close()
        except Exception:
            pass


def abandon(conn: amqp.Connection | None) -> None:
    """Release a connection that is dead or belongs to a parent process: close the socket only.

    No AMQP close is sent: after a fork the socket is shared with the parent, whose connection
    must stay intact; after a failure there is nobody to talk to.
    """
    if conn is None:
        return
    transport = getattr(conn, "_transport", None)
    sock = getattr(transport, "sock", None)
    if transport is not None and sock is not None:
        try:
            sock.close()
        except OSError:
            pass
        transport.sock = None  # so collect() below cannot shutdown() the parent's socket
    try:
        conn.collect()
    except Exception:
        pass


def close_gracefully(conn: amqp.Connection | None, timeout: float) -> None:
    """Send connection.close and wait (bounded) for close-ok; fall back to dropping the socket."""
    if conn is None:
        return
    sock = getattr(getattr(conn, "_transport", None), "sock", None)
    try:
        if sock is not None:
            sock.settimeout(timeout)
        conn.close()
    except Exception:
        abandon(conn)


@contextmanager
def bounded(conn: amqp.Connection, timeout: float) -> Iterator[None]:
    """Give py-amqp's blocking calls on this connection a deadline (the socket is otherwise
    blocking without one); a timeout surfaces as `socket.timeout`, a transient error."""
    sock = conn.transport.sock
    sock.settimeout(timeout)
    try:
        yield
    finally:
        try:
            sock.settimeout(None)
        except OSError:
            pass


def tls_pending(sock: Any) -> bool:
    """Whether TLS has decrypted bytes that select() cannot see."""
    return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
