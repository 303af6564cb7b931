"""Three `millpond beat` replicas on one broker, the leader SIGKILLed half-way: every tick slot is
published once (or, while nobody led, reported missed by the new leader), never twice, and the
longest gap stays below the takeover bound.

The ticks are read back from the queue after the run (nothing consumes it meanwhile), each with the
slot it was published for (`x-millpond-beat-tick`), so a duplicate cannot hide.
"""

from __future__ import annotations

import itertools
import signal
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from millpond.config import plugins
from millpond.contracts.broker import Broker
from millpond.testing.harness import MILLPOND, WorkerProcess, wait_until
from tests.e2e.harness import ROOT

pytestmark = [pytest.mark.fault, pytest.mark.e2e, pytest.mark.slow]

LEASE = 2.0
#: a dead leader's lease runs out after LEASE; the others look every min(LEASE / 5, 1) s; the next
#: tick comes at the next whole second
TAKEOVER_BOUND = LEASE + min(LEASE / 5, 1.0) + 1.0
TICK_HEADER = "x-millpond-beat-tick"
#: ticks (one a second) the first leader publishes before it is killed, and the second after
#: it took over: each half spans several lease renewals (every LEASE / 3)
HALF = 6
#: the run covers at least this many seconds of tick slots
RUN = 2 * HALF
APP = "tests.faults.beat_app:app"


class Replica(WorkerProcess):
    """A `millpond beat` replica, in the harness's process wrapper (JSON log, stopped by PID)."""

    def command(self, args: list[str]) -> list[str]:
        return [str(MILLPOND), "beat", *args]


@pytest.fixture
def replicas() -> Iterator[list[Replica]]:
    started: list[Replica] = []
    yield started
    for replica in started:
        replica.kill()


def _drain(broker: Broker, queue: str) -> list[dict[str, Any]]:
    consumer = broker.consumer([queue], 1000)
    headers: list[dict[str, Any]] = []
    try:
        while True:
            batch = consumer.fetch(1000, 1.0)
            if not batch:
                return headers
            headers += [dict(d.message.headers) for d in batch]
            consumer.ack(batch)
    finally:
        consumer.close()


def _broker_url(kind: str, tmp_path: Path) -> str:
    if kind == "redis":
        return "redis://127.0.0.1:6379/0"
    if kind == "amqp":
        return "amqp://guest:guest@127.0.0.1:5672//"
    return f"sqlite://{tmp_path / 'broker.sqlite3'}"


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("redis", marks=pytest.mark.redis),
        "sqlite",
        pytest.param("amqp", marks=pytest.mark.amqp),
    ],
)
def test_three_replicas_leader_killed_each_tick_once(
    kind: str, tmp_path: Path, replicas: list[Replica]
) -> None:
    url = _broker_url(kind, tmp_path)
    queue = f"beat-{uuid.uuid4().hex[:10]}"
    prefix = f"test-beat-{uuid.uuid4().hex[:10]}"
    env = {
        "MILLPOND_BROKER_URL": url,
        "MILLPOND_DEFAULT_QUEUE": queue,
        "MILLPOND_BEAT__LEASE_TIMEOUT": str(LEASE),
        "MILLPOND_BEAT__KEY_PREFIX": prefix,
        "MILLPOND_LOG_FORMAT": "json",
    }
    broker = plugins.broker_for_url(url)
    claims = broker.claims()
    try:
        for i in range(3):
            replica = Replica(["-A", APP], env, tmp_path, name=f"beat-{i}", cwd=ROOT)
            replicas.append(replica)
        by_pid = {r.proc.pid: r for r in replicas}

        def leader() -> Replica | None:
            holder = claims.holder(f"{prefix}:leader")
            if holder is None:
                return None
            # RabbitMQ cannot say who holds a claim: the elected replica wrote its name
            owner = holder.owner or claims.load_state(f"{prefix}:state").get("@leader", "")
            return by_pid.get(int(owner.split(":")[1])) if owner else None

        first = wait_until(leader, 30, "a replica to lead")
        started = time.monotonic()
        wait_until(lambda: len(first.events("beat published")) >= HALF, 30, f"{HALF} ticks")
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        killed_at = time.time()
        second = wait_until(
            lambda: (r := leader()) is not None and r is not first and r, 30, "a new leader"
        )
        wait_until(
            lambda: (
                time.monotonic() - started >= RUN + 1
                and len(second.events("beat published")) >= HALF
            ),
            40,
            "the second half of the run",
        )
        for r in replicas:
            if r.proc.poll() is None:
                r.proc.send_signal(signal.SIGTERM)
        for r in replicas:
            assert r.wait(20) in (0, -signal.SIGKILL), r.stderr()[-2000:]
        messages = _drain(broker, queue)
    finally:
        if kind == "amqp":  # the shared server keeps nothing of this run
            import amqp

            conn = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest")
            conn.connect()
            chan = conn.channel()
            chan.queue_delete(f"millpond.state.{prefix}:state")
            chan.queue_delete(queue)
            chan.queue_delete(f"{queue}.dead")
            conn.close()
        if kind == "redis":
            import redis

            client = redis.Redis.from_url(url)
            client.delete(f"{prefix}:state", f"{prefix}:leader", queue)
            for name in client.scan_iter(f"{prefix}:tick:*"):
                client.delete(name)
            client.close()
        claims.close()
        broker.close()

    ticks = [float(h[TICK_HEADER]) for h in messages]
    assert all(h["periodic_task_name"] == "every-second" for h in messages)
    assert len(ticks) == len(set(ticks)), f"a tick was published twice: {sorted(ticks)}"
    ticks.sort()
    assert ticks[-1] - ticks[0] >= RUN - 1, f"the run covered only {ticks[-1] - ticks[0]} s"
    assert all(t == int(t) for t in ticks), "ticks fall on whole seconds"
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    longest = max(gaps)
    assert longest < TAKEOVER_BOUND, f"a gap of {longest} s (bound {TAKEOVER_BOUND} s)"
    # every slot between the first and the last tick: published once, or reported missed by
    # the replica that took over (catch_up = run_once publishes the latest of them)
    missed = sum(int(e["missed"]) for r in replicas for e in r.events("beat missed ticks"))
    slots = int(ticks[-1] - ticks[0]) + 1
    assert len(ticks) + missed == slots, (len(ticks), missed, slots)
    # the ticks the first leader published all came before it was killed
    published_by_first = {float(e["tick"]) for e in first.events("beat published")}
    assert published_by_first and max(published_by_first) < killed_at
    assert published_by_first <= set(ticks)
    # the new leader was elected within the lease (plus one poll) of the kill
    elected = max(
        datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
        for e in second.events("beat leads")
    )
    takeover = elected - killed_at
    assert takeover < TAKEOVER_BOUND, f"the takeover took {takeover:.2f} s"
    print(
        f"{kind}: {len(ticks)} ticks over {slots} slots, {missed} missed during the takeover, "
        f"new leader {takeover:.2f} s after the kill, longest gap {longest:g} s "
        f"(bound {TAKEOVER_BOUND:g} s)"
    )
