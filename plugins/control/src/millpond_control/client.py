"""kombu's pidbox on the wire, and the caller's side of it (`millpond inspect`, mingle, benchmarks).

The layout Celery's `app.control` and its workers use, over any broker with exchanges:

* requests go to the fanout exchange `<namespace>.pidbox` (namespace `celery`, Celery's
  `control_exchange`); each worker listens on its own queue `<node name>.<namespace>.pidbox`
  bound to it. The body is JSON: `{method, arguments, destination, pattern, matcher}` plus
  `{ticket, reply_to: {exchange, routing_key}}` when a reply is wanted; the headers carry a
  Lamport `clock` and `expires` (epoch seconds; 0 = never), after which a worker drops it;
* replies go to the direct exchange `reply.<namespace>.pidbox` with the caller's oid as routing
  key, which the caller's queue `<oid>.reply.<namespace>.pidbox` is bound with; the body is
  `{node name: result}` and the headers `{ticket, clock}`.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatch
from typing import TYPE_CHECKING, Any, Final

from millpond.contracts.broadcast import Exchange, Listen, Subscription
from millpond.contracts.broker import Broker
from millpond.produce.task import parse_rate
from millpond.wire import signing
from millpond.wire.protocol import JSON, Message

if TYPE_CHECKING:
    from millpond.produce.app import Millpond

#: Celery's defaults (control_queue_ttl, control_queue_expires)
QUEUE_TTL: Final = 300.0
QUEUE_EXPIRES: Final = 10.0


def pidbox_exchange(namespace: str = "celery") -> Exchange:
    return Exchange(f"{namespace}.pidbox", "fanout", durable=False)


def reply_exchange(namespace: str = "celery") -> Exchange:
    return Exchange(f"reply.{namespace}.pidbox", "direct", durable=False)


def node_queue(hostname: str, namespace: str = "celery") -> str:
    return f"{hostname}.{namespace}.pidbox"


def oid_for(instance: object) -> str:
    """A caller's oid, as kombu makes one: a UUID of the host, the process and the instance."""
    entity = f"{uuid.getnode():x}-{os.getpid():x}-0-{id(instance):x}"
    return str(uuid.uuid3(uuid.NAMESPACE_OID, entity))


def matches(hostname: str, body: Mapping[str, Any]) -> bool:
    """Whether a request is for this node: `destination` (a list of names), else `pattern`
    with `matcher` (glob, the default, or pcre: matched from the name's start, `re.match`, as
    kombu does), else everyone."""
    destination = body.get("destination")
    if destination:
        return hostname in destination
    pattern, matcher = body.get("pattern"), body.get("matcher")
    if pattern and matcher:
        if matcher == "pcre":
            return re.match(str(pattern), hostname) is not None
        if matcher == "glob":
            return fnmatch(hostname, str(pattern))
        return False  # kombu has no other matcher: its workers refuse the request too
    return True


class Clock:
    """A Lamport clock (kombu's): forwarded on every send, adjusted on every receive."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def forward(self) -> int:
        with self._lock:
            self.value += 1
            return self.value

    def adjust(self, other: Any) -> int:
        with self._lock:
            if isinstance(other, int) and not isinstance(other, bool):
                self.value = max(self.value, other) + 1
            return self.value


def encode(body: Any, headers: dict[str, Any], signing_key: str | None = None) -> Message:
    message = Message(
        json.dumps(body, separators=(",", ":"), default=str).encode(),
        headers,
        content_type=JSON,
        content_encoding="utf-8",
        properties={"delivery_mode": 1},
    )
    if signing_key:
        signing.sign(message, signing_key)
    return message


class Mailbox:
    """The caller's side: broadcast a command, collect `{node: reply}` answers for a while.

    One reply queue per mailbox, declared on first use and kept until `close`; replies that
    belong to another ticket (a late answer to an earlier call) are dropped.
    """

    def __init__(
        self,
        broker: Broker,
        *,
        namespace: str = "celery",
        signing_key: str | None = None,
        reply_expires: float = QUEUE_EXPIRES,
        reply_ttl: float = QUEUE_TTL,
    ) -> None:
        self.broker = broker
        self.namespace = namespace
        self.signing_key = signing_key
        self.oid = oid_for(self)
        self.clock = Clock()
        self._reply_expires = reply_expires
        self._reply_ttl = reply_ttl
        self._replies: Subscription | None = None

    def _reply_queue(self) -> Subscription:
        if self._replies is None:
            self._replies = self.broker.listen(
                Listen(
                    f"{self.oid}.reply.{self.namespace}.pidbox",
                    reply_exchange(self.namespace),
                    self.oid,
                    exclusive=False,
                    auto_delete=True,
                    message_ttl=self._reply_ttl,
                    expires=self._reply_expires,
                )
            )
        return self._replies

    def cast(
        self,
        method: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        destination: Sequence[str] | None = None,
        pattern: str | None = None,
        matcher: str | None = None,
    ) -> None:
        """Send a command and expect no reply."""
        self._send(method, arguments, destination, pattern, matcher, None, 0.0)

    def call(
        self,
        method: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        destination: Sequence[str] | None = None,
        pattern: str | None = None,
        matcher: str | None = None,
        timeout: float = 1.0,
        limit: int | None = None,
        on_reply: Callable[[dict[str, Any]], None] | None = None,
        quiet: float | None = None,
    ) -> list[dict[str, Any]]:
        """Send a command and return the replies (`[{node: result}, ...]`) that arrive within
        `timeout` seconds, or as soon as `limit` have (default: one per destination, and never more
        than the listeners the broker says the request reached: none reached, no wait), or once
        none has come for `quiet` seconds (when the caller cannot know how many will answer)."""
        replies = self._reply_queue()
        ticket = str(uuid.uuid4())
        if limit is None and destination:
            limit = len(destination)
        reached = self._send(method, arguments, destination, pattern, matcher, ticket, timeout)
        if reached is not None:  # the broker counted the listeners: no node more can answer
            if reached == 0:
                return []
            limit = reached if limit is None else min(limit, reached)
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while limit is None or len(out) < limit:
            now = time.monotonic()
            left = deadline - now
            if quiet is not None:
                left = min(left, last + quiet - now)
            if left <= 0:
                break
            for got in replies.receive(min(left, 0.25)):
                last = time.monotonic()
                headers = got.message.headers
                self.clock.adjust(headers.get("clock"))
                if headers.get("ticket", ticket) != ticket:
                    continue
                try:
                    body = json.loads(got.message.body)
                except ValueError:
                    continue
                if isinstance(body, dict):
                    out.append(body)
                    if on_reply is not None:
                        on_reply(body)
        return out

    def _send(  # noqa: PLR0917 - private, called from two places with every field
        self,
        method: str,
        arguments: Mapping[str, Any] | None,
        destination: Sequence[str] | None,
        pattern: str | None,
        matcher: str | None,
        ticket: str | None,
        timeout: float,
    ) -> int | None:
        """Broadcast the request; how many listeners it reached, if the broker knows."""
        body: dict[str, Any] = {
            "method": method,
            "arguments": dict(arguments or {}),
            "destination": list(destination) if destination else None,
            "pattern": pattern,
            "matcher": matcher,
        }
        if ticket is not None:
            body["ticket"] = ticket
            body["reply_to"] = {
                "exchange": reply_exchange(self.namespace).name,
                "routing_key": self.oid,
            }
        headers = {
            "clock": self.clock.forward(),
            "expires": time.time() + timeout if timeout else 0,
        }
        return self.broker.broadcast(
            pidbox_exchange(self.namespace), encode(body, headers, self.signing_key)
        )

    def close(self) -> None:
        replies, self._replies = self._replies, None
        if replies is not None:
            replies.close()


class Inspect:
    """`app.control.inspect()`: each method returns `{node: reply}`, or None when no worker
    answered within the timeout (Celery's `Inspect`)."""

    def __init__(self, control: Control, destination: Sequence[str] | None, timeout: float) -> None:
        self._control = control
        self.destination = list(destination) if destination else None
        self.timeout = timeout

    def _request(self, method: str, **arguments: Any) -> dict[str, Any] | None:
        replies = self._control.broadcast(
            method, arguments, destination=self.destination, reply=True, timeout=self.timeout
        )
        merged: dict[str, Any] = {}
        for reply in replies or []:
            merged.update(reply)
        return merged or None

    def ping(self) -> dict[str, Any] | None:
        return self._request("ping")

    def stats(self) -> dict[str, Any] | None:
        return self._request("stats")

    def active(self, safe: bool = False) -> dict[str, Any] | None:
        return self._request("active", safe=safe)

    def reserved(self) -> dict[str, Any] | None:
        return self._request("reserved")

    def scheduled(self) -> dict[str, Any] | None:
        return self._request("scheduled")

    def registered(self, *taskinfoitems: str) -> dict[str, Any] | None:
        return self._request("registered", taskinfoitems=list(taskinfoitems))

    def active_queues(self) -> dict[str, Any] | None:
        return self._request("active_queues")

    def revoked(self) -> dict[str, Any] | None:
        return self._request("revoked")

    def conf(self, with_defaults: bool = False) -> dict[str, Any] | None:
        return self._request("conf", with_defaults=with_defaults)

    def query_task(self, *ids: str | Sequence[str]) -> dict[str, Any] | None:
        """`query_task(id1, id2)`, or `query_task([id1, id2])` (Celery takes both)."""
        if len(ids) == 1 and not isinstance(ids[0], str):
            ids = tuple(ids[0])
        return self._request("query_task", ids=list(ids))

    def report(self) -> dict[str, Any] | None:
        return self._request("report")


class Control:
    """`app.control`: Celery's remote-control API for millpond and Celery workers alike.

    Calls without `reply=True` are fire-and-forget, as in Celery; pass `reply=True` to learn
    which workers obeyed (a revoke nobody heard is then visible as an empty list).
    """

    def __init__(self, broker: Broker, *, namespace: str, signing_key: str | None) -> None:
        self.mailbox = Mailbox(broker, namespace=namespace, signing_key=signing_key)

    def inspect(self, destination: Sequence[str] | None = None, timeout: float = 1.0) -> Inspect:
        return Inspect(self, destination, timeout)

    def broadcast(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        destination: Sequence[str] | None = None,
        reply: bool = False,
        timeout: float = 1.0,
        limit: int | None = None,
        pattern: str | None = None,
        matcher: str | None = None,
    ) -> list[dict[str, Any]] | None:
        if not reply:
            self.mailbox.cast(
                command, arguments, destination=destination, pattern=pattern, matcher=matcher
            )
            return None
        return self.mailbox.call(
            command,
            arguments,
            destination=destination,
            pattern=pattern,
            matcher=matcher,
            timeout=timeout,
            limit=limit,
        )

    def ping(
        self, destination: Sequence[str] | None = None, timeout: float = 1.0
    ) -> list[dict[str, Any]]:
        return self.broadcast("ping", destination=destination, reply=True, timeout=timeout) or []

    def revoke(
        self,
        task_id: str | Sequence[str],
        *,
        destination: Sequence[str] | None = None,
        terminate: bool = False,
        signal: str = "SIGTERM",
        reply: bool = False,
        timeout: float = 1.0,
    ) -> list[dict[str, Any]] | None:
        """Revoke tasks on every worker (a revoke holds: see docs/control.md)."""
        ids = [task_id] if isinstance(task_id, str) else list(task_id)
        return self.broadcast(
            "revoke",
            {"task_id": ids, "terminate": terminate, "signal": signal},
            destination=destination,
            reply=reply,
            timeout=timeout,
        )

    def terminate(
        self, task_id: str | Sequence[str], signal: str = "SIGTERM", **options: Any
    ) -> list[dict[str, Any]] | None:
        return self.revoke(task_id, terminate=True, signal=signal, **options)

    def revoke_by_stamped_headers(
        self,
        headers: Mapping[str, Any],
        *,
        destination: Sequence[str] | None = None,
        terminate: bool = False,
        signal: str = "SIGTERM",
        reply: bool = False,
        timeout: float = 1.0,
    ) -> list[dict[str, Any]] | None:
        """Revoke every task whose stamped header has one of these values (Celery's)."""
        return self.broadcast(
            "revoke_by_stamped_headers",
            {"headers": dict(headers), "terminate": terminate, "signal": signal},
            destination=destination,
            reply=reply,
            timeout=timeout,
        )

    def shutdown(
        self, destination: Sequence[str] | None = None, reply: bool = False, timeout: float = 1.0
    ) -> list[dict[str, Any]] | None:
        return self.broadcast("shutdown", destination=destination, reply=reply, timeout=timeout)

    def pool_grow(self, n: int = 1, **options: Any) -> list[dict[str, Any]] | None:
        return self.broadcast("pool_grow", {"n": n}, **options)

    def pool_shrink(self, n: int = 1, **options: Any) -> list[dict[str, Any]] | None:
        return self.broadcast("pool_shrink", {"n": n}, **options)

    def time_limit(
        self, task_name: str, soft: float | None = None, hard: float | None = None, **options: Any
    ) -> list[dict[str, Any]] | None:
        arguments = {"task_name": task_name, "soft": soft, "hard": hard}
        return self.broadcast("time_limit", arguments, **options)

    def rate_limit(
        self, task_name: str, rate_limit: str | float | None, **options: Any
    ) -> list[dict[str, Any]] | None:
        """A task's rate limit on the workers ("10/m"; "" or 0: none), as Celery's
        `app.control.rate_limit`; the rate is checked here first (a typo raises
        `InvalidRateLimit` instead of reaching every worker)."""
        parse_rate(rate_limit)
        arguments = {"task_name": task_name, "rate_limit": rate_limit}
        return self.broadcast("rate_limit", arguments, **options)

    def add_consumer(self, queue: str, **options: Any) -> list[dict[str, Any]] | None:
        return self.broadcast("add_consumer", {"queue": queue}, **options)

    def cancel_consumer(self, queue: str, **options: Any) -> list[dict[str, Any]] | None:
        return self.broadcast("cancel_consumer", {"queue": queue}, **options)

    def close(self) -> None:
        self.mailbox.close()


def open_control(app: Millpond) -> Control:
    """`app.control` for an app (the `millpond.clients` entry point `control`): the `[control]`
    exchange and the app's signing key, on the app's broker."""
    from millpond_control.settings import SECTION, ControlSettings

    control = ControlSettings.from_section(app.settings.section(SECTION))
    return Control(app.broker, namespace=control.exchange, signing_key=app.settings.signing_key)
