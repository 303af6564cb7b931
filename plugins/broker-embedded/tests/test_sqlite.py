"""sqlite://: the conformance kit, plus restarts, processes sharing a file, leases and paths."""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from millpond.contracts.backend import ResultMeta
from millpond.contracts.broker import dead_letter_queue
from millpond.exceptions import ConfigurationError, PublishError
from millpond.states import TaskState
from millpond.testing.broker_kit import BrokerContract, fetch_until
from millpond.testing.claims_kit import ClaimsContract
from millpond.wire.protocol import DEATH_REASON, encode_task
from millpond_broker_embedded.sqlite import (
    DEFAULT_FILE,
    SqliteBroker,
    SqliteResultBackend,
    millpond_home,
    parse_url,
)

LEASE = {"lease_timeout": 1.0, "heartbeat_interval": 0.2}


class TestSqliteContract(BrokerContract):
    redelivery_slack = 3.0

    @pytest.fixture
    def broker_url(self, tmp_path: Path) -> str:
        return f"sqlite://{tmp_path}/kit-{uuid.uuid4().hex[:8]}.db"

    @pytest.fixture
    def broker_options(self) -> dict[str, Any]:
        return dict(LEASE)


# -- fixtures and helpers --------------------------------------------------------------------------


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite://{tmp_path}/broker.db"


@pytest.fixture
def make(url: str) -> Iterator[Callable[..., SqliteBroker]]:
    made: list[SqliteBroker] = []

    def build(**options: Any) -> SqliteBroker:
        broker = SqliteBroker(url, {**LEASE, **options})
        made.append(broker)
        return broker

    yield build
    for broker in made:
        broker.close()


def poll(check: Callable[[], Any], within: float) -> Any:
    deadline = time.monotonic() + within
    value = check()
    while not value and time.monotonic() < deadline:
        time.sleep(0.02)
        value = check()
    return value


def run_child(code: str, *args: str, timeout: float = 30) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stderr}"
    return proc.stdout


def read_line(proc: subprocess.Popen[str], within: float) -> str:
    """One line of a child's stdout, or a failure naming what the child said on stderr."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], within)
    if not ready:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        pytest.fail(f"the child printed nothing within {within} s; stderr:\n{err}")
    return proc.stdout.readline().strip()


# -- durability and sharing ------------------------------------------------------------------------


def test_messages_dead_letters_and_results_survive_a_restart(url: str) -> None:
    first = SqliteBroker(url, LEASE)
    first.publish("jobs", encode_task("t", task_id="ready"))
    first.publish("jobs", encode_task("t", task_id="later"), eta=time.time() + 0.5)
    first.publish("jobs", encode_task("t", task_id="held"))
    first.default_backend().store(
        ResultMeta(task_id="r", status=TaskState.SUCCESS, result=[1, "ü"])
    )
    consumer = first.consumer(["jobs"], 2)
    got = fetch_until(consumer, 2, 5.0, max_count=2)
    assert sorted(d.message.task_id or "" for d in got) == ["held", "ready"]
    consumer.reject(got[0], requeue=False, reason="kept for the restart test")
    first.close()  # cold shutdown: the one still held goes back

    second = SqliteBroker(url, LEASE)
    try:
        assert [m.headers[DEATH_REASON] for m in second.dead_letters("jobs")] == [
            "kept for the restart test"
        ]
        meta = second.default_backend().peek("r")
        assert meta is not None
        assert meta.result == [1, "ü"]
        with closing(second.consumer(["jobs"], 5)) as again:
            back = fetch_until(again, 2, 5.0, max_count=5)
            assert {d.message.task_id for d in back} == {got[1].message.task_id, "later"}
            again.ack(back)
        assert second.queue_length("jobs") == 0
    finally:
        second.close()


def test_two_processes_share_one_file(url: str, make: Callable[..., SqliteBroker]) -> None:
    broker = make()
    child = r"""
import sys
from contextlib import closing
from millpond_broker_embedded.sqlite import SqliteBroker
from millpond.contracts.backend import ResultMeta
from millpond.wire.protocol import encode_task, decode_task
broker = SqliteBroker(sys.argv[1], {"lease_timeout": 1.0, "heartbeat_interval": 0.2})
for i in range(50):
    broker.publish("from-child", encode_task("t", (i,), task_id=f"c{i}"))
with closing(broker.consumer(["to-child"], 1)) as consumer:
    got = []
    while not got:
        got = consumer.fetch(1, 0.25)
    task = decode_task(got[0].message)
    meta = ResultMeta(task_id=task.task_id, status="SUCCESS", result=sum(task.args))
    broker.default_backend().store(meta)
    consumer.ack(got)
broker.close()
print("done", flush=True)
"""
    broker.publish("to-child", encode_task("add", (2, 3), task_id="for-child"))
    assert run_child(child, url).strip() == "done"
    meta = broker.default_backend().get("for-child", 5.0)
    assert meta is not None
    assert (meta.status, meta.result) == (TaskState.SUCCESS, 5)
    assert broker.queue_length("to-child") == 0
    with closing(broker.consumer(["from-child"], 64)) as consumer:
        got = fetch_until(consumer, 50, 10.0, max_count=64)
        assert sorted(d.message.task_id or "" for d in got) == sorted(f"c{i}" for i in range(50))
        consumer.ack(got)


def test_publish_after_fork_uses_a_new_connection(make: Callable[..., SqliteBroker]) -> None:
    broker = make()
    broker.publish("forked", encode_task("t", task_id="parent"))  # the parent's connection is open
    pid = os.fork()
    if pid == 0:  # the child: publish through the inherited broker, then leave without cleanup
        code = 1
        try:
            broker.publish("forked", encode_task("t", task_id="child"))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert broker.queue_length("forked") == 2


def test_messages_are_stored_as_kombu_envelopes(
    url: str, make: Callable[..., SqliteBroker]
) -> None:
    broker = make()
    broker.publish("inspect", encode_task("t", (1,), task_id="seen"))
    with sqlite3.connect(parse_url(url)[0]) as conn:
        (text,) = conn.execute("SELECT envelope FROM messages WHERE queue = 'inspect'").fetchone()
    data = json.loads(text)
    assert data["headers"]["id"] == "seen"
    assert data["content-type"] == "application/json"
    assert data["properties"]["body_encoding"] == "base64"
    assert data["properties"]["delivery_info"]["routing_key"] == "inspect"


def test_an_unreadable_stored_message_is_dead_lettered_not_lost(
    url: str, make: Callable[..., SqliteBroker]
) -> None:
    broker = make()
    broker.declare(["bad"])
    with sqlite3.connect(parse_url(url)[0]) as conn:
        conn.execute(
            "INSERT INTO messages (queue, eta, envelope) VALUES ('bad', 0, 'not an envelope')"
        )
    with closing(broker.consumer(["bad"], 1)) as consumer:
        assert consumer.fetch(1, 0.2) == []
    (dead,) = broker.dead_letters("bad")
    assert dead.body == b"not an envelope"
    assert "unreadable" in dead.headers[DEATH_REASON]


# -- leases ----------------------------------------------------------------------------------------

HOLDER = r"""
import sys, time
from millpond_broker_embedded.sqlite import SqliteBroker
broker = SqliteBroker(sys.argv[1], {"lease_timeout": 1.0, "heartbeat_interval": 0.2})
consumer = broker.consumer([sys.argv[2]], 1)
deadline = time.monotonic() + 20
got = []
while not got and time.monotonic() < deadline:
    got = consumer.fetch(1, 0.25)
print("held " + (got[0].message.task_id if got else "nothing"), flush=True)
time.sleep(120)  # a long task running inline in the loop thread: only the heartbeat thread runs
"""


@pytest.mark.fault
def test_busy_worker_keeps_its_message_until_killed(
    url: str, make: Callable[..., SqliteBroker]
) -> None:
    broker = make()
    broker.publish("long", encode_task("t", task_id="long-task"))
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, url, "long"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert read_line(proc, 20.0) == "held long-task"
        with closing(broker.consumer(["long"], 1)) as rival:
            # 2.5 leases with the holder's loop thread asleep: its heartbeat thread keeps the lease
            assert fetch_until(rival, 1, 2.5) == [], "a busy live worker's message was stolen"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            killed = time.monotonic()
            back = fetch_until(rival, 1, 4.0)
            waited = time.monotonic() - killed
            assert [d.message.task_id for d in back] == ["long-task"], (
                "a SIGKILLed worker's message did not come back within lease + 3 s"
            )
            assert back[0].delivery_count == 2
            assert waited < 4.0
            rival.ack(back)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()


def test_a_consumer_that_lost_its_lease_does_not_ack_the_new_holders_message(
    url: str, make: Callable[..., SqliteBroker], caplog: pytest.LogCaptureFixture
) -> None:
    broker = make()
    broker.publish("lost", encode_task("t", task_id="twice"))
    stale = broker.consumer(["lost"], 1)
    (first,) = fetch_until(stale, 1, 5.0)
    with sqlite3.connect(parse_url(url)[0]) as conn:  # as if the process had been suspended
        conn.execute("UPDATE consumers SET expires = 0 WHERE id = ?", (stale.id,))
    fresh = make().consumer(["lost"], 1)
    (second,) = fetch_until(fresh, 1, 5.0)
    assert second.delivery_count == 2
    with caplog.at_level(logging.WARNING, logger="millpond.brokers.sqlite"):
        stale.ack([first])
    assert "may run twice" in caplog.text
    assert poll(lambda: broker.queue_length("lost") == 0, 1.0)
    fresh.ack([second])
    stale.close()
    fresh.close()
    with sqlite3.connect(parse_url(url)[0]) as conn:
        assert conn.execute("SELECT COUNT(*) FROM messages").fetchone() == (0,)
        assert conn.execute("SELECT COUNT(*) FROM consumers").fetchone() == (0,)


def test_close_deregisters_and_broker_close_closes_its_consumers(
    url: str, make: Callable[..., SqliteBroker]
) -> None:
    broker = make()
    broker.publish("q", encode_task("t", task_id="m"))
    consumer = broker.consumer(["q"], 1)
    assert consumer.connected
    assert len(fetch_until(consumer, 1, 5.0)) == 1
    broker.close()
    assert not consumer.connected
    with sqlite3.connect(parse_url(url)[0]) as conn:
        assert conn.execute("SELECT COUNT(*) FROM consumers").fetchone() == (0,)
        assert conn.execute("SELECT consumer, deliveries FROM messages").fetchall() == [(None, 1)]
    with pytest.raises(RuntimeError, match="closed consumer"):
        consumer.fetch(1, 0.1)


# -- results ---------------------------------------------------------------------------------------


def test_results_expire(url: str) -> None:
    backend = SqliteResultBackend(url, {"result_expires": 0.2})
    try:
        backend.store(ResultMeta(task_id="short", status=TaskState.STARTED))
        assert backend.peek("short") is not None
        assert poll(lambda: backend.peek("short") is None, 5.0), "an expired result was returned"
    finally:
        backend.close()


def test_result_stored_by_another_process_is_seen_promptly(url: str) -> None:
    backend = SqliteResultBackend(url)
    child = r"""
import sys
from millpond_broker_embedded.sqlite import SqliteResultBackend
from millpond.contracts.backend import ResultMeta
SqliteResultBackend(sys.argv[1]).store(ResultMeta(task_id="x", status="SUCCESS", result=1))
"""
    try:
        proc = subprocess.Popen([sys.executable, "-c", child, url])
        try:
            meta = backend.get("x", 20.0)
        finally:
            proc.wait(20)
        assert meta is not None
        assert meta.status == TaskState.SUCCESS
    finally:
        backend.close()


# -- paths and options -----------------------------------------------------------------------------


def test_default_path_honours_millpond_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "deep" / "home"
    monkeypatch.setenv("MILLPOND_HOME", str(home))
    broker = SqliteBroker("sqlite://")
    try:
        assert broker.path == home / DEFAULT_FILE
        broker.publish("q", encode_task("t"))  # creates the missing parent directories
        assert (home / DEFAULT_FILE).exists()
    finally:
        broker.close()


def test_default_home_falls_back_to_xdg_then_local_share(tmp_path: Path) -> None:
    assert millpond_home({"XDG_DATA_HOME": str(tmp_path)}) == tmp_path / "millpond"
    assert millpond_home({"MILLPOND_HOME": "/x", "XDG_DATA_HOME": "/y"}) == Path("/x")
    assert millpond_home({}) == Path.home() / ".local" / "share" / "millpond"


def test_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_url("sqlite:///abs/file.db")[0] == Path("/abs/file.db")
    assert parse_url("sqlite://rel/file.db")[0] == tmp_path / "rel" / "file.db"
    _, opts = parse_url(
        "sqlite:///a.db?lease_timeout=5&heartbeat_interval=0.5", {"busy_timeout": 9}
    )
    assert (opts.lease_timeout, opts.heartbeat_interval, opts.busy_timeout) == (5.0, 0.5, 9.0)
    _, opts = parse_url("sqlite:///a.db?lease_timeout=6", {"lease_timeout": 3})
    assert opts.lease_timeout == 3.0  # the options win: the core weighs the URL's query in first


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        (
            "sqlite:///a.db?lease_timout=5",
            None,
            r"unknown setting 'sqlite\.lease_timout' \(in the query of sqlite:///a\.db\?"
            r"lease_timout=5\) \(did you mean 'lease_timeout'\?\)",
        ),
        (
            "sqlite:///a.db",
            {"visibility_timeout": 5},
            r"the \[sqlite\] section has: lease_timeout, heartbeat_interval, busy_timeout",
        ),
        ("sqlite:///a.db?lease_timeout=abc", None, "bad value 'abc': not a number"),
        ("sqlite:///a.db?lease_timeout=-1", None, "bad value '-1': too small"),
        ("sqlite:///a.db?lease_timeout=2&heartbeat_interval=2", None, "must be shorter"),
        ("sqlite://:memory:", None, "use memory://"),
        ("redis://localhost", None, "not a sqlite:// URL"),
    ],
)
def test_bad_urls_and_options_say_what_to_do(
    url: str, options: dict[str, Any] | None, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        SqliteBroker(url, options)


def test_unwritable_location_is_a_clear_publish_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    broker = SqliteBroker(f"sqlite://{blocker}/broker.db")
    with pytest.raises(PublishError, match="cannot open the sqlite broker file"):
        broker.publish("q", encode_task("t"))


def test_dead_letter_queue_is_a_plain_queue(make: Callable[..., SqliteBroker]) -> None:
    broker = make()
    broker.publish("q", encode_task("t", task_id="dl"))
    with closing(broker.consumer(["q"], 1)) as consumer:
        (delivery,) = fetch_until(consumer, 1, 5.0)
        consumer.reject(delivery, requeue=False, reason="poison")
    assert broker.queue_length(dead_letter_queue("q")) == 1
    assert broker.replay_dead_letters("q", limit=0) == 0
    assert broker.replay_dead_letters("q") == 1
    with closing(broker.consumer(["q"], 1)) as consumer:
        (again,) = fetch_until(consumer, 1, 5.0)
        assert DEATH_REASON not in again.message.headers
        assert again.delivery_count == 1
        consumer.ack([again])


class TestSqliteClaims(ClaimsContract):
    @pytest.fixture
    def broker_url(self, tmp_path: Path) -> str:
        return f"sqlite://{tmp_path / 'claims.sqlite3'}"
