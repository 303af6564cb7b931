"""The worker's pidbox node: a thread that answers remote control on Celery's wire contract.

It listens on `<node name>.celery.pidbox` (bound to the `celery.pidbox` fanout, with Celery's
queue TTL and expiry), on a broker connection of its own, so a busy consumer loop (the solo pool
running a long task) never delays a `ping`, and a flood of control messages never delays a task.
For each request it:

1. drops what is not for it (`destination`, `pattern`/`matcher`) or has expired (`expires`
   header: the caller stopped waiting), and anything but JSON;
2. checks the policy (`[control] commands`, `deny`, and the signature when `signing_key` is
   set: an unsigned or forged request is refused, and logged, unless it is a read-only command
   and `[control] unsigned = safe`);
3. runs the registered handler (`registry.COMMANDS`) and, when the caller wants a reply, sends
   `{node name: result}` to its reply queue with a TTL (`reply_ttl`), cut to `reply_max_bytes`.

Handlers run on this thread; those that change what the consumer loop owns (its consumer, its
buffer) hand a function to `Worker.call_soon`, which the loop runs on its next turn.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from typing import TYPE_CHECKING, Any

from millpond.contracts.broadcast import Exchange, Listen, Received, Subscription, unavailable
from millpond.exceptions import BrokerError, SignatureError
from millpond.wire import signing
from millpond.wire.protocol import JSON
from millpond_control import commands as _builtin  # noqa: F401 - registers the commands
from millpond_control.client import (
    Clock,
    Mailbox,
    encode,
    matches,
    node_queue,
    pidbox_exchange,
)
from millpond_control.registry import (
    COMMANDS,
    Command,
    ControlContext,
    Registry,
    Request,
    nok,
)
from millpond_control.settings import ControlSettings

if TYPE_CHECKING:
    from millpond.consume.worker import Worker
    from millpond_control.component import ControlPlane

log = logging.getLogger("millpond.control")

#: seconds without a new pong after which a starting worker stops waiting for more
MINGLE_QUIET = 0.25


class ControlNode:
    """Answers remote control for one worker, on a thread of its own."""

    def __init__(
        self,
        worker: Worker,
        settings: ControlSettings,
        registry: Registry = COMMANDS,
        *,
        plane: ControlPlane,
    ) -> None:
        self.worker = worker
        #: the component this node belongs to (the revoked set it merges into)
        self.plane = plane
        self.settings = settings
        self.registry = registry
        self.hostname = worker.name
        self.clock = Clock()
        self.signing_key = worker.settings.signing_key
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sub: Subscription | None = None
        #: how many requests were answered, refused, dropped (for stats and tests)
        self.answered = 0
        self.refused = 0
        self.dropped = 0

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> bool:
        """Start listening; False (with a warning) where the broker cannot carry it."""
        broker = self.worker.app.broker
        if not broker.supports_broadcast:
            log.warning(unavailable(broker) + "; this worker answers no inspect/control command")
            return False
        spec = Listen(
            node_queue(self.hostname, self.settings.exchange),
            pidbox_exchange(self.settings.exchange),
            exclusive=self.settings.queue_exclusive,
            auto_delete=True,
            message_ttl=self.settings.queue_ttl,
            expires=self.settings.queue_expires,
        )
        try:
            self._sub = broker.listen(spec)
        except BrokerError as exc:
            log.error("remote control is off on this worker: %s", exc)
            return False
        self._thread = threading.Thread(target=self._run, name="millpond-control", daemon=True)
        self._thread.start()
        return True

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        sub = self._sub
        assert sub is not None
        try:
            while not self._stop.is_set():
                for received in sub.receive(0.5):
                    if self._stop.is_set():
                        break
                    try:
                        self.handle(received)
                    except Exception:
                        log.exception("remote control: a request could not be handled")
        finally:
            sub.close()

    # -- one request -----------------------------------------------------------------------------
    def handle(self, received: Received) -> Any:
        """Answer one request; returns the reply (None when it was not for this node)."""
        message = received.message
        headers = message.headers if isinstance(message.headers, dict) else {}
        self.clock.adjust(headers.get("clock"))
        expires = headers.get("expires")
        if isinstance(expires, int | float) and expires and time.time() > expires:
            self.dropped += 1
            log.debug("remote control: dropped an expired request")
            return None
        if message.content_type.split(";")[0].strip().lower() != JSON:
            self.dropped += 1
            log.warning(
                "remote control: dropped a request in %r; only JSON is accepted",
                message.content_type,
            )
            return None
        try:
            body = json.loads(message.body)
        except ValueError as exc:
            self.dropped += 1
            log.warning("remote control: dropped a request that is not JSON: %s", exc)
            return None
        if not isinstance(body, dict) or not isinstance(body.get("method"), str):
            self.dropped += 1
            return None
        if body.get("pattern") and body.get("matcher") not in (None, "", "glob", "pcre"):
            self.dropped += 1
            log.warning(
                "remote control: dropped %r sent with matcher %r; kombu's matchers are glob "
                "and pcre",
                body["method"],
                body.get("matcher"),
            )
            return None
        if not matches(self.hostname, body):
            return None
        arguments = body.get("arguments") or {}
        request = Request(
            method=body["method"],
            arguments=arguments if isinstance(arguments, dict) else {},
            reply_to=body.get("reply_to") if isinstance(body.get("reply_to"), dict) else None,
            ticket=body.get("ticket"),
            headers=headers,
        )
        reply = self.dispatch(request, self._signature_state(message))
        if request.reply_to:
            self._reply(request, reply)
        return reply

    def _signature_state(self, message: Any) -> str:
        """'off' (no signing_key), 'valid', 'unsigned' or 'forged'."""
        if not self.signing_key:
            return "off"
        if not message.headers.get(signing.HEADER):
            return "unsigned"
        try:
            signing.verify(message, self.signing_key)
        except SignatureError:
            return "forged"
        return "valid"

    def refusal(self, cmd: Command, signature: str) -> str | None:
        """Why this worker refuses the command, or None when it obeys."""
        settings = self.settings
        if cmd.name in settings.deny:
            return f"{cmd.name} is disabled on this worker ([control] deny)"
        if settings.commands == "safe" and not cmd.safe:
            return (
                f"{cmd.name} changes the worker, and this worker obeys read-only commands only "
                "([control] commands = safe)"
            )
        if signature == "forged":
            return "the request's signature does not match (altered, or signed with another key)"
        if signature == "unsigned" and (settings.unsigned == "refuse" or not cmd.safe):
            return (
                f"{cmd.name} was not signed, and this worker requires signed control requests "
                "(signing_key is set); send it with millpond control from a process configured "
                "with the same signing_key"
            )
        return None

    def dispatch(self, request: Request, signature: str = "off") -> Any:
        cmd = self.registry.get(request.method)
        if cmd is None:
            self.refused += 1
            return nok(f"unknown command {request.method!r}: this millpond worker does not have it")
        why = self.refusal(cmd, signature)
        if why is not None:
            self.refused += 1
            log.warning(
                "remote control: refused %s: %s", request.method, why, extra={"signed": signature}
            )
            return nok(f"refused: {why}")
        ctx = ControlContext(self.worker, self.hostname, request)
        try:
            reply = cmd.handler(ctx, **request.arguments)
        except TypeError as exc:
            log.warning("remote control: %s called with bad arguments: %s", cmd.name, exc)
            return {"error": repr(exc)}
        except Exception as exc:
            log.exception("remote control: %s failed", cmd.name)
            return {"error": repr(exc)}
        self.answered += 1
        return reply

    def _reply(self, request: Request, reply: Any) -> None:
        reply_to = request.reply_to or {}
        exchange, routing_key = reply_to.get("exchange"), reply_to.get("routing_key")
        if not isinstance(exchange, str) or not exchange or not isinstance(routing_key, str):
            return
        headers = {"ticket": request.ticket, "clock": self.clock.forward()}
        message = encode({self.hostname: reply}, headers)
        if len(message.body) > self.settings.reply_max_bytes:
            log.warning(
                "remote control: the reply to %s is %d bytes, over [control] reply_max_bytes "
                "(%d); sent an error instead",
                request.method,
                len(message.body),
                self.settings.reply_max_bytes,
            )
            message = encode(
                {
                    self.hostname: nok(
                        f"the reply to {request.method} was {len(message.body)} bytes, over this "
                        f"worker's reply_max_bytes ({self.settings.reply_max_bytes}); ask for "
                        "less (a destination, fewer ids) or raise [control] reply_max_bytes"
                    )
                },
                headers,
            )
        try:
            self.worker.app.broker.broadcast(
                Exchange(exchange, "direct", durable=False),
                message,
                routing_key,
                ttl=self.settings.reply_ttl,
            )
        except BrokerError as exc:
            log.warning("remote control: could not reply to %s: %s", request.method, exc)

    # -- mingle ------------------------------------------------------------------------------------
    def mingle(self) -> int:
        """Learn the running workers' revoked ids (Celery's `hello`); how many were new.

        Celery sends `hello` to everyone and every node answers with its whole revoked set: at
        1,000 nodes that is 1,000 multi-megabyte replies per start. Here the starting worker
        pings first (a few bytes per node), then says `hello` to `mingle_peers` of them only,
        chosen at random: their sets are the same revokes, heard by all.
        """
        broker = self.worker.app.broker
        if not broker.supports_broadcast or not self.settings.mingle or broker.system == "memory":
            return 0  # memory://: one process, nobody else to ask
        mailbox = Mailbox(broker, namespace=self.settings.exchange, signing_key=self.signing_key)
        revoked = self.plane.revoked
        try:
            # stop once every listener the broker counted has answered (none: no wait at all,
            # so a worker that starts alone starts at once); where the broker cannot count,
            # once the pongs stop coming (nobody else running then costs MINGLE_QUIET)
            pongs = mailbox.call("ping", timeout=self.settings.mingle_timeout, quiet=MINGLE_QUIET)
            others = sorted({n for reply in pongs for n in reply if n != self.hostname})
            if not others:
                return 0
            peers = random.sample(others, min(self.settings.mingle_peers, len(others)))
            replies = mailbox.call(
                "hello",
                {
                    "from_node": self.hostname,
                    "revoked": revoked.ids(self.settings.hello_revokes_max),
                },
                destination=peers,
                timeout=self.settings.mingle_timeout,
            )
        except BrokerError as exc:
            log.warning("mingle: could not ask the other workers: %s", exc)
            return 0
        finally:
            mailbox.close()
        new = 0
        for reply in replies:
            for node, answer in reply.items():
                if node == self.hostname or not isinstance(answer, dict):
                    continue
                ids = answer.get("revoked") or []
                if isinstance(ids, dict):  # a Celery worker may send its LimitedSet's data
                    ids = list(ids)
                if isinstance(ids, list):
                    new += revoked.merge(ids)
                self.clock.adjust(answer.get("clock"))
        log.info(
            "mingle: synced with %d worker(s) of %d, %d new revoked id(s)",
            len(replies),
            len(others),
            new,
        )
        return new
