"""File-system broker on a temp directory: the conformance kit, plus two consumers on one
directory, claims of a killed consumer coming back, files Celery's kombu writes and reads, and the
settings."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from millpond.exceptions import ConfigurationError
from millpond.testing.broker_kit import BrokerContract, fetch_until, sample_message
from millpond.wire.protocol import DEATH_REASON, encode_task
from millpond_broker_kombu.filesystem import FilesystemBroker


class TestFilesystemContract(BrokerContract):
    @pytest.fixture
    def broker_url(self, tmp_path: Path) -> str:
        return f"filesystem://{tmp_path / 'queues'}"

    @pytest.fixture
    def broker_options(self) -> dict[str, Any]:
        return {"polling_interval": 0.02, "recover_interval": 0.2}

    @pytest.fixture
    def lease_seconds(self) -> float:
        # nothing times out: a dead consumer's claims come back at the next recovery look
        return 0.2


# -- what only the file system has ------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "queues"


@pytest.fixture
def broker(folder: Path) -> Iterator[FilesystemBroker]:
    made = FilesystemBroker(f"filesystem://{folder}", {"polling_interval": 0.02})
    yield made
    made.close()


def kombu_connection(folder: Path) -> Any:
    """A kombu connection as Celery makes one for this directory."""
    from kombu import Connection

    return Connection(
        transport="filesystem",
        transport_options={"data_folder_in": str(folder), "data_folder_out": str(folder),
                           "control_folder": str(folder.parent / "control")},
    )  # fmt: skip


def test_kombus_own_consumer_reads_what_millpond_wrote(
    broker: FilesystemBroker, folder: Path
) -> None:
    broker.declare(["shared"])
    sent = encode_task("kit.add", (2, 3), task_id="fs-1")
    broker.publish("shared", sent)
    with kombu_connection(folder) as conn:
        got = conn.SimpleQueue("shared", no_ack=True).get(timeout=5)
        assert got.headers["id"] == "fs-1"
        assert got.body == sent.body
        assert got.content_type == "application/json"


def test_millpond_reads_what_celerys_producer_wrote_through_an_exchange(
    broker: FilesystemBroker, folder: Path
) -> None:
    """Celery publishes to the queue's exchange (bound in the control folder), not to the
    default exchange: the file lands under the queue's name all the same."""
    from kombu import Exchange, Producer, Queue

    queue = Queue("celery", Exchange("celery", "direct"), routing_key="celery")
    with kombu_connection(folder) as conn:
        producer = Producer(conn.default_channel)
        producer.publish(
            b'[[1, 2], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]',
            exchange=queue.exchange, routing_key="celery", declare=[queue],
            content_type="application/json", content_encoding="utf-8",
            headers={"id": "from-celery", "task": "kit.add", "lang": "py"},
        )  # fmt: skip
    consumer = broker.consumer(["celery"], 1)
    try:
        got = fetch_until(consumer, 1, 5)
        assert [d.message.task_id for d in got] == ["from-celery"]
        consumer.ack(got)
    finally:
        consumer.close()


def test_two_consumers_on_one_directory_never_share_a_message(broker: FilesystemBroker) -> None:
    broker.declare(["q"])
    for i in range(200):
        broker.publish("q", encode_task("kit.n", (i,), task_id=f"m{i}"))
    first, second = broker.consumer(["q"], 8), broker.consumer(["q"], 8)
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 20
        while len(seen) < 200 and time.monotonic() < deadline:
            for consumer in (first, second):
                batch = consumer.fetch(8, 0.05)
                seen.extend(d.message.task_id or "" for d in batch)
                consumer.ack(batch)
    finally:
        first.close()
        second.close()
    assert len(seen) == len(set(seen)) == 200


def test_a_delay_waits_in_the_directory_not_in_a_process(
    broker: FilesystemBroker, folder: Path
) -> None:
    broker.publish("q", sample_message("later"), eta=time.time() + 30)
    assert broker.queue_length("q") == 0
    assert len(list((folder / ".millpond" / "delayed").iterdir())) == 1
    assert broker.next_due() is not None


def test_an_undecodable_file_is_dead_lettered_with_a_reason(
    broker: FilesystemBroker, folder: Path
) -> None:
    broker.declare(["q"])
    (folder / "0_bad.q.msg").write_bytes(b"not json")  # its name sorts first
    broker.publish("q", sample_message("good"))
    consumer = broker.consumer(["q"], 4)
    try:
        got = fetch_until(consumer, 1, 5)
        assert [d.message.task_id for d in got] == ["good"]
        consumer.ack(got)
    finally:
        consumer.close()
    dead = broker.dead_letters("q")
    assert len(dead) == 1
    assert "undecodable" in dead[0].headers[DEATH_REASON]
    assert dead[0].body == b"not json"


def test_a_url_without_a_directory_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="data_folder"):
        FilesystemBroker("filesystem://")
    with pytest.raises(ConfigurationError, match="one directory"):
        FilesystemBroker("filesystem:///x", {"data_folder_in": "/y"})


def test_the_brokers_guide_example_writes_a_kombu_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The docs/brokers.md block runs as written, in a directory of the test's own."""
    import re

    monkeypatch.chdir(tmp_path)
    guide = (Path(__file__).resolve().parents[3] / "docs" / "brokers.md").read_text()
    section = guide.split("## The file system (filesystem://)", 1)[1]
    block = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    namespace: dict[str, Any] = {}
    exec(compile(block, "brokers.md", "exec"), namespace)
    namespace["app"].close()
    files = [p.name for p in (tmp_path / "shop-queues").iterdir() if p.is_file()]
    assert len(files) == 1 and files[0].endswith(".celery.msg"), files


def test_a_priority_is_not_dropped_without_a_word(
    broker: FilesystemBroker, caplog: pytest.LogCaptureFixture
) -> None:
    from millpond_broker_kombu import link

    link._SAID_PRIORITY.discard("the filesystem broker")
    with caplog.at_level("WARNING", logger="millpond.broker.kombu"):
        broker.publish("q", encode_task("kit.add", (1, 2), priority=9))
        broker.publish("q", encode_task("kit.add", (1, 2), priority=9))
    said = [r for r in caplog.records if "no message priorities" in r.getMessage()]
    assert len(said) == 1, "warned not at all, or on every message"
    assert "priority=9" in said[0].getMessage()


def test_a_forked_child_does_not_keep_the_consumers_lease(broker: FilesystemBroker) -> None:
    """A child forked while a consumer lives (a prefork pool replacing a child) lets go of the
    lease: once the consumer's process is gone, nothing holds its claims."""
    import fcntl
    import os

    consumer = broker.consumer(["q"], 1)
    lock = broker.folders.claims / f"{consumer.id}.lock"
    read, write = os.pipe()
    started_r, started_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child (its at-fork hooks have run): say so, wait until told to exit
        os.close(write)
        os.write(started_w, b"s")
        os.read(read, 1)
        os._exit(0)
    os.close(read)
    os.close(started_w)
    assert os.read(started_r, 1) == b"s"
    os.close(started_r)
    try:
        # the consumer (this process) holds it
        with open(lock, "rb") as probe, pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        consumer._lock_file.close()  # as if this process died: only the child could hold it now
        with open(lock, "rb") as probe:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: the child let go
    finally:
        os.write(write, b"x")
        os.close(write)
        os.waitpid(pid, 0)
