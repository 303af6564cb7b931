"""memory://: an in-process broker and result backend, for tests, the docs and notebooks.

Every broker (and backend) built with the same URL in one process shares one state, so an app that
publishes and a worker that consumes in the same process see the same queues without passing
objects around. Nothing crosses a process boundary and nothing survives the process.

Messages and results go through a JSON round trip when they enter, like on a real broker: a header
or result that a real transport could not carry fails here too, in the test, instead of in
production.
"""

from __future__ import annotations

import heapq
import itertools
import json
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from millpond.contracts.backend import CHORD_CLAIM_TTL, ChordPart, ResultBackend, ResultMeta
from millpond.contracts.broadcast import Exchange, Listen
from millpond.contracts.broker import Broker, Claims, Consumer, Delivery, Holder, dead_letter_queue
from millpond.contracts.waking import Waker
from millpond.exceptions import ConfigurationError, PublishError
from millpond.exceptions import TimeoutError as MillpondTimeoutError
from millpond.states import READY_STATES, TaskState
from millpond.wire.protocol import DEATH_REASON, Message
from millpond_broker_embedded.exchanges import MemoryExchanges, MemorySubscription, check_queue

_registry_lock = threading.Lock()
T = TypeVar("T")
#: how many stored failures a backend remembers for `MemoryBroker.join(fail_fast=True)`
_FAILURE_MEMORY = 1000


def state_name(url: str, scheme: str = "memory") -> str:
    """The shared-state name in a `memory://NAME` URL (empty for plain `memory://`)."""
    prefix = f"{scheme}://"
    if not url.startswith(prefix):
        raise ConfigurationError(
            f"{url!r} is not a {scheme}:// URL; use {scheme}:// or {scheme}://NAME"
        )
    name = url[len(prefix) :]
    if "?" in name or "#" in name:
        raise ConfigurationError(
            f"{url!r}: the memory broker takes no options; use {scheme}:// or {scheme}://NAME"
        )
    return name.strip("/")


def _clone_message(message: Message) -> Message:
    """A copy that shares nothing with the caller's object, checked to be JSON-carriable."""
    try:
        headers = json.loads(json.dumps(message.headers))
        properties = json.loads(json.dumps(message.properties))
    except (TypeError, ValueError) as exc:
        raise PublishError(
            f"message {message.task_id or '(no id)'} has headers or properties a broker cannot "
            f"carry ({exc}); use JSON-compatible values (str, int, float, bool, None, list, dict)"
        ) from exc
    return Message(
        body=bytes(message.body),
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        properties=properties,
    )


@dataclass(slots=True)
class _Entry:
    message: Message
    deliveries: int = 0


class _Queues:
    """One named broker's state. Every field is guarded by `cond`'s lock."""

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.ready: dict[str, deque[_Entry]] = {}
        self.delayed: list[tuple[float, int, str, _Entry]] = []  # a heap ordered by eta
        self.unacked: dict[int, tuple[str, _Entry]] = {}
        self.listeners: dict[str, set[Waker]] = {}
        self.seq = itertools.count(1)

    def queue(self, name: str) -> deque[_Entry]:
        found = self.ready.get(name)
        if found is None:
            found = self.ready[name] = deque()
        return found

    def promote(self, now: float) -> None:
        """Move delayed messages whose time has come to their queues."""
        delayed = self.delayed
        while delayed and delayed[0][0] <= now:
            _, _, queue, entry = heapq.heappop(delayed)
            self.queue(queue).append(entry)
            self.wake(queue)

    def next_eta(self, queues: Iterable[str]) -> float | None:
        wanted = set(queues)
        etas = [eta for eta, _, queue, _ in self.delayed if queue in wanted]
        return min(etas) if etas else None

    def wake(self, queue: str) -> None:
        for waker in self.listeners.get(queue, ()):
            waker.wake()

    def changed(self) -> None:
        self.cond.notify_all()


@dataclass
class _Chord:
    size: int
    #: (task id, header index) -> (index, task id, state, result)
    parts: dict[tuple[str, int | None], tuple[float, str, str, Any]]
    claimed_until: float = 0.0
    done: bool = False


class _Results:
    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.metas: dict[str, ResultMeta] = {}
        self.failure_seq = 0
        self.failures: deque[tuple[int, ResultMeta]] = deque(maxlen=_FAILURE_MEMORY)
        self.chords: dict[str, _Chord] = {}
        self.groups: dict[str, Any] = {}


_queues: dict[str, _Queues] = {}
_exchanges: dict[str, MemoryExchanges] = {}
_results: dict[str, _Results] = {}


def _named(registry: dict[str, T], name: str, make: Callable[[], T]) -> T:
    """The state of memory:// URL `name` in `registry`, made on first use, shared in-process."""
    with _registry_lock:
        found = registry.get(name)
        if found is None:
            found = registry[name] = make()
        return found


class MemoryBroker(Broker):
    """In-process queues shared by every `MemoryBroker` with the same URL in this process."""

    system: ClassVar[str] = "memory"
    #: exchanges within this process (remote control and events of in-process workers)
    supports_broadcast: ClassVar[bool] = True

    def __init__(self, url: str = "memory://", options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, options)
        if self.options:
            raise ConfigurationError(
                f"the memory broker takes no options, got {sorted(self.options)}; remove them"
            )
        self.name = state_name(url)
        self._state = _named(_queues, self.name, _Queues)
        self._exchanges = _named(_exchanges, self.name, MemoryExchanges)
        self._failure_mark = _named(_results, self.name, _Results).failure_seq

    def close(self) -> None:
        """Nothing to release: the queues belong to the process, not to this object."""

    def declare(self, queues: Iterable[str]) -> None:
        with self._state.cond:
            for queue in queues:
                self._state.queue(check_queue(queue))
                self._state.queue(dead_letter_queue(queue))

    def publish(self, queue: str, message: Message, *, eta: float | None = None) -> None:
        check_queue(queue)
        entry = _Entry(_clone_message(message))
        state = self._state
        with state.cond:
            if eta is not None and eta > time.time():
                heapq.heappush(state.delayed, (eta, next(state.seq), queue, entry))
            else:
                state.queue(queue).append(entry)
            state.wake(queue)  # delayed too: a waiting consumer recomputes how long to sleep
            state.changed()

    def broadcast(
        self,
        exchange: Exchange,
        message: Message,
        routing_key: str = "",
        *,
        ttl: float | None = None,
    ) -> int:
        return self._exchanges.broadcast(exchange, message, routing_key, ttl)

    def listen(self, spec: Listen) -> MemorySubscription:
        return self._exchanges.listen(spec)

    def consumer(self, queues: Sequence[str], prefetch: int) -> MemoryConsumer:
        return MemoryConsumer(self._state, [check_queue(q) for q in queues], prefetch)

    def purge(self, queue: str) -> int:
        """Drop the queue's ready and delayed messages (not the ones consumers hold)."""
        state = self._state
        with state.cond:
            ready = state.ready.get(queue)
            count = len(ready) if ready else 0
            if ready:
                ready.clear()
            kept = [item for item in state.delayed if item[2] != queue]
            count += len(state.delayed) - len(kept)
            heapq.heapify(kept)
            state.delayed = kept
            state.changed()
        return count

    def queue_length(self, queue: str) -> int:
        with self._state.cond:
            self._state.promote(time.time())
            ready = self._state.ready.get(queue)
            return len(ready) if ready else 0

    def dead_letters(self, queue: str, limit: int = 100) -> list[Message]:
        with self._state.cond:
            dead = self._state.ready.get(dead_letter_queue(queue)) or deque()
            return [_clone_message(e.message) for e in itertools.islice(dead, limit)]

    def replay_dead_letters(self, queue: str, limit: int | None = None) -> int:
        """Move dead letters back, oldest first, as fresh messages (count reset, reason removed)."""
        state = self._state
        with state.cond:
            dead = state.ready.get(dead_letter_queue(queue))
            target = state.queue(queue)
            moved = 0
            while dead and (limit is None or moved < limit):
                entry = dead.popleft()
                entry.message.headers.pop(DEATH_REASON, None)
                entry.deliveries = 0
                target.append(entry)
                moved += 1
            if moved:
                state.wake(queue)
                state.changed()
        return moved

    def claims(self) -> MemoryClaims:
        """Leases and state shared by every memory broker with this URL in this process."""
        return _named(_claims, self.name, MemoryClaims)

    def default_backend(self) -> MemoryResultBackend:
        return MemoryResultBackend(f"memory://{self.name}")

    def join(self, queue: str, timeout: float = 10.0, fail_fast: bool = True) -> None:
        """Wait until `queue` has no ready, delayed or unacknowledged message.

        With `fail_fast`, a task FAILURE stored in this broker's backend since the broker was
        created (or since the last `join`) is raised here, rebuilt from its type and message, so
        a test fails with the task's own error instead of a timeout.
        """
        results = _named(_results, self.name, _Results)
        state = self._state
        deadline = time.monotonic() + timeout
        while True:
            if fail_fast:
                self._raise_new_failure(results)
            with state.cond:
                state.promote(time.time())
                ready = len(state.ready.get(queue) or ())
                delayed = sum(1 for item in state.delayed if item[2] == queue)
                unacked = sum(1 for q, _ in state.unacked.values() if q == queue)
                if not (ready or delayed or unacked):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise MillpondTimeoutError(
                        f"queue {queue!r} on memory://{self.name} did not drain within "
                        f"{timeout} s: {ready} ready, {delayed} delayed and {unacked} unacked "
                        "messages are left; is a worker consuming this queue on the same URL?"
                    )
                # Failures are stored on another lock: look again at least every 50 ms.
                state.cond.wait(min(remaining, 0.05))
        if fail_fast:
            self._raise_new_failure(results)
        self._failure_mark = results.failure_seq

    def _raise_new_failure(self, results: _Results) -> None:
        with results.cond:
            fresh = [meta for seq, meta in results.failures if seq > self._failure_mark]
            self._failure_mark = results.failure_seq
        if not fresh:
            return
        from millpond.produce.result import rebuild_exception

        meta = fresh[0]
        exc = rebuild_exception(meta.result)
        exc.add_note(f"raised by task {meta.name or '?'}[{meta.task_id}] (MemoryBroker.join)")
        if meta.traceback:
            exc.add_note(meta.traceback)
        raise exc


class MemoryConsumer(Consumer):
    """Takes messages from shared in-process queues; a socket pair wakes it when one arrives."""

    def __init__(self, state: _Queues, queues: list[str], prefetch: int) -> None:
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {prefetch}")
        if not queues:
            raise ValueError("a consumer needs at least one queue")
        self._state = state
        self._queues = queues
        self._prefetch = prefetch
        self._held: dict[int, tuple[str, _Entry]] = {}
        self._notify = Waker()
        self._turn = 0
        self._closed = False
        with state.cond:
            for queue in queues:
                state.listeners.setdefault(queue, set()).add(self._notify)

    def resize(self, prefetch: int) -> bool:
        """The prefetch limit is counted here: a new one applies from the next fetch."""
        if prefetch < 1:
            return False
        self._prefetch = prefetch
        return True

    def fetch(self, max_count: int, timeout: float, waker: Waker | None = None) -> list[Delivery]:
        if self._closed:
            raise RuntimeError(
                "fetch() on a closed consumer; open a new one with broker.consumer()"
            )
        deadline = time.monotonic() + timeout
        state = self._state
        while True:
            with state.cond:
                self._notify.clear()
                state.promote(time.time())
                out = self._take(min(max_count, self._prefetch - len(self._held)))
                next_eta = state.next_eta(self._queues) if not out else None
            if out:
                return out
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (waker is not None and waker.is_set):
                return []
            if next_eta is not None:
                remaining = min(remaining, max(0.0, next_eta - time.time()))
            fds: list[Any] = [self._notify] if waker is None else [self._notify, waker]
            try:
                readable, _, _ = select.select(fds, [], [], remaining)
            except (OSError, ValueError):
                return []
            if waker is not None and waker in readable:
                return []

    def _take(self, room: int) -> list[Delivery]:
        out: list[Delivery] = []
        if room <= 0:
            return out
        state = self._state
        count = len(self._queues)
        for i in range(count):
            queue = self._queues[(self._turn + i) % count]
            ready = state.ready.get(queue)
            while ready and len(out) < room:
                entry = ready.popleft()
                entry.deliveries += 1
                tag = next(state.seq)
                state.unacked[tag] = self._held[tag] = (queue, entry)
                out.append(
                    Delivery(
                        message=_clone_message(entry.message),
                        queue=queue,
                        tag=tag,
                        redelivered=entry.deliveries > 1,
                        delivery_count=entry.deliveries,
                    )
                )
        self._turn = (self._turn + 1) % count
        if out:
            state.changed()
        return out

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        state = self._state
        with state.cond:
            for delivery in deliveries:
                if self._held.pop(delivery.tag, None) is not None:
                    state.unacked.pop(delivery.tag, None)
            state.changed()

    def reject(self, delivery: Delivery, *, requeue: bool, reason: str = "") -> None:
        state = self._state
        with state.cond:
            held = self._held.pop(delivery.tag, None)
            if held is None:
                return  # already acked, rejected or given back by close()
            state.unacked.pop(delivery.tag, None)
            queue, entry = held
            if requeue:
                state.queue(queue).appendleft(entry)
                state.wake(queue)
            else:
                entry.message.headers[DEATH_REASON] = reason
                dead = dead_letter_queue(queue)
                state.queue(dead).append(entry)
                state.wake(dead)
            state.changed()

    @property
    def connected(self) -> bool:
        return not self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        state = self._state
        with state.cond:
            for tag in sorted(self._held, reverse=True):
                queue, entry = self._held[tag]
                state.unacked.pop(tag, None)
                state.queue(queue).appendleft(entry)
                state.wake(queue)
            self._held.clear()
            for queue in self._queues:
                state.listeners.get(queue, set()).discard(self._notify)
            state.changed()
        self._notify.close()


def _clone_meta(meta: ResultMeta) -> ResultMeta:
    """A copy through JSON, as a real backend stores it (not JSON: TypeError, per the contract)."""
    return ResultMeta.from_json(json.loads(json.dumps(meta.to_json())))


class MemoryResultBackend(ResultBackend):
    """Results in a dict; `get()` waits on a condition, so it wakes the moment a result is stored.

    Results are kept until forgotten (there is no expiry): this backend is for short-lived
    processes such as test runs.
    """

    def __init__(self, url: str = "memory://", options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, options)
        self.name = state_name(url)
        self._state = _named(_results, self.name, _Results)

    def store(self, meta: ResultMeta) -> None:
        copy = _clone_meta(meta)
        state = self._state
        with state.cond:
            state.metas[copy.task_id] = copy
            if copy.status == TaskState.FAILURE:
                state.failure_seq += 1
                state.failures.append((state.failure_seq, copy))
            state.cond.notify_all()

    def get(self, task_id: str, timeout: float | None) -> ResultMeta | None:
        state = self._state

        def ready() -> bool:
            meta = state.metas.get(task_id)
            return meta is not None and meta.status in READY_STATES

        with state.cond:
            state.cond.wait_for(ready, timeout)
            meta = state.metas.get(task_id)
            return _clone_meta(meta) if meta is not None else None

    def peek(self, task_id: str) -> ResultMeta | None:
        with self._state.cond:
            meta = self._state.metas.get(task_id)
            return _clone_meta(meta) if meta is not None else None

    def forget(self, task_id: str) -> None:
        with self._state.cond:
            self._state.metas.pop(task_id, None)

    # -- chords and groups: under the state's lock, so a join completes once ----------------------
    supports_chords = True

    def set_chord_size(self, group_id: str, size: int) -> None:
        with self._state.cond:
            self._state.chords[group_id] = _Chord(size, {})

    def chord_part_return(
        self, group_id: str, task_id: str, index: int | None, state: str, result: Any
    ) -> list[ChordPart] | None:
        value = json.loads(json.dumps(result))  # what a real store would give back
        now = time.monotonic()
        with self._state.cond:
            chord = self._state.chords.get(group_id)
            if chord is None or chord.done:
                return None
            order = float("inf") if index is None else float(index)
            chord.parts.setdefault((task_id, index), (order, task_id, state, value))
            if len(chord.parts) < chord.size or chord.claimed_until > now:
                return None
            chord.claimed_until = now + CHORD_CLAIM_TTL
            ordered = sorted(chord.parts.values(), key=lambda p: p[0])
            return [(tid, st, res) for _, tid, st, res in ordered]

    def chord_done(self, group_id: str) -> None:
        with self._state.cond:
            chord = self._state.chords.get(group_id)
            if chord is not None:
                chord.done = True
                chord.parts.clear()

    def chord_claim_expires(self, group_id: str) -> float | None:
        with self._state.cond:
            chord = self._state.chords.get(group_id)
            now = time.monotonic()
            if chord is None or chord.done or chord.claimed_until <= now:
                return None
            return time.time() + (chord.claimed_until - now)

    def chord_release(self, group_id: str) -> None:
        with self._state.cond:
            chord = self._state.chords.get(group_id)
            if chord is not None:
                chord.claimed_until = 0.0

    def save_group(self, group_id: str, value: Any) -> None:
        with self._state.cond:
            self._state.groups[group_id] = json.loads(json.dumps(value))

    def restore_group(self, group_id: str) -> Any:
        with self._state.cond:
            return self._state.groups.get(group_id)

    def forget_group(self, group_id: str) -> None:
        with self._state.cond:
            self._state.groups.pop(group_id, None)


# -- claims ----------------------------------------------------------------------------------------


class MemoryClaims(Claims):
    """Claims for schedulers in one process (tests, an embedded beat): a dict under a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, tuple[str, float]] = {}
        self._state: dict[str, dict[str, str]] = {}

    def acquire(self, key: str, owner: str, ttl: float) -> bool:
        now = time.monotonic()
        with self._lock:
            held = self._held.get(key)
            if held is not None and held[0] != owner and held[1] > now:
                return False
            self._held[key] = (owner, now + ttl)
            if len(self._held) > 10_000:
                self._held = {k: v for k, v in self._held.items() if v[1] > now}
            return True

    def release(self, key: str, owner: str) -> None:
        with self._lock:
            held = self._held.get(key)
            if held is not None and held[0] == owner:
                del self._held[key]

    def holder(self, key: str) -> Holder | None:
        now = time.monotonic()
        with self._lock:
            held = self._held.get(key)
        if held is None or held[1] <= now:
            return None
        return Holder(held[0], held[1] - now)

    def load_state(self, namespace: str) -> dict[str, str]:
        with self._lock:
            return dict(self._state.get(namespace, {}))

    def save_state(self, namespace: str, values: Mapping[str, str]) -> None:
        with self._lock:
            self._state.setdefault(namespace, {}).update(values)


_claims: dict[str, MemoryClaims] = {}
