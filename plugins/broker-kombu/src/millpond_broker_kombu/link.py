"""kombu connections for one broker URL: one per thread, rebuilt after `os.fork()`.

kombu connections and channels are neither thread-safe nor fork-safe, while the broker contract
lets any thread (task code calling `.delay()`, pool threads, forked children) publish. So each
thread gets its own connection, found through a thread-local slot stamped with the pid that made
it. Publishing goes through kombu's own `Producer` on the default exchange (routing key = queue),
so the bytes on the transport are exactly what Celery's producer writes there.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import kombu.connection
import kombu.messaging

from millpond.exceptions import AccessDenied, BrokerError, PublishAccessDenied, PublishError
from millpond.wire.protocol import Message

log = logging.getLogger("millpond.broker.kombu")

T = TypeVar("T")

# kombu's classes carry no annotations: they are used as Any, behind this module's typed surface
Connection: Any = kombu.connection.Connection
Producer: Any = kombu.messaging.Producer

#: envelope properties kombu sets itself, or that hold for one send only (an SQS delay, a FIFO
#: deduplication id): never passed back in when a received message is published again
_KOMBU_OWN = frozenset({"delivery_tag", "body_encoding", "delivery_info", "priority",
                        "delivery_mode", "DelaySeconds", "delay_seconds",
                        "MessageDeduplicationId"})  # fmt: skip


#: AWS error codes that mean the credentials or a permission were refused: waiting cannot cure them
DENIED_CODES = frozenset({
    "AccessDenied", "AccessDeniedException", "InvalidClientTokenId", "SignatureDoesNotMatch",
    "UnrecognizedClientException", "InvalidAccessKeyId", "ExpiredToken", "AuthFailure",
    "InvalidSecurity", "MissingAuthenticationToken",
})  # fmt: skip


def denied(exc: BaseException) -> str | None:
    """The error code when `exc` is a refusal of credentials or permissions (botocore's
    ClientError carries it in `response`), else None."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    code = str(response.get("Error", {}).get("Code", ""))
    if code in DENIED_CODES:
        return code
    # an error body botocore could not parse leaves the HTTP status as the code: name the refusal
    # from the text when it is there
    named = next((c for c in sorted(DENIED_CODES) if c in str(exc)), None)
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if named or status == 403:
        return named or f"HTTP {status}"
    return None


def access_denied(
    what: str, where: str, exc: BaseException, code: str, publish: bool
) -> AccessDenied:
    cls = PublishAccessDenied if publish else AccessDenied
    return cls(
        f"{what} was refused by {where}: {code} ({exc}). Check the credentials (the URL's user "
        "and password, or boto3's credential chain: environment, ~/.aws, the instance role) and "
        "the permissions on the queue"
    )


_SAID_PRIORITY: set[str] = set()


def warn_unused_priority(transport: str, message: Message) -> None:
    """Say once per process that a transport without priorities ignores a message's priority
    (a Celery habit: `apply_async(priority=9)`), instead of dropping it without a word."""
    priority = message.properties.get("priority")
    if not priority or transport in _SAID_PRIORITY:
        return
    _SAID_PRIORITY.add(transport)
    log.warning(
        "%s has no message priorities: priority=%s (task %s) is carried in the message but does "
        "not change the order; use a separate queue for urgent work",
        transport,
        priority,
        message.task_name,
    )


def release(conn: Any) -> None:
    """Close a kombu connection and what its channels opened that kombu leaves running (the
    zookeeper transport's KazooClient keeps a thread reconnecting forever otherwise)."""
    transport = getattr(conn, "_transport", None)
    clients = [
        getattr(channel, "_client", None)
        for channel in [
            *getattr(transport, "channels", ()),
            *getattr(transport, "_avail_channels", ()),
        ]
    ]
    try:
        conn.release()
    except Exception:
        pass  # a dead connection may fail to close; it is gone either way
    for client in clients:
        stop = getattr(client, "stop", None)
        if client is not None and callable(stop) and hasattr(client, "close"):
            try:
                stop()
                client.close()
            except Exception:
                pass


def publish_kwargs(message: Message) -> dict[str, Any]:
    """`Producer.publish` keyword arguments that reproduce `message` in kombu's envelope."""
    props = message.properties
    extra = {k: v for k, v in props.items() if k not in _KOMBU_OWN and v is not None}
    return {
        "headers": dict(message.headers),
        "content_type": message.content_type,
        "content_encoding": message.content_encoding,
        "delivery_mode": props.get("delivery_mode", 2),
        "priority": props.get("priority") or 0,
        **extra,
    }


class Link:
    """Thread-local kombu connections to one transport, with bounded retries around each use."""

    def __init__(
        self,
        url: str,
        *,
        safe_url: str,
        transport_options: Mapping[str, Any],
        retry_timeout: float,
        transport: str | None = None,
    ) -> None:
        self.url = url
        self.safe_url = safe_url
        self.transport_options = dict(transport_options)
        self.retry_timeout = retry_timeout
        self._transport = transport
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()

    def new_connection(self) -> Any:
        """A fresh kombu connection (the caller owns it), e.g. for a consumer's own use."""
        if self._transport is not None:
            conn = Connection(transport=self._transport, transport_options=self.transport_options)
        else:
            conn = Connection(self.url, transport_options=self.transport_options)
        with self._lock:
            self._all.append(conn)
        return conn

    def _mine(self) -> tuple[Any, Any]:
        slot = getattr(self._local, "slot", None)
        if slot is not None and slot[0] == os.getpid():
            return slot[1], slot[2]
        conn = self.new_connection()
        producer = Producer(conn.default_channel)
        self._local.slot = (os.getpid(), conn, producer)
        return conn, producer

    def _drop(self) -> None:
        slot = getattr(self._local, "slot", None)
        self._local.slot = None
        if slot is not None and slot[0] == os.getpid():
            self._release(slot[1])

    def _release(self, conn: Any) -> None:
        with self._lock:
            if conn in self._all:
                self._all.remove(conn)
        release(conn)

    def run(
        self,
        what: str,
        op: Callable[[Any, Any], T],
        error: type[BrokerError] = BrokerError,
    ) -> T:
        """Run `op` with this thread's connection; on a connection error drop it, back off and
        retry until `retry_timeout` passed, then raise `error` saying what failed."""
        deadline = time.monotonic() + self.retry_timeout
        pause, attempts = 0.05, 0
        while True:
            attempts += 1
            conn: Any = None
            try:
                conn, producer = self._mine()  # connecting is where a refusal shows first
                return op(conn, producer)
            except (BrokerError, ValueError, TypeError):
                raise
            except Exception as exc:
                code = denied(exc)
                if code is not None:
                    raise access_denied(
                        what, self.safe_url, exc, code, issubclass(error, PublishError)
                    ) from exc
                recoverable = conn is None or isinstance(
                    exc, conn.connection_errors + conn.channel_errors
                )
                self._drop()
                left = deadline - time.monotonic()
                if not recoverable or left <= 0:
                    raise error(
                        f"{what} failed on {self.safe_url} ({attempts} attempt(s); last error "
                        f"{type(exc).__name__}: {exc}). Check that the transport is reachable; "
                        "publish_retry_timeout sets how long to keep trying"
                    ) from exc
                if attempts == 1:
                    log.warning("%s failed on %s (%s); retrying", what, self.safe_url, exc)
                time.sleep(min(pause, left))
                pause = min(pause * 2, 2.0)

    def publish(self, queue: str, message: Message, **properties: Any) -> None:
        """Send `message` to `queue` through kombu's producer (default exchange)."""
        kwargs = publish_kwargs(message)
        kwargs.update(properties)

        def send(_conn: Any, producer: Any) -> None:
            producer.publish(message.body, routing_key=queue, exchange="", **kwargs)

        self.run(f"publishing to {queue!r}", send, PublishError)

    def close(self) -> None:
        """Close every connection this link made, in every thread (the broker is done)."""
        with self._lock:
            conns, self._all = list(self._all), []
        for conn in conns:
            release(conn)
        self._local = threading.local()
