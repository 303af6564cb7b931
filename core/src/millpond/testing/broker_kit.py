"""The broker conformance kit: one pytest class every broker plugin's test module subclasses.

    from millpond.testing.broker_kit import BrokerContract

    class TestRedisContract(BrokerContract):
        @pytest.fixture
        def broker_url(self) -> str:
            return "redis://127.0.0.1:6379/15"

        @pytest.fixture
        def broker_options(self) -> dict[str, Any]:
            return {"visibility_timeout": 2.0}     # short timings keep the lease tests fast

The kit exists so that "works with millpond" means the same thing for every transport: the worker
relies on each guarantee tested here (exact round trips, the prefetch limit, prompt wake-ups,
redelivery counts, dead letters, delays held by the broker, and above all that a dead consumer's
messages come back while a live consumer's never do). The class has no `Test` prefix, so pytest
collects it only through a subclass.

Fixtures a subclass provides or overrides (the names are stable):

* `broker_url` (required): the URL the broker class is constructed with.
* `broker_options`: the options mapping (default `{}`); must be JSON-serialisable, because the
  dead-consumer test rebuilds the broker in a subprocess from it.
* `broker_class`: default is the `millpond.brokers` entry point named by the URL's scheme.
* `lease_seconds`: how long the broker waits before it treats a silent consumer as dead. Default:
  `lease_timeout`, `visibility_timeout` or `consumer_timeout` from `broker_options`. A broker that
  notices a dead consumer at once (AMQP) returns a small number, such as 1.0.
* `redelivery_within`: the upper bound for a dead consumer's message to come back (default
  `lease_seconds + redelivery_slack`).
* `result_backend`: default `broker.default_backend()`; the result tests skip when that is None.

Class attributes: `cross_process = False` skips the subprocess tests (in-process brokers);
`redelivery_slack` is the allowance on top of the lease (seconds). What the broker itself declares
cannot be done is skipped, and only that: `supports_delay = False` (no broker-held delays) and
`redelivers_lost_deliveries = False` (a killed consumer's messages are lost, as on transports that
delete a message when it is fetched).

Fixtures the kit gives: `broker` (connected, closed afterwards), `make_broker()` (another instance
on the same URL and options, closed afterwards), `queue` and `make_queue()` (unique names, declared,
the queue and its dead-letter queue purged afterwards), `consumers` (opens consumers and closes
whichever the test left open).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from importlib.metadata import entry_points
from typing import Any, ClassVar
from urllib.parse import urlsplit

import pytest

from millpond.contracts.backend import ResultBackend, ResultMeta
from millpond.contracts.broadcast import Exchange, Listen, Received, Subscription
from millpond.contracts.broker import Broker, Consumer, Delivery, Outbound, dead_letter_queue
from millpond.contracts.waking import Waker
from millpond.states import READY_STATES, TaskState
from millpond.wire.protocol import DEATH_REASON, SENT_AT, Message, decode_task, encode_task

__all__ = ["BrokerContract", "ConsumerTracker", "fetch_until", "sample_message"]

#: the options keys the default `lease_seconds` fixture understands, first match wins
LEASE_OPTION_KEYS = ("lease_timeout", "visibility_timeout", "consumer_timeout")


# -- helpers (public: plugin tests may use them for their own broker-specific tests) ------------


def sample_message(task_id: str | None = None, **headers: Any) -> Message:
    """A message whose every part is easy to get wrong in transit.

    Binary body bytes (all 256 values), a non-JSON content type and encoding, headers with
    nesting, unicode, None, booleans, a 2**53 integer and a float, and the usual properties.
    """
    task_id = task_id or str(uuid.uuid4())
    base: dict[str, Any] = {
        "id": task_id,
        "task": "kit.round_trip",
        "lang": "py",
        "nested": {"list": [1, 2.5, "ü", None, True, False], "empty": {}},
        "unicode": "ünïcødé ✓ 水",
        "big": 2**53,
        "negative": -7,
        "ratio": 0.1,
        "none": None,
    }
    base.update(headers)
    return Message(
        body=bytes(range(256)) * 4,
        headers=base,
        content_type="application/x-millpond-kit",
        content_encoding="binary",
        properties={
            "correlation_id": task_id,
            "reply_to": "kit-replies",
            "delivery_mode": 2,
            "priority": 0,
        },
    )


def fetch_until(
    consumer: Consumer,
    count: int,
    within: float,
    *,
    max_count: int | None = None,
    poll: float = 0.25,
) -> list[Delivery]:
    """Fetch repeatedly until `count` deliveries arrived or `within` seconds passed.

    Returns what arrived (possibly fewer than `count`: callers assert with their own message).
    """
    deadline = time.monotonic() + within
    got: list[Delivery] = []
    while len(got) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        want = max_count if max_count is not None else count - len(got)
        got.extend(consumer.fetch(max(1, want), min(poll, remaining)))
    return got


def _ids(deliveries: Sequence[Delivery]) -> list[str]:
    return [d.message.task_id or "" for d in deliveries]


class ConsumerTracker:
    """Opens consumers for a test and closes, at teardown, every one the test did not close."""

    def __init__(self) -> None:
        self._open: list[Consumer] = []

    def open(self, broker: Broker, queues: Sequence[str], prefetch: int) -> Consumer:
        consumer = broker.consumer(list(queues), prefetch)
        self._open.append(consumer)
        return consumer

    def close(self, consumer: Consumer) -> None:
        if consumer in self._open:
            self._open.remove(consumer)
        consumer.close()

    def close_all(self) -> None:
        errors: list[BaseException] = []
        while self._open:
            try:
                self._open.pop().close()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


# -- the subprocess that takes a message and dies ------------------------------------------------

_DYING_CONSUMER = r"""
import importlib, json, os, signal, sys, time
cfg = json.loads(sys.argv[1])
for entry in reversed(cfg["path"]):
    if entry not in sys.path:
        sys.path.insert(0, entry)
target = importlib.import_module(cfg["module"])
for part in cfg["qualname"].split("."):
    target = getattr(target, part)
broker = target(cfg["url"], cfg["options"])
consumer = broker.consumer([cfg["queue"]], 1)
deadline = time.monotonic() + cfg["within"]
got = []
while not got and time.monotonic() < deadline:
    got = consumer.fetch(1, 0.25)
print(json.dumps([d.message.task_id for d in got]), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _run_dying_consumer(
    broker_class: type[Broker], url: str, options: dict[str, Any], queue: str
) -> list[str]:
    """Run a consumer in a subprocess that fetches one message and SIGKILLs itself unacked."""
    try:
        payload = json.dumps(
            {
                "path": sys.path,
                "module": broker_class.__module__,
                "qualname": broker_class.__qualname__,
                "url": url,
                "options": options,
                "queue": queue,
                "within": 10.0,
            }
        )
    except TypeError as exc:
        pytest.fail(
            f"broker_options must be JSON-serialisable for the subprocess test ({exc}); "
            "override broker_options with plain values"
        )
    proc = subprocess.Popen(
        [sys.executable, "-c", _DYING_CONSUMER, payload],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != -signal.SIGKILL:
        pytest.fail(
            f"the consumer subprocess exited with {proc.returncode} instead of dying by SIGKILL; "
            f"its stderr:\n{err}"
        )
    lines = [line for line in out.splitlines() if line.startswith("[")]
    if not lines:
        pytest.fail(f"the consumer subprocess printed nothing it fetched; stderr:\n{err}")
    ids: list[str] = json.loads(lines[-1])
    return ids


# -- the contract ---------------------------------------------------------------------------------


class BrokerContract:
    """The guarantees every millpond broker gives; subclass it with a `broker_url` fixture."""

    #: False for brokers whose state lives in one process (memory://): skips the subprocess tests
    cross_process: ClassVar[bool] = True
    #: seconds allowed on top of the lease for a dead consumer's message to come back
    redelivery_slack: ClassVar[float] = 5.0
    #: False where a broadcast's ttl ends only while it waits in a queue nobody consumes (AMQP
    #: pushes it to a listening consumer at once): skips the ttl test
    broadcast_ttl_while_listening: ClassVar[bool] = True

    # -- fixtures a plugin provides or overrides --------------------------------------------------

    @pytest.fixture
    def broker_url(self) -> str:
        pytest.fail(f"{type(self).__name__} must define a `broker_url` fixture returning the URL")

    @pytest.fixture
    def broker_options(self) -> dict[str, Any]:
        return {}

    @pytest.fixture
    def broker_class(self, broker_url: str) -> type[Broker]:
        scheme = urlsplit(broker_url).scheme
        found = [ep for ep in entry_points(group="millpond.brokers") if ep.name == scheme]
        if not found:
            pytest.fail(
                f"no `millpond.brokers` entry point is named {scheme!r}: install the plugin "
                "(pip install -e plugins/<name>) or override the `broker_class` fixture"
            )
        cls = found[0].load()
        if not (isinstance(cls, type) and issubclass(cls, Broker)):
            pytest.fail(f"entry point {found[0].value} is not a millpond.broker.Broker subclass")
        return cls

    @pytest.fixture
    def lease_seconds(self, broker_options: dict[str, Any]) -> float:
        for key in LEASE_OPTION_KEYS:
            if broker_options.get(key) is not None:
                return float(broker_options[key])
        pytest.fail(
            "the lease tests need short timings: set one of "
            f"{', '.join(LEASE_OPTION_KEYS)} in broker_options, or override `lease_seconds`"
        )

    @pytest.fixture
    def redelivery_within(self, lease_seconds: float) -> float:
        return lease_seconds + self.redelivery_slack

    # -- fixtures the kit gives -------------------------------------------------------------------

    @pytest.fixture
    def make_broker(
        self, broker_class: type[Broker], broker_url: str, broker_options: dict[str, Any]
    ) -> Iterator[Callable[[], Broker]]:
        made: list[Broker] = []

        def make() -> Broker:
            instance = broker_class(broker_url, dict(broker_options))
            made.append(instance)
            instance.connect()
            return instance

        yield make
        for instance in reversed(made):
            instance.close()

    @pytest.fixture
    def broker(self, make_broker: Callable[[], Broker]) -> Broker:
        return make_broker()

    @pytest.fixture
    def make_queue(self, broker: Broker) -> Iterator[Callable[[], str]]:
        names: list[str] = []

        def make() -> str:
            name = f"millpond-kit-{uuid.uuid4().hex[:12]}"
            names.append(name)
            broker.declare([name])
            return name

        yield make
        for name in names:
            broker.purge(name)
            broker.purge(dead_letter_queue(name))

    @pytest.fixture
    def queue(self, make_queue: Callable[[], str]) -> str:
        return make_queue()

    @pytest.fixture
    def consumers(self) -> Iterator[ConsumerTracker]:
        tracker = ConsumerTracker()
        yield tracker
        tracker.close_all()

    @pytest.fixture
    def result_backend(self, broker: Broker) -> ResultBackend:
        backend = broker.default_backend()
        if backend is None:
            pytest.skip(f"{type(broker).__name__} has no default result backend")
        return backend

    # -- publish, fetch, ack ----------------------------------------------------------------------

    def test_connected_reports_the_consumer_state(
        self, broker: Broker, queue: str, consumers: ConsumerTracker
    ) -> None:
        """The readiness probe reads `connected`: True while consuming, False once closed."""
        consumer = consumers.open(broker, [queue], 4)
        assert consumer.connected is True
        consumers.close(consumer)
        assert consumer.connected is False

    def test_round_trip_is_exact(
        self, broker: Broker, queue: str, consumers: ConsumerTracker
    ) -> None:
        sent = sample_message()
        broker.publish(queue, sent)
        consumer = consumers.open(broker, [queue], 1)
        got = fetch_until(consumer, 1, 5.0)
        assert len(got) == 1, "a published message was not fetched within 5 s"
        delivery = got[0]
        received = delivery.message
        assert delivery.queue == queue
        assert received.body == sent.body, "the body bytes changed in transit"
        assert received.content_type == sent.content_type
        assert received.content_encoding == sent.content_encoding
        for key, value in sent.headers.items():
            assert received.headers.get(key) == value, f"header {key!r} changed in transit"
        extra = set(received.headers) - set(sent.headers)
        assert all(k.startswith("x-") for k in extra), (
            f"the broker added headers {sorted(extra)}; its own bookkeeping must start with 'x-'"
        )
        for key, value in sent.properties.items():
            assert received.properties.get(key) == value, f"property {key!r} changed in transit"
        assert delivery.delivery_count == 1
        assert delivery.redelivered is False
        consumer.ack([delivery])

    def test_encoded_task_decodes(
        self, broker: Broker, queue: str, consumers: ConsumerTracker
    ) -> None:
        sent = encode_task(
            "kit.add", (2, 3), {"scale": 1.5, "label": "ü"}, headers={SENT_AT: time.time()}
        )
        broker.publish(queue, sent)
        consumer = consumers.open(broker, [queue], 1)
        got = fetch_until(consumer, 1, 5.0)
        assert len(got) == 1, "a published task was not fetched within 5 s"
        task = decode_task(got[0].message)
        assert task.task_id == sent.task_id
        assert task.task_name == "kit.add"
        assert task.args == (2, 3)
        assert task.kwargs == {"scale": 1.5, "label": "ü"}
        consumer.ack(got)

    def test_consumer_reads_several_queues(
        self, broker: Broker, make_queue: Callable[[], str], consumers: ConsumerTracker
    ) -> None:
        first, second = make_queue(), make_queue()
        broker.publish(first, sample_message("in-first"))
        broker.publish(second, sample_message("in-second"))
        consumer = consumers.open(broker, [first, second], 4)
        got = fetch_until(consumer, 2, 5.0)
        assert {(d.queue, d.message.task_id) for d in got} == {
            (first, "in-first"),
            (second, "in-second"),
        }
        consumer.ack(got)

    def test_publish_many_delivers_every_message_to_its_queue(
        self, broker: Broker, make_queue: Callable[[], str], consumers: ConsumerTracker
    ) -> None:
        first, second = make_queue(), make_queue()
        batch = [
            Outbound(first if i % 2 else second, sample_message(f"batch-{i}")) for i in range(40)
        ]
        if broker.supports_delay:
            batch.append(Outbound(first, sample_message("batch-later"), eta=time.time() + 0.5))
        broker.publish_many(batch)
        consumer = consumers.open(broker, [first, second], 64)
        got = fetch_until(consumer, len(batch), 10.0)
        assert sorted((d.queue, d.message.task_id) for d in got) == sorted(
            (item.queue, item.message.task_id) for item in batch
        ), "publish_many lost, duplicated or misrouted messages"
        assert {d.message.body for d in got} == {batch[0].message.body}
        consumer.ack(got)

    def test_fetch_never_returns_more_than_max_count(
        self, broker: Broker, queue: str, consumers: ConsumerTracker
    ) -> None:
        for _ in range(7):
            broker.publish(queue, sample_message())
        consumer = consumers.open(broker, [queue], 10)
        seen: list[Delivery] = []
        deadline = time.monotonic() + 5.0
        while len(seen) < 7 and time.monotonic() < deadline:
            batch = consumer.fetch(2, 0.25)
            assert len(batch) <= 2, f"fetch(max_count=2) returned {len(batch)} deliveries"
            seen.extend(batch)
        assert len(seen) == 7, f"only {len(seen)} of 7 messages were fetched within 5 s"
        consumer.ack(seen)

    def test_prefetch_limits_unacked_deliveries(
        self, broker: Broker, queue: str, consumers: ConsumerTracker
    ) -> None:
        for _ in range(10):
            broker.publish(queue, sample_message())
        consumer = consumers.open(broker, [queue], 4)
        held = fetch_until(consumer, 4, 5.0, max_count=10)
        assert len(held) == 4, f"prefetch 4: expected 4 deliveries, got {len(held)}"
        more = fetch_until(consumer, 1, 1.0, max_count=10)
        assert more == [], f"prefetch 4 but the consumer was handed {4 + len(more)} unacked"
        consumer.ack(held[:2])
        refill = fetch_until(consumer, 2, 5.0, max_count=10)
        assert len(refill) == 2, f"after acking 2 of 4, expected 2 more, got {len(refill)}"
        extra = fetch_until(consumer, 1, 0.5, max_count=10)
        assert extra == [], "the consumer went past its prefetch limit after acks"
        consumer.ack(held[2:] + refill)

    def test_resize_widens_and_narrows_the_prefetch_window(
        self, broker: Broker, queue: str, consumers: ConsumerTracker
    ) -> None:
        """A worker widens its window by the room its rate-limited tasks' waiting messages take
        (`Consumer.resize`); a consumer that cannot says so by returning False."""
        for _ in range(10):
            broker.publish(queue, sample_message())
        consumer = consumers.open(broker, [queue], 2)
        held = fetch_until(consumer, 2, 5.0, max_count=10)
        assert len(held) == 2
        if not consumer.resize(5):
            pytest.skip(f"{type(consumer).__name__} cannot resize its window at run time")
        more = fetch_until(consumer, 3, 5.0, max_count=10)
        assert len(more) == 3, f"window resized to 5: expected 3 more deliveries, got {len(more)}"
        assert fetch_until(consumer, 1, 0.5, max_count=10) == [], "past the resized window"
        assert consumer.resize(2)
        consumer.ack(held + more[:1])  # 2 held, the window is 2 again: nothing more
        assert fetch_until(consumer, 1, 0.5, max_count=10) == [], "past the narrowed window"
        consumer.ack(more[1:])
        again = fetch_until(consumer, 2, 5.0, max_count=10)
        assert len(again) == 2
        consumer.ack(again)

    # -- blocking and waking ----------------------------------------------------------------------

    def test_fetch_times_out_empty(
        self, broker: Broker, queue: str, consumers: ConsumerTracker
    ) -> None:
        consumer = consumers.open(broker, [queue], 1)
        start = time.monotonic()
        assert consumer.fetch(1, 0.3) == []
        elapsed = time.monotonic() - start
        assert elapsed < 1.3, f"fetch(timeout=0.3) on an empty queue took {elapsed:.2f} s"

    def test_fetch_returns_when_waker_fires(
        self, broker: Broker, queue: str, consumers: ConsumerTracker
    ) -> None:
        consumer = consumers.open(broker, [queue], 1)
        waker = Waker()
        timer = threading.Timer(0.2, waker.wake)
        try:
            start = time.monotonic()
            timer.start()
            got = consumer.fetch(1, 5.0, waker)
            elapsed = time.monotonic() - start
        finally:
            timer.cancel()
            waker.close()
        assert got == []
        assert elapsed < 1.2, f"fetch took {elapsed:.2f} s to notice its waker (woken at 0.2 s)"

    def test_fetch_returns_at_once_when_waker_is_already_set(
        self, broker: Broker, queue: str, consumers: ConsumerTracker
    ) -> None:
        consumer = consumers.open(broker, [queue], 1)
        waker = Waker()
        try:
            waker.wake()
            start = time.monotonic()
            consumer.fetch(1, 5.0, waker)
            elapsed = time.monotonic() - start
        finally:
            waker.close()
        assert elapsed < 0.5, f"fetch with a set waker blocked for {elapsed:.2f} s"

    def test_fetch_wakes_on_publish_from_another_thread(
        self, broker: Broker, queue: str, consumers: ConsumerTracker
    ) -> None:
        consumer = consumers.open(broker, [queue], 1)
        published_at: list[float] = []

        def publish() -> None:
            published_at.append(time.monotonic())
            broker.publish(queue, sample_message("from-thread"))

        timer = threading.Timer(0.2, publish)
        waker = Waker()
        try:
            timer.start()
            got = consumer.fetch(1, 5.0, waker)
            returned = time.monotonic()
        finally:
            timer.cancel()
            timer.join(5.0)
            waker.close()
        assert _ids(got) == ["from-thread"], "fetch returned without the published message"
        latency = returned - published_at[0]
        # the bound tells a woken fetch from one that sat out its 5 s timeout (or polled on a long
        # interval) with room for a loaded machine; how fast a wake-up is belongs in benchmarks/
        assert latency < 2.0, f"fetch noticed the publish only after {latency:.3f} s (timeout 5 s)"
        consumer.ack(got)

    # -- ack, reject, dead letters ----------------------------------------------------------------

    def test_ack_removes_for_good(
        self, broker: Broker, queue: str, consumers: ConsumerTracker
    ) -> None:
        broker.publish(queue, sample_message("acked"))
        first = consumers.open(broker, [queue], 1)
        got = fetch_until(first, 1, 5.0)
        assert _ids(got) == ["acked"]
        first.ack(got)
        consumers.close(first)
        second = consumers.open(broker, [queue], 1)
        assert fetch_until(second, 1, 1.0) == [], "an acked message was delivered again"
        assert _poll(lambda: broker.queue_length(queue) == 0, 5.0), broker.queue_length(queue)

    def test_reject_with_requeue_redelivers_and_counts(
        self, broker: Broker, queue: str, consumers: ConsumerTracker
    ) -> None:
        broker.publish(queue, sample_message("again"))
        consumer = consumers.open(broker, [queue], 1)
        got = fetch_until(consumer, 1, 5.0)
        assert _ids(got) == ["again"]
        assert (got[0].delivery_count, got[0].redelivered) == (1, False)
        consumer.reject(got[0], requeue=True)
        back = fetch_until(consumer, 1, 5.0)
        assert _ids(back) == ["again"], "a requeued message did not come back within 5 s"
        assert back[0].delivery_count == 2
        assert back[0].redelivered is True
        assert back[0].message.body == got[0].message.body
        consumer.ack(back)

    def test_reject_without_requeue_dead_letters_with_reason(
        self, broker: Broker, queue: str, consumers: ConsumerTracker
    ) -> None:
        sent = sample_message("doomed")
        broker.publish(queue, sent)
        consumer = consumers.open(broker, [queue], 1)
        got = fetch_until(consumer, 1, 5.0)
        assert _ids(got) == ["doomed"]
        reason = "UnknownTask: no task named 'kit.round_trip' (ü)"
        consumer.reject(got[0], requeue=False, reason=reason)
        assert fetch_until(consumer, 1, 0.5) == [], "a dead-lettered message stayed in its queue"

        dead = _poll(lambda: broker.dead_letters(queue), 5.0)
        assert len(dead) == 1, f"expected 1 dead letter in {dead_letter_queue(queue)}"
        assert dead[0].headers.get(DEATH_REASON) == reason
        assert dead[0].body == sent.body
        assert dead[0].task_id == "doomed"

        assert broker.replay_dead_letters(queue) == 1
        assert _poll(lambda: not broker.dead_letters(queue), 5.0), "replay left dead letters"
        back = fetch_until(consumer, 1, 5.0)
        assert _ids(back) == ["doomed"], "a replayed dead letter did not reach its queue"
        assert back[0].message.body == sent.body
        consumer.ack(back)

    def test_close_returns_unacked_deliveries(
        self, broker: Broker, queue: str, consumers: ConsumerTracker
    ) -> None:
        for name in ("u1", "u2", "u3"):
            broker.publish(queue, sample_message(name))
        first = consumers.open(broker, [queue], 3)
        held = fetch_until(first, 3, 5.0, max_count=3)
        assert sorted(_ids(held)) == ["u1", "u2", "u3"]
        consumers.close(first)
        second = consumers.open(broker, [queue], 3)
        back = fetch_until(second, 3, 5.0, max_count=3)
        assert sorted(_ids(back)) == ["u1", "u2", "u3"], (
            "close() did not give its unacked deliveries back to the queue"
        )
        assert all(d.redelivered and d.delivery_count >= 2 for d in back), [
            (d.redelivered, d.delivery_count) for d in back
        ]
        second.ack(back)

    def test_release_gives_unstarted_deliveries_back_at_once(
        self,
        broker: Broker,
        make_broker: Callable[[], Broker],
        queue: str,
        consumers: ConsumerTracker,
    ) -> None:
        # a warm shutdown: one delivery still running, three buffered ones given back while the
        # first consumer stays open and alive (so no lease lapses and no close returns them)
        for name in ("g1", "g2", "g3", "g4"):
            broker.publish(queue, sample_message(name))
        first = consumers.open(broker, [queue], 4)
        held = fetch_until(first, 4, 5.0, max_count=4)
        assert sorted(_ids(held)) == ["g1", "g2", "g3", "g4"]
        running, buffered = held[0], held[1:]
        first.release(buffered)
        second = consumers.open(make_broker(), [queue], 4)
        back = fetch_until(second, 3, 5.0, max_count=4)
        assert sorted(_ids(back)) == sorted(_ids(buffered)), (
            "release() did not give the unstarted deliveries to another consumer within 5 s "
            "(they waited for a lease, a visibility timeout or the close)"
        )
        first.ack([running])
        consumers.close(first)
        assert fetch_until(second, 1, 1.0) == [], (
            "the running delivery, acknowledged after the release, was delivered again"
        )
        second.ack(back)

    # -- delays and administration ----------------------------------------------------------------

    def test_delayed_message_is_held_by_the_broker(
        self,
        broker: Broker,
        make_broker: Callable[[], Broker],
        queue: str,
        consumers: ConsumerTracker,
    ) -> None:
        if not broker.supports_delay:
            pytest.skip(f"{type(broker).__name__} declares supports_delay = False")
        eta = time.time() + 1.0
        broker.publish(queue, sample_message("later"), eta=eta)
        other = make_broker()  # another instance: the delay must not live in the producer
        consumer = consumers.open(other, [queue], 1)
        early = consumer.fetch(1, max(0.0, eta - time.time() - 0.3))
        assert early == [], "a message with eta = now + 1 s was fetchable at once"
        got = fetch_until(consumer, 1, eta - time.time() + 5.0)
        arrived = time.time()
        assert _ids(got) == ["later"], "the delayed message did not arrive within 5 s of its eta"
        assert arrived >= eta - 0.05, f"delivered {eta - arrived:.3f} s before its eta"
        consumer.ack(got)

    def test_purge_returns_the_count(self, broker: Broker, queue: str) -> None:
        for _ in range(5):
            broker.publish(queue, sample_message())
        assert broker.purge(queue) == 5
        assert broker.queue_length(queue) == 0

    def test_queue_length_counts_ready_messages(
        self, broker: Broker, queue: str, consumers: ConsumerTracker
    ) -> None:
        for _ in range(3):
            broker.publish(queue, sample_message())
        assert _poll(lambda: broker.queue_length(queue) == 3, 5.0), broker.queue_length(queue)
        consumer = consumers.open(broker, [queue], 1)
        got = fetch_until(consumer, 1, 5.0)
        assert len(got) == 1
        assert _poll(lambda: broker.queue_length(queue) == 2, 5.0), (
            f"after fetching 1 of 3, queue_length is {broker.queue_length(queue)}, expected 2"
        )
        consumer.ack(got)

    def test_concurrent_publishers_lose_nothing(
        self, broker: Broker, queue: str, consumers: ConsumerTracker
    ) -> None:
        threads, each = 8, 50
        start = threading.Barrier(threads)
        errors: list[BaseException] = []

        def produce(n: int) -> None:
            try:
                start.wait(10)
                for i in range(each):
                    broker.publish(queue, encode_task("kit.n", (n, i), task_id=f"t{n}-{i}"))
            except BaseException as exc:
                errors.append(exc)

        workers = [threading.Thread(target=produce, args=(n,)) for n in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(60)
        assert not errors, f"publishing from {threads} threads raised: {errors[0]!r}"
        consumer = consumers.open(broker, [queue], 64)
        seen: list[str] = []
        deadline = time.monotonic() + 30.0
        while len(seen) < threads * each and time.monotonic() < deadline:
            batch = consumer.fetch(64, 0.25)
            seen.extend(_ids(batch))
            if batch:
                consumer.ack(batch)
        expected = {f"t{n}-{i}" for n in range(threads) for i in range(each)}
        assert len(seen) == len(set(seen)), "some messages were delivered twice"
        missing = expected - set(seen)
        assert not missing, f"{len(missing)} of {len(expected)} messages were lost"

    # -- results ----------------------------------------------------------------------------------

    def test_result_store_peek_get_forget(self, result_backend: ResultBackend) -> None:
        task_id = str(uuid.uuid4())
        meta = ResultMeta(
            task_id=task_id,
            status=TaskState.SUCCESS,
            result={"answer": [4, 2], "text": "ü"},
            date_done="2024-01-01T00:00:00+00:00",
            name="kit.add",
            retries=1,
        )
        try:
            result_backend.store(meta)
            assert result_backend.peek(task_id) == meta
            assert result_backend.get(task_id, 1.0) == meta
            failed = ResultMeta(
                task_id=task_id,
                status=TaskState.FAILURE,
                result={"exc_type": "ValueError", "exc_message": ["bad"], "exc_module": "builtins"},
                traceback="Traceback (most recent call last): ...",
            )
            result_backend.store(failed)
            assert result_backend.peek(task_id) == failed, "store() must replace the earlier state"
            result_backend.forget(task_id)
            assert result_backend.peek(task_id) is None
        finally:
            result_backend.forget(task_id)

    def test_result_that_is_not_json_is_refused_as_a_type_error(
        self, result_backend: ResultBackend
    ) -> None:
        """A result the backend cannot encode raises TypeError or ValueError and stores nothing:
        that is how the worker knows to store a FAILURE (TypeError) in its place, so the caller
        hears why instead of waiting for a result that never comes."""
        task_id = str(uuid.uuid4())
        try:
            with pytest.raises((TypeError, ValueError)):
                result_backend.store(
                    ResultMeta(task_id=task_id, status=TaskState.SUCCESS, result=object())
                )
            assert result_backend.peek(task_id) is None
        finally:
            result_backend.forget(task_id)

    def test_result_get_times_out(self, result_backend: ResultBackend) -> None:
        unknown, started = str(uuid.uuid4()), str(uuid.uuid4())
        try:
            start = time.monotonic()
            assert result_backend.get(unknown, 0.3) is None
            elapsed = time.monotonic() - start
            assert elapsed < 1.3, f"get(timeout=0.3) of an unknown id took {elapsed:.2f} s"

            result_backend.store(ResultMeta(task_id=started, status=TaskState.STARTED))
            start = time.monotonic()
            meta = result_backend.get(started, 0.3)
            elapsed = time.monotonic() - start
            assert meta is None or meta.status not in READY_STATES
            assert elapsed < 1.3, f"get(timeout=0.3) of a running task took {elapsed:.2f} s"
        finally:
            result_backend.forget(started)

    def test_result_get_wakes_when_another_thread_stores(
        self, result_backend: ResultBackend
    ) -> None:
        task_id = str(uuid.uuid4())
        stored_at: list[float] = []

        def store() -> None:
            stored_at.append(time.monotonic())
            result_backend.store(ResultMeta(task_id=task_id, status=TaskState.SUCCESS, result=42))

        result_backend.store(ResultMeta(task_id=task_id, status=TaskState.STARTED))
        timer = threading.Timer(0.2, store)
        try:
            timer.start()
            meta = result_backend.get(task_id, 10.0)
            returned = time.monotonic()
        finally:
            timer.cancel()
            timer.join(5.0)
            result_backend.forget(task_id)
        assert meta is not None
        assert (meta.status, meta.result) == (TaskState.SUCCESS, 42)
        latency = returned - stored_at[0]
        assert latency < 0.5, f"get() noticed the stored result only after {latency:.3f} s"

    # -- leases: dead consumers give their messages back, live ones keep them -------------------

    def test_message_of_a_killed_consumer_process_is_redelivered(  # noqa: PLR0917
        self,
        broker: Broker,
        broker_class: type[Broker],
        broker_url: str,
        broker_options: dict[str, Any],
        queue: str,
        consumers: ConsumerTracker,
        redelivery_within: float,
    ) -> None:
        if not self.cross_process:
            pytest.skip(f"{type(broker).__name__} keeps its state in one process")
        if not broker.redelivers_lost_deliveries:
            pytest.skip(f"{type(broker).__name__} declares redelivers_lost_deliveries = False")
        broker.publish(queue, sample_message("orphan"))
        taken = _run_dying_consumer(broker_class, broker_url, broker_options, queue)
        assert taken == ["orphan"], f"the subprocess fetched {taken} instead of the message"
        died = time.monotonic()
        consumer = consumers.open(broker, [queue], 1)
        got = fetch_until(consumer, 1, redelivery_within)
        waited = time.monotonic() - died
        assert _ids(got) == ["orphan"], (
            f"the message of a SIGKILLed consumer did not come back within {redelivery_within} s"
        )
        assert got[0].delivery_count >= 2, got[0].delivery_count
        assert got[0].redelivered is True
        assert waited <= redelivery_within
        consumer.ack(got)

    def test_message_held_by_a_live_consumer_is_not_redelivered(
        self,
        broker: Broker,
        make_broker: Callable[[], Broker],
        queue: str,
        consumers: ConsumerTracker,
        lease_seconds: float,
    ) -> None:
        broker.publish(queue, sample_message("long-task"))
        holder = consumers.open(broker, [queue], 1)
        held = fetch_until(holder, 1, 5.0)
        assert _ids(held) == ["long-task"]
        # The holder's loop thread now "runs the task" and never calls fetch; only the broker's
        # own liveness mechanism (heartbeat thread, connection heartbeats) keeps the lease.
        rival = consumers.open(make_broker(), [queue], 1)
        hold_for = lease_seconds + max(1.0, lease_seconds)
        stolen = fetch_until(rival, 1, hold_for)
        assert stolen == [], (
            f"a message held by a live consumer was delivered again after "
            f"{hold_for:.1f} s (lease {lease_seconds} s): a long task would run twice"
        )
        holder.ack(held)
        assert fetch_until(rival, 1, 0.5) == []

    # -- exchanges (remote control, events) -------------------------------------------------------

    @pytest.fixture
    def listeners(self, broker: Broker) -> Iterator[Callable[..., Subscription]]:
        """Opens subscriptions for a test and closes them afterwards; skips without broadcast."""
        if not broker.supports_broadcast:
            pytest.skip(f"{type(broker).__name__} declares supports_broadcast = False")
        opened: list[Subscription] = []

        def listen(exchange: Exchange, routing_key: str = "", **options: Any) -> Subscription:
            queue = f"millpond-kit-listen-{uuid.uuid4().hex[:12]}"
            sub = broker.listen(Listen(queue, exchange, routing_key, **options))
            opened.append(sub)
            return sub

        yield listen
        for sub in opened:
            sub.close()

    @staticmethod
    def _exchange(kind: str, durable: bool = False) -> Exchange:
        # auto-delete: on RabbitMQ the kit's exchanges go with their last binding
        name = f"millpond-kit-x-{uuid.uuid4().hex[:10]}"
        return Exchange(name, kind, durable, auto_delete=True)  # type: ignore[arg-type]

    @staticmethod
    def _received(sub: Subscription, count: int, within: float = 5.0) -> list[Received]:
        got: list[Received] = []
        deadline = time.monotonic() + within
        while len(got) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"received {len(got)} of {count} broadcasts within {within}s")
            got += sub.receive(min(left, 0.5))
        return got

    def test_fanout_reaches_every_listener_exactly(
        self, broker: Broker, listeners: Callable[..., Subscription]
    ) -> None:
        exchange = self._exchange("fanout")
        first, second = listeners(exchange), listeners(exchange)
        sent = Message(
            b'{"method": "ping"}',
            {"clock": 3, "expires": 12.5, "ticket": "t-1"},
            properties={"delivery_mode": 1, "correlation_id": "c-1"},
        )
        broker.broadcast(exchange, sent)
        for sub in (first, second):
            (got,) = self._received(sub, 1)
            assert got.exchange == exchange.name
            assert got.message.body == sent.body
            assert got.message.headers == sent.headers
            assert got.message.content_type == sent.content_type
            assert got.message.properties.get("correlation_id") == "c-1"

    def test_direct_reaches_only_the_matching_routing_key(
        self, broker: Broker, listeners: Callable[..., Subscription]
    ) -> None:
        exchange = self._exchange("direct")
        mine, other = listeners(exchange, "oid-a"), listeners(exchange, "oid-b")
        broker.broadcast(exchange, Message(b"{}", {"ticket": "1"}), "oid-a")
        (got,) = self._received(mine, 1)
        assert got.message.headers == {"ticket": "1"}
        assert other.receive(0.3) == []

    def test_topic_binding_matches_by_pattern(
        self, broker: Broker, listeners: Callable[..., Subscription]
    ) -> None:
        exchange = self._exchange("topic", durable=True)
        workers = listeners(exchange, "worker.#")
        broker.broadcast(exchange, Message(b"{}", {"n": 1}), "task.succeeded")
        broker.broadcast(exchange, Message(b"{}", {"n": 2}), "worker.heartbeat")
        (got,) = self._received(workers, 1)
        assert got.message.headers == {"n": 2}
        assert got.routing_key == "worker.heartbeat"
        assert workers.receive(0.3) == []

    def test_broadcast_never_undercounts_its_listeners(
        self, broker: Broker, listeners: Callable[..., Subscription]
    ) -> None:
        """A broker that counts (not None) counts at least every listener it reached: callers
        stop waiting for replies at that count, and skip the wait at 0 (mingle)."""
        fanout = self._exchange("fanout")
        nobody = broker.broadcast(fanout, Message(b"{}", {}))
        assert nobody in (None, 0)
        first, second = listeners(fanout), listeners(fanout)
        two = broker.broadcast(fanout, Message(b"{}", {"n": 2}))
        for sub in (first, second):
            self._received(sub, 1)
        if two is None:
            pytest.skip(f"{type(broker).__name__} does not count the listeners of a broadcast")
        assert two >= 2
        direct = self._exchange("direct")
        listeners(direct, "oid-a")
        one = broker.broadcast(direct, Message(b"{}", {}), "oid-a")
        assert one is None or one >= 1

    def test_broadcast_nobody_hears_is_not_an_error(self, broker: Broker) -> None:
        if not broker.supports_broadcast:
            pytest.skip(f"{type(broker).__name__} declares supports_broadcast = False")
        broker.broadcast(self._exchange("fanout"), Message(b"{}", {}))
        broker.broadcast(self._exchange("direct"), Message(b"{}", {}), "gone")

    def test_many_broadcasts_arrive_in_order(
        self, broker: Broker, listeners: Callable[..., Subscription]
    ) -> None:
        exchange = self._exchange("fanout")
        sub = listeners(exchange)
        for n in range(150):
            broker.broadcast(exchange, Message(b"{}", {"n": n}))
        got = self._received(sub, 150, within=10.0)
        assert [r.message.headers["n"] for r in got] == list(range(150))

    def test_direct_ttl_drops_an_unread_message(
        self, broker: Broker, listeners: Callable[..., Subscription]
    ) -> None:
        """A reply nobody reads in time is gone (bounded replies), not kept forever."""
        if not self.broadcast_ttl_while_listening:
            pytest.skip("the broker hands a broadcast to a listening consumer at once")
        exchange = self._exchange("direct")
        sub = listeners(exchange, "late-reader")
        broker.broadcast(exchange, Message(b"{}", {"n": 1}), "late-reader", ttl=0.2)
        time.sleep(1.2)  # the thing under test is expiry: let the ttl pass (and Redis's expiry run)
        assert sub.receive(0.2) == []

    def test_listener_close_is_idempotent(self, listeners: Callable[..., Subscription]) -> None:
        sub = listeners(self._exchange("fanout"))
        sub.close()
        sub.close()
        assert sub.receive(0.0) == []


def _poll(check: Callable[[], Any], within: float, interval: float = 0.02) -> Any:
    """Call `check` until it returns something truthy or `within` seconds pass; return the last."""
    deadline = time.monotonic() + within
    value = check()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = check()
    return value
