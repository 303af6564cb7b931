"""The benchmark tasks, registered under the same names in a millpond app and in a Celery app.

    millpond worker -A benchmarks.tasks:app ...
    celery -A benchmarks.tasks:celery_app worker ...

Both apps are built lazily, on first attribute access, so a millpond worker never imports Celery and
a Celery worker never imports millpond: otherwise each would pay the other's import time and memory,
and the start-up and RSS figures would be wrong.

Tasks that report something write to a Redis "side channel" (`BENCH_SIDE_URL`, a key chosen by the
harness per run) whatever the broker under test is, so the harness measures both frameworks with the
same clock and the same instrument. `bench.noop` touches nothing: it is the task being measured.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any
from urllib.parse import urlsplit

#: where markers go; the broker under test may be anything (sqlite, amqp, another Redis db)
SIDE_URL_ENV = "BENCH_SIDE_URL"
DEFAULT_SIDE_URL = "redis://127.0.0.1:6379/0"
#: the broker the Celery app connects to (the millpond app reads MILLPOND_BROKER_URL itself)
BROKER_URL_ENV = "BENCH_BROKER_URL"


class SideClient:
    """Just enough of the Redis protocol to RPUSH a mark.

    Not redis-py on purpose: importing redis-py 8 costs a worker about 150 ms and 20 MiB (it pulls
    in asyncio and the OpenTelemetry metrics SDK), which would land in the start-up and memory
    figures of workers whose broker is not Redis. One socket per process, behind a lock (marks are
    rare); gevent and eventlet patch both, so it is cooperative in green pools.
    """

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.address = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self.db = int(parts.path.strip("/") or 0)
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.buffer = b""

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.buffer = sock, b""
        if self.db:
            self._call(b"SELECT", str(self.db).encode())
        return sock

    def _call(self, *parts: bytes) -> bytes:
        sock = self.sock or self._connect()
        frame = [b"*%d\r\n" % len(parts)]
        for part in parts:
            frame.append(b"$%d\r\n%s\r\n" % (len(part), part))
        sock.sendall(b"".join(frame))
        while b"\r\n" not in self.buffer:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"the side-channel Redis at {self.address} closed")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        if line.startswith(b"-"):
            raise RuntimeError(f"side-channel Redis error: {line[1:].decode(errors='replace')}")
        return line

    def rpush(self, key: str, value: str) -> None:
        with self.lock:
            try:
                self._call(b"RPUSH", key.encode(), value.encode())
            except OSError:
                self.sock = None  # reconnect once, then let the error surface
                self._call(b"RPUSH", key.encode(), value.encode())


_client: SideClient | None = None
_client_pid = 0
_client_lock = threading.Lock()


def side() -> SideClient:
    """The side-channel client of this process (a forked child makes its own)."""
    global _client, _client_pid
    pid = os.getpid()
    if _client is None or _client_pid != pid:
        with _client_lock:
            if _client is None or _client_pid != pid:
                _client = SideClient(os.environ.get(SIDE_URL_ENV, DEFAULT_SIDE_URL))
                _client_pid = pid
    return _client


# -- the task bodies, shared by both frameworks ----------------------------------------------------


def noop() -> None:
    """The unit of drain throughput: nothing but the framework's own cost."""


def mark(key: str) -> None:
    """Record when this task started (epoch seconds): the start and end of a drain."""
    now = time.time()  # before connecting: the first mark times the worker's start-up
    side().rpush(key, repr(now))


def latency(key: str, sent_at: float) -> None:
    """Record how long the message took from the producer to the start of the task body."""
    started = time.time()
    side().rpush(key, repr(started - sent_at))


def sleep(seconds: float, key: str | None = None) -> None:
    """Sleep; with a key, then record when it ended (the last task of a sleep run does).

    Every sleep lasts the same and the pools start tasks in order, so the task enqueued last also
    ends last, give or take scheduling jitter: its end is the end of the run, and no task pays for
    a per-task report (a Redis round trip each would cost more CPU than the task at 7,000/s).
    """
    time.sleep(seconds)
    if key is not None:
        ended = time.time()
        side().rpush(key, repr(ended))


def tick(key: str, seconds: float = 0.0) -> None:
    """Sleep `seconds` (if any), then record when it ended: a task that counts itself.

    The scaling benchmark (`benchmarks/scaling.py`) runs several workers on one queue, where no
    single task is the last one to end, so every task reports and the run ends at the N-th report.
    """
    if seconds:
        time.sleep(seconds)
    side().rpush(key, repr(time.time()))


#: how long a gate holds its worker at most before giving up (the harness releases it in seconds)
GATE_LIMIT_S = 120.0


def gate(held_key: str, release_key: str) -> None:
    """Say "this worker is up and held" (its pid), then hold it until `release_key` exists.

    The scaling benchmark sends one gate per worker: each holds an idle worker, so the next goes
    to another, and once every worker has reported the queue is loaded behind the gates and the
    gates are released together: all workers start on a full queue at the same moment.
    """
    client = side()
    client.rpush(held_key, str(os.getpid()))
    deadline = time.monotonic() + GATE_LIMIT_S
    while time.monotonic() < deadline:
        with client.lock:
            if client._call(b"EXISTS", release_key.encode()) == b":1":
                return
        time.sleep(0.002)


async def async_sleep(seconds: float, key: str | None = None) -> None:
    """`bench.sleep` as a coroutine: what the asyncio pool runs natively (millpond app only)."""
    import asyncio

    await asyncio.sleep(seconds)
    if key is not None:
        side().rpush(key, repr(time.time()))


BODIES: dict[str, Any] = {
    "bench.noop": noop,
    "bench.mark": mark,
    "bench.latency": latency,
    "bench.sleep": sleep,
    "bench.tick": tick,
    "bench.gate": gate,
}


# -- the two apps ----------------------------------------------------------------------------------


def _millpond_app() -> Any:
    from millpond import Millpond

    millpond_app = Millpond("bench")
    for name, fn in BODIES.items():
        millpond_app.task(name=name, ignore_result=True)(fn)
    millpond_app.task(name="bench.async_sleep", ignore_result=True)(async_sleep)
    return millpond_app


def _celery_app() -> Any:
    from celery import Celery

    url = os.environ.get(BROKER_URL_ENV, "redis://127.0.0.1:6379/13")
    capp = Celery("bench", broker=url)
    capp.conf.update(
        # sqs and filesystem need theirs (endpoint, folders); see benchmarks/brokers.py
        broker_transport_options=json.loads(os.environ.get("BENCH_TRANSPORT_OPTIONS") or "{}"),
        task_ignore_result=True,
        worker_prefetch_multiplier=4,
        broker_connection_retry_on_startup=True,
        worker_redirect_stdouts=False,
    )
    capp.conf.update(celery_cluster_options())
    for name, fn in BODIES.items():
        capp.task(name=name, ignore_result=True)(fn)
    return capp


def celery_cluster_options() -> dict[str, Any]:
    """Celery settings for the cluster benchmarks (`benchmarks/clusters.py`), from the
    environment: quorum queues on a RabbitMQ cluster, the sentinels' master name."""
    out: dict[str, Any] = {}
    if os.environ.get("BENCH_QUEUE_TYPE") == "quorum":
        out["task_default_queue_type"] = "quorum"
        out["task_create_missing_queue_type"] = "quorum"  # the runs' own queues, named by -Q
    if os.environ.get("BENCH_MASTER_NAME"):
        out["broker_transport_options"] = {"master_name": os.environ["BENCH_MASTER_NAME"]}
    return out


_FACTORIES = {"app": _millpond_app, "celery_app": _celery_app}


def __getattr__(name: str) -> Any:
    factory = _FACTORIES.get(name)
    if factory is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = factory()
    globals()[name] = value
    return value
