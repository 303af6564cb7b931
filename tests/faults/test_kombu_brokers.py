"""SIGKILL a worker in the middle of 1,000 tasks on SQS (a moto server), on the file system and on
Zookeeper (a private server): nothing is lost, and none of them needs allow_message_loss. The load
mixes plain tasks, tasks that retry once with a countdown and tasks sent with a countdown (each
broker holds the delays itself: SQS's DelaySeconds, the file system's and Zookeeper's delayed
areas), and stores results in a sqlite file (the
documented choice for an SQS user without Redis). On SQS the killed worker's messages come back
after the visibility timeout; on the file system as soon as the second worker sees the first
one's lease is free; on Zookeeper once the server has expired the killed worker's session and a
live worker's lease keeper sees its owner znode gone. How long that took is printed.
"""

from __future__ import annotations

import os
import posixpath
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from millpond import Millpond
from millpond.testing.harness import wait_until
from millpond.wire.protocol import encode_task
from tests.faults.harness import NAP, NOOP, Rig

pytestmark = [pytest.mark.fault, pytest.mark.e2e, pytest.mark.slow]

RETRY_ONCE = "tests.faults.app.retry_once"
TASKS = 1000


@pytest.fixture(scope="module")
def moto() -> Iterator[object]:
    pytest.importorskip("moto", reason="moto is in the dev group: python3 dev.py env")
    from millpond_broker_kombu.testing import MotoServer

    with MotoServer() as server:
        yield server


def _sqs_url(moto: object, tmp: Path) -> str:
    port = moto.port  # type: ignore[attr-defined]
    return (
        f"sqs://testing:testing@127.0.0.1:{port}?is_secure=false&visibility_timeout=4"
        "&wait_time_seconds=1"
    )


#: given the killed worker's pid, whether what it held in flight is all back (its claims gone)
HeldGone = Callable[[int], Callable[[], bool]]


def _run_kill_restart(
    rig: Rig, backend: str, second_worker: bool, *, delays: bool = True,
    held_gone: HeldGone | None = None,
) -> None:  # fmt: skip
    now = time.time()
    # 50 ms each: 8 threads run 160 a second, so the kill lands with most of the load left
    timed = 100 if delays else 0
    plain = [encode_task(NAP, (0.05,)) for _ in range(TASKS - timed)]
    retried = [encode_task(RETRY_ONCE, ()) for _ in range(timed // 2)]
    delayed = [encode_task(NOOP, (), eta=now + 2) for _ in range(timed // 2)]
    broker = rig.broker
    for m in plain + retried:
        broker.publish(rig.queue, m)
    for m in delayed:
        broker.publish(rig.queue, m, eta=now + 2)
    ids = [m.task_id or "" for m in plain + retried + delayed]

    first = rig.spawn("threads", 8, env={"MILLPOND_RESULT_BACKEND": backend}).wait_ready()
    others = []
    if second_worker:
        others.append(rig.spawn("threads", 8, env={"MILLPOND_RESULT_BACKEND": backend}))
        others[0].wait_ready()
    rig.ledger.wait_progress(TASKS // 5, 120, alive=rig.alive(first, *others))
    first.signal(signal.SIGKILL)
    killed = time.monotonic()
    first.wait(10)
    assert rig.ledger.progress() < TASKS * 9 // 10, "the kill came too late to leave work behind"
    if not others:
        others.append(rig.spawn("threads", 8, env={"MILLPOND_RESULT_BACKEND": backend}))
        others[0].wait_ready()
    if held_gone is not None:
        wait_until(held_gone(first.pid), 120, "the killed worker's claims to be given back")
        print(f"the killed worker's messages were back {time.monotonic() - killed:.1f} s after "
              "the kill")  # fmt: skip
    rig.ledger.wait_for(ids, 180, alive=rig.alive(*others))
    print(f"all {len(ids)} tasks done {time.monotonic() - killed:.1f} s after the kill")
    report = rig.ledger.report("kill-restart", ids)
    assert not report.missing, report
    # a killed worker can only run twice what it held: its prefetch window (threads, 8: 4x8)
    assert len(report.duplicates) <= 64, report
    assert set(rig.ledger.counts("tried")) == {m.task_id for m in retried}

    reader = Millpond("faults-reader", broker_url="memory://", result_backend=backend)
    try:
        checked = [ids[0], ids[-1], *(m.task_id or "" for m in retried[:1])]
        for task_id in checked:
            result = reader.AsyncResult(task_id)
            wait_until(lambda r=result: r.state == "SUCCESS", 30, f"the result of {task_id}")
        if retried:
            assert reader.AsyncResult(retried[0].task_id or "").get(timeout=5) == "retried"
    finally:
        reader.close()


def test_sqs_sigkill_mid_run_loses_nothing(moto: object, tmp_path: Path) -> None:
    rig = Rig(tmp_path, _sqs_url(moto, tmp_path), {"MILLPOND_IGNORE_RESULT": "false"})
    try:
        _run_kill_restart(rig, f"sqlite://{tmp_path / 'results.db'}", second_worker=False)
    finally:
        rig.close()


def test_filesystem_two_workers_one_killed_loses_nothing(tmp_path: Path) -> None:
    url = f"filesystem://{tmp_path / 'queues'}"
    claims = tmp_path / "queues" / ".millpond" / "claims"

    def held_gone(pid: int) -> Callable[[], bool]:
        return lambda: not list(claims.glob(f"{pid}-*"))

    rig = Rig(tmp_path, url, {"MILLPOND_IGNORE_RESULT": "false"})
    try:
        _run_kill_restart(rig, f"sqlite://{tmp_path / 'results.db'}", second_worker=True,
                          held_gone=held_gone)  # fmt: skip
        assert rig.broker.queue_length(rig.queue) == 0
        assert not list((tmp_path / "queues" / ".millpond" / "claims").glob("*/*")), (
            "claimed files left behind"
        )
    finally:
        rig.close()


@pytest.fixture(scope="module")
def zookeeper() -> Iterator[object]:
    from millpond_broker_kombu.testing import ZookeeperServer, zookeeper_missing

    missing = zookeeper_missing()
    if missing:
        pytest.skip(missing)
    with ZookeeperServer() as server:
        yield server


def _in_flight(zk: Any, root: str) -> list[str]:
    """Every in-flight message znode under `root` (<owner>/<queue>/<entry>)."""
    out: list[str] = []
    for owner in zk.get_children(root):
        for queue in zk.get_children(posixpath.join(root, owner)):
            out += [posixpath.join(root, owner, queue, e)
                    for e in zk.get_children(posixpath.join(root, owner, queue))]  # fmt: skip
    return out


def test_zookeeper_sigkill_mid_run_loses_nothing(zookeeper: object, tmp_path: Path) -> None:
    """One worker killed, a new one started: the in-flight znodes of the dead session come back."""
    from kazoo.client import KazooClient

    port = zookeeper.port  # type: ignore[attr-defined]
    vhost = f"faults-{uuid.uuid4().hex[:8]}"
    inflight = f"/{vhost}/.millpond/inflight"
    zk = KazooClient(f"127.0.0.1:{port}")
    zk.start(timeout=30)

    def held_gone(pid: int) -> Callable[[], bool]:
        def gone() -> bool:
            dirs = zk.get_children(inflight) if zk.exists(inflight) else []
            return not [d for d in dirs if d.startswith(f"{pid}-")]

        return gone

    assert os.environ.get("MILLPOND_KOMBU__ALLOW_MESSAGE_LOSS") is None
    rig = Rig(tmp_path, f"zookeeper://127.0.0.1:{port}/{vhost}",
              {"MILLPOND_IGNORE_RESULT": "false"})  # fmt: skip
    try:
        _run_kill_restart(rig, f"sqlite://{tmp_path / 'results.db'}", second_worker=False,
                          held_gone=held_gone)  # fmt: skip
        stats = rig.broker.queue_stats(rig.queue)
        assert (stats.ready, stats.delayed) == (0, 0), stats
        wait_until(lambda: not _in_flight(zk, inflight), 30, "the last acks to delete their copies")
    finally:
        rig.close()
        zk.stop()
        zk.close()


def test_sqs_endpoint_away_and_back_is_ridden_through(moto: object, tmp_path: Path) -> None:
    """The worker reaches SQS through a proxy that cuts every connection and refuses new ones for
    a while: it logs, keeps its process, and once SQS answers again runs everything, including
    what was published during the outage."""
    from millpond.testing.proxy import Proxy

    port = moto.port  # type: ignore[attr-defined]
    with Proxy(("127.0.0.1", port)) as proxy:
        worker_url = (
            f"sqs://testing:testing@127.0.0.1:{proxy.port}?is_secure=false&visibility_timeout=4"
            "&wait_time_seconds=1&publish_retry_timeout=60"
        )
        rig = Rig(tmp_path, _sqs_url(moto, tmp_path))
        try:
            before = rig.publish(150, NAP, (0.02,))
            worker = rig.spawn("threads", 4, env={"MILLPOND_BROKER_URL": worker_url}).wait_ready()
            rig.ledger.wait_progress(30, 60, alive=rig.alive(worker))
            proxy.block()
            proxy.reset()
            wait_until(
                lambda: rig.alive(worker)() or "failed" in worker.text(),
                60,
                "the worker to notice that SQS is away",
            )
            during = rig.publish(50, NAP, (0.02,))  # straight to SQS, while the worker is cut off
            proxy.unblock()
            rig.ledger.wait_for(before + during, 120, alive=rig.alive(worker))
            report = rig.ledger.report("sqs-outage", before + during)
            assert not report.missing, report
            assert worker.proc.poll() is None, "the worker did not ride through the outage"
        finally:
            rig.close()
