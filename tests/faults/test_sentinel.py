"""Redis Sentinel failovers under load: a private primary, replica and three sentinels
(`millpond.testing.servers.SentinelGroup`), two `millpond worker` subprocesses and a producer on a
`redis+sentinel://` URL, 5,000 tasks each time.

Redis replicates asynchronously: a push the primary acknowledged may not have reached the replica
when the primary dies (SIGKILL), or when a `SENTINEL FAILOVER` promotes the replica while the old
primary still takes writes until the sentinels turn it into a replica. Such a push is lost with
the failover: Redis never kept it. These tests measure that window and fail if any task is lost
outside it, if the worker or the producer does not follow the new primary, or if a task the new
primary holds never runs. Duplicates (a fetch or an ack lost in the same window) are counted and
allowed: at-least-once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from millpond.testing.harness import wait_until
from millpond.testing.servers import SentinelGroup
from millpond.wire.protocol import encode_task
from tests.faults.harness import NOOP, Rig

pytestmark = [pytest.mark.fault, pytest.mark.e2e, pytest.mark.slow]

TASKS = 5000
#: the producer's pace: the failover happens while it is still publishing
BATCH, PAUSE = 25, 0.01


@dataclass
class Producer:
    """Publishes `TASKS` no-ops in a thread, remembering when each publish returned."""

    rig: Rig
    ids: list[str] = field(default_factory=list)
    sent: dict[str, float] = field(default_factory=dict)
    returned: dict[str, float] = field(default_factory=dict)
    error: BaseException | None = None

    def run(self) -> None:
        import uuid

        try:
            broker = self.rig.broker
            while len(self.ids) < TASKS:
                for _ in range(BATCH):
                    task_id = str(uuid.uuid4())
                    self.sent[task_id] = time.monotonic()
                    broker.publish(self.rig.queue, encode_task(NOOP, (), task_id=task_id))
                    self.returned[task_id] = time.monotonic()
                    self.ids.append(task_id)
                time.sleep(PAUSE)  # pacing the load, not synchronising
        except BaseException as exc:  # reported by the test
            self.error = exc

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="sentinel-producer", daemon=True)
        thread.start()
        return thread


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    made = SentinelGroup(tmp_path / "sentinel").start()
    try:
        yield made
    finally:
        made.stop()


def _settled(port: int, queue: str) -> bool:
    """Whether the primary on `port` holds nothing of `queue` any more: no ready message and no
    reserved one in any consumer's unacked hash."""
    client = redis.Redis(port=port, socket_timeout=2)
    try:
        if client.llen(queue):
            return False
        return not any(client.hlen(k) for k in client.scan_iter(match="millpond:unacked:*"))
    except redis.RedisError:
        return False
    finally:
        client.close()


def _replication_delay(group: SentinelGroup) -> float:
    """Seconds from a write on the primary until the replica has it, under the test's load: the
    asynchronous-replication window, measured."""
    primary = redis.Redis(port=group.current_primary().port, socket_timeout=2)
    replica = redis.Redis(port=group.current_replica().port, socket_timeout=2)
    try:
        marker = f"sentinel-test:{time.monotonic_ns()}"
        start = time.monotonic()
        primary.set(marker, "1")
        wait_until(lambda: replica.exists(marker), 5, "the replica to receive a write", 0.0005)
        return time.monotonic() - start
    finally:
        primary.close()
        replica.close()


def _ride_through(
    make_rig: Callable[..., Rig], group: SentinelGroup, label: str, fault: Callable[[], float]
) -> None:
    rig = make_rig("redis", url=group.url(), MILLPOND_REDIS__LEASE_TIMEOUT="5")
    workers = [rig.spawn("threads", 4).wait_ready(), rig.spawn("threads", 4).wait_ready()]
    alive = rig.alive(*workers)
    old = group.current_primary().port
    producer = Producer(rig)
    thread = producer.start()
    wait_until(lambda: len(producer.ids) >= TASKS * 0.3, 60, "the producer to send 30%")
    rig.ledger.wait_progress(500, 60, alive=alive)
    lags = sorted(_replication_delay(group) for _ in range(20))
    fault_at = time.monotonic()
    settled_at = fault()
    new = group.wait_primary_changed(old, 30)
    promoted_at = time.monotonic()
    thread.join(120)
    assert not thread.is_alive(), "the producer did not finish within 120 s"
    assert producer.error is None, f"the producer failed: {producer.error!r}"
    assert group.current_primary().port == new

    try:
        wait_until(lambda: _settled(new, rig.queue) or alive(), 60, "the new primary to drain")
    except AssertionError:
        client = redis.Redis(port=new)
        held = {k: client.hlen(k) for k in client.scan_iter(match="millpond:unacked:*")}
        raise AssertionError(
            f"the new primary still holds {client.llen(rig.queue)} ready messages and {held} "
            f"reserved ones; done {rig.ledger.progress()}; worker logs:\n"
            + "\n".join(w.text()[-3000:] for w in workers)
        ) from None
    report = rig.ledger.report(label, producer.ids)
    # the window: pushes the old primary acknowledged from just before the fault until the
    # sentinels had turned it into a replica (SENTINEL FAILOVER) or it was dead (SIGKILL); a
    # push sent before that moment may return just after it
    window_start = fault_at - 1.0
    outside = [
        i
        for i in report.missing
        if not (producer.returned[i] >= window_start and producer.sent[i] <= settled_at)
    ]
    ages = sorted(round(producer.returned[i] - fault_at, 3) for i in report.missing)
    print(
        f"[{label}] replication delay under load: median {lags[10] * 1000:.1f} ms, "
        f"max {lags[-1] * 1000:.1f} ms; "
        f"failover took {promoted_at - fault_at:.2f} s; lost {len(report.missing)} "
        f"(published {ages[:3]}..{ages[-3:]} s from the fault); "
        f"{sum(n - 1 for n in report.duplicates.values())} duplicate runs"
    )
    assert not outside, f"{len(outside)} tasks lost outside the replication window: {report}"
    assert not report.extra
    for worker in workers:  # the workers followed the new primary: they are serving it
        assert worker.proc.poll() is None
    follow = rig.publish(50)
    rig.ledger.wait_for(follow, 30, alive=alive)


def test_sentinel_failover_under_load(make_rig: Callable[..., Rig], group: SentinelGroup) -> None:
    def fault() -> float:
        old = group.current_primary()
        group.failover()
        # the old primary takes writes until a sentinel makes it a replica of the new one
        wait_until(
            lambda: redis.Redis(port=old.port).info("replication")["role"] == "slave",
            30,
            "the old primary to become a replica",
            0.005,
        )
        return time.monotonic()

    _ride_through(make_rig, group, "SENTINEL FAILOVER under load", fault)
    group.wait_settled(30)  # the old primary is back as a replica


def test_sentinel_primary_sigkilled_under_load(
    make_rig: Callable[..., Rig], group: SentinelGroup
) -> None:
    def fault() -> float:
        group.current_primary().kill()  # what the replica had not received is gone with it
        return time.monotonic()

    _ride_through(make_rig, group, "sentinel primary SIGKILLed under load", fault)


def test_min_replicas_makes_the_old_primary_refuse_writes_before_it_is_demoted(
    tmp_path: Path,
) -> None:
    """With `min-replicas-to-write 1` and `min-replicas-max-lag 1`, a `SENTINEL FAILOVER` leaves
    the old primary without a replica in sync: it refuses pushes (NOREPLICAS, which millpond
    retries) within about the lag, long before the sentinels demote it (READONLY). Measured: how
    long after the promotion it still took writes."""
    group = SentinelGroup(
        tmp_path / "sentinel",
        data_args=("--min-replicas-to-write", "1", "--min-replicas-max-lag", "1"),
    ).start()
    try:
        old = group.current_primary()
        client = redis.Redis(port=old.port, socket_timeout=2)
        client.lpush("probe", "before")
        group.failover()
        group.wait_primary_changed(old.port, 30)
        promoted = time.monotonic()
        accepted = 0
        refusal = ""
        while not refusal:
            assert time.monotonic() - promoted < 30, "the old primary kept taking writes for 30 s"
            try:
                client.lpush("probe", "after")
                accepted += 1
            except redis.ResponseError as exc:
                refusal = str(exc)
            except redis.ConnectionError:  # the sentinels cut the old primary's clients
                client = redis.Redis(port=old.port, socket_timeout=2)
            time.sleep(0.01)  # one probe write per 10 ms
        took = time.monotonic() - promoted
        print(
            f"[min-replicas] the old primary took {accepted} writes for {took:.2f} s, then: {refusal}"
        )
        assert refusal.startswith("NOREPLICAS"), refusal
        client.close()
    finally:
        group.stop()
