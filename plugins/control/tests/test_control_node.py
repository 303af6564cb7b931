"""The pidbox node of an in-process worker on memory://: the policy (safe list, deny, signing),
dropped requests (expired, foreign), bounded replies, revoke in the loop, control switched off."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from millpond import Millpond
from millpond.exceptions import TaskRevokedError
from millpond.testing.fixtures import RunningWorker
from millpond.testing.harness import wait_until
from millpond_control.client import Mailbox, encode, pidbox_exchange
from millpond_control.registry import plane
from millpond_control.revoked import Revoked

NODE = "node-a@test"


def make_app(**control: Any) -> Millpond:
    name = f"ctl-{uuid.uuid4().hex[:10]}"
    signing_key = control.pop("signing_key", None)
    sections = control.pop("sections", {})
    app = Millpond(
        "ctl",
        broker_url=f"memory://{name}",
        default_queue=name,
        queues=[name],
        signing_key=signing_key,
        control={"revokes_file": "none", **control},
        **sections,
    )

    @app.task(name="ctl.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="ctl.wait")
    def wait(key: str) -> str:
        GATES[key].wait(10)
        return key

    return app


#: what a running `ctl.wait` task waits for, by its key
GATES: dict[str, threading.Event] = {}


@pytest.fixture
def node() -> Iterator[Callable[..., tuple[Millpond, Mailbox, RunningWorker]]]:
    made: list[tuple[Millpond, Mailbox, RunningWorker]] = []

    def start(*, signed: bool = True, **control: Any) -> tuple[Millpond, Mailbox, RunningWorker]:
        app = make_app(**control)
        running = RunningWorker(app, worker_name=NODE, pool="threads", concurrency=2).start()
        key = app.settings.signing_key if signed else None
        mailbox = Mailbox(app.broker, signing_key=key)
        made.append((app, mailbox, running))
        return app, mailbox, running

    yield start
    for app, mailbox, running in made:
        mailbox.close()
        if running.thread.is_alive():
            running.stop(cold=True)
        app.close()


def test_ping_and_a_command_this_worker_lacks(node: Any) -> None:
    _app, mailbox, _ = node()
    assert mailbox.call("ping", timeout=2.0, limit=1) == [{NODE: {"ok": "pong"}}]
    (reply,) = mailbox.call("frobnicate", timeout=2.0, limit=1)
    assert "unknown command 'frobnicate'" in reply[NODE]["error"]


def test_safe_list_answers_inspect_and_refuses_control(node: Any) -> None:
    _app, mailbox, running = node(commands="safe")
    assert mailbox.call("ping", timeout=2.0, limit=1) == [{NODE: {"ok": "pong"}}]
    (reply,) = mailbox.call("shutdown", timeout=2.0, limit=1)
    assert "read-only commands only" in reply[NODE]["error"]
    assert running.thread.is_alive()


def test_denied_command_is_refused(node: Any) -> None:
    _app, mailbox, running = node(deny=["shutdown"])
    (reply,) = mailbox.call("shutdown", timeout=2.0, limit=1)
    assert "disabled on this worker" in reply[NODE]["error"]
    assert running.thread.is_alive()


def test_unsigned_shutdown_is_refused_and_logged_when_signing_is_on(
    node: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app, unsigned, running = node(signed=False, signing_key="s3cret")
    with caplog.at_level(logging.WARNING, logger="millpond.control"):
        (reply,) = unsigned.call("shutdown", timeout=2.0, limit=1)
    assert "was not signed" in reply[NODE]["error"]
    assert any("refused shutdown" in r.getMessage() for r in caplog.records)
    assert running.thread.is_alive()
    # read-only commands still answer unsigned callers (Flower, celery inspect)
    assert unsigned.call("ping", timeout=2.0, limit=1) == [{NODE: {"ok": "pong"}}]
    forged = Mailbox(app.broker, signing_key="another key")
    try:
        (reply,) = forged.call("ping", timeout=2.0, limit=1)
        assert "signature does not match" in reply[NODE]["error"]
    finally:
        forged.close()
    signed = Mailbox(app.broker, signing_key="s3cret")
    try:
        assert signed.call("shutdown", timeout=2.0, limit=1) == [{NODE: {"ok": "shutting down"}}]
    finally:
        signed.close()
    running.thread.join(10)
    assert not running.thread.is_alive()
    assert running.exit_code == 0


def test_unsigned_refuse_answers_nothing_unsigned(node: Any) -> None:
    _app, unsigned, _ = node(signed=False, signing_key="s3cret", unsigned="refuse")
    (reply,) = unsigned.call("ping", timeout=2.0, limit=1)
    assert "not signed" in reply[NODE]["error"]


def test_expired_and_foreign_requests_are_dropped(node: Any) -> None:
    app, mailbox, running = node()
    replies = mailbox._reply_queue()
    stale = {
        "method": "ping",
        "arguments": {},
        "ticket": "t-stale",
        "reply_to": {"exchange": "reply.celery.pidbox", "routing_key": mailbox.oid},
    }
    app.broker.broadcast(pidbox_exchange(), encode(stale, {"clock": 1, "expires": time.time() - 1}))
    assert mailbox.call("ping", destination=["someone-else@x"], timeout=0.5) == []
    assert replies.receive(0.2) == []
    assert mailbox.call("ping", pattern="node-*", matcher="glob", timeout=2.0, limit=1) == [
        {NODE: {"ok": "pong"}}
    ]
    assert plane(running.worker).node is not None
    assert plane(running.worker).node.dropped >= 1


def test_reply_is_capped_with_an_error_that_says_so(node: Any) -> None:
    _app, mailbox, running = node(reply_max_bytes=1024)
    plane(running.worker).revoked.add(str(uuid.uuid4()) for _ in range(100))
    (reply,) = mailbox.call("revoked", timeout=2.0, limit=1)
    assert "reply_max_bytes" in reply[NODE]["error"]


def test_revoke_discards_a_waiting_task_and_stores_revoked(node: Any) -> None:
    app, mailbox, _running = node()
    task_id = str(uuid.uuid4())
    (reply,) = mailbox.call("revoke", {"task_id": task_id}, timeout=2.0, limit=1)
    assert reply == {NODE: {"ok": f"tasks {{'{task_id}'}} flagged as revoked"}}
    handle = app.tasks["ctl.add"].apply_async((1, 2), task_id=task_id)
    with pytest.raises(TaskRevokedError):
        handle.get(timeout=10)
    assert app.tasks["ctl.add"].delay(2, 2).get(timeout=10) == 4


def test_remote_control_switched_off(node: Any) -> None:
    _app, mailbox, running = node(enabled=False)
    assert mailbox.call("ping", timeout=0.5) == []
    assert plane(running.worker).node is not None and plane(running.worker).node.answered == 0


def test_revoked_set_is_bounded_and_persisted(tmp_path: Any) -> None:
    path = tmp_path / "revoked.json"
    first = Revoked(maxlen=3, expires=60.0, path=path)
    first.add(["a", "b", "c", "d"])
    assert first.ids() == ["b", "c", "d"]
    again = Revoked(maxlen=3, expires=60.0, path=path)
    assert "d" in again and "a" not in again
    old = Revoked(maxlen=10, expires=1.0, path=None)
    old.add(["x"], at=time.time() - 5)
    assert old.ids() == []
    stamps = Revoked(maxlen=10, expires=60.0)
    stamps.add_stamps({"mystamp": ["v1"]})
    assert stamps.matches("any", {"mystamp": "v1"}) == "revoked by stamped header mystamp=v1"
    assert stamps.matches("any", {"mystamp": "v2"}) is None
    celery_style = {"stamped_headers": ["mystamp"], "stamps": {"mystamp": ["v0", "v1"]}}
    assert stamps.matches("any", celery_style) == "revoked by stamped header mystamp=v1"


def test_app_control_has_celerys_shape(node: Any) -> None:
    app, _mailbox, running = node()
    control = app.control
    assert control.ping(timeout=2.0) == [{NODE: {"ok": "pong"}}]
    inspect = control.inspect([NODE], timeout=2.0)
    assert inspect.ping() == {NODE: {"ok": "pong"}}
    assert "ctl.add" in (inspect.registered() or {})[NODE]
    stats = (inspect.stats() or {})[NODE]
    assert stats["pool"]["max-concurrency"] == 2
    assert control.inspect(["nobody@x"], timeout=0.3).ping() is None
    replies = control.revoke("some-id", reply=True, timeout=2.0)
    assert replies == [{NODE: {"ok": "tasks {'some-id'} flagged as revoked"}}]
    assert "some-id" in plane(running.worker).revoked
    assert control.revoke("fire-and-forget") is None


def test_add_and_cancel_consumer_change_the_queues(node: Any) -> None:
    app, mailbox, running = node()
    first = running.worker.queues[0]
    extra = f"{first}-extra"
    (reply,) = mailbox.call("add_consumer", {"queue": extra}, timeout=2.0, limit=1)
    assert reply == {NODE: {"ok": f"add consumer {extra}"}}
    handle = app.tasks["ctl.add"].apply_async((20, 22), queue=extra)
    assert handle.get(timeout=10) == 42
    assert running.worker.queues == (first, extra)
    (reply,) = mailbox.call("cancel_consumer", {"queue": first}, timeout=2.0, limit=1)
    assert reply == {NODE: {"ok": f"no longer consuming from {first}"}}
    assert app.tasks["ctl.add"].apply_async((1, 1), queue=extra).get(timeout=10) == 2

    def moved() -> bool:
        return running.worker.queues == (extra,)

    deadline = time.monotonic() + 10
    while not moved():
        assert time.monotonic() < deadline, running.worker.queues
        time.sleep(0.01)
    (reply,) = mailbox.call("cancel_consumer", {"queue": extra}, timeout=2.0, limit=1)
    assert "only queue" in reply[NODE]["error"]
    (active,) = mailbox.call("active_queues", timeout=2.0, limit=1)
    assert [q["name"] for q in active[NODE]] == [extra]


def test_pool_resize_and_time_limit_where_the_pool_can(node: Any) -> None:
    _app, mailbox, running = node()
    (reply,) = mailbox.call("pool_grow", {"n": 2}, timeout=2.0, limit=1)
    assert reply == {NODE: {"ok": "pool will grow"}}
    assert running.worker.pool is not None and running.worker.pool.concurrency == 4
    assert running.worker.prefetch >= 4
    (reply,) = mailbox.call("pool_shrink", {"n": 3}, timeout=2.0, limit=1)
    assert reply == {NODE: {"ok": "pool will shrink"}}
    (reply,) = mailbox.call("pool_shrink", {"n": 5}, timeout=2.0, limit=1)
    assert "below 1" in reply[NODE]["error"]
    (reply,) = mailbox.call(
        "time_limit", {"task_name": "ctl.add", "hard": 5.0}, timeout=2.0, limit=1
    )
    assert "cannot enforce a hard time limit" in reply[NODE]["error"]  # threads: soft only


def test_inspect_revoked_lists_every_revoked_id_not_a_hellos_worth(node: Any) -> None:
    # hello_revokes_max caps what a starting worker is sent; `inspect revoked` must not be cut
    # to it silently (Celery answers the whole set; too large a reply is an error that says so)
    _app, mailbox, _running = node(hello_revokes_max=2)
    ids = [str(uuid.uuid4()) for _ in range(3)]
    (reply,) = mailbox.call("revoke", {"task_id": ids}, timeout=2.0, limit=1)
    assert "ok" in reply[NODE]
    (reply,) = mailbox.call("revoked", timeout=2.0, limit=1)
    assert sorted(reply[NODE]) == sorted(ids)


def test_add_consumer_refuses_a_binding_it_cannot_make(node: Any) -> None:
    # Celery's add_consumer declares the queue bound to `exchange` with `routing_key`; a
    # worker that consumed the queue without that binding would never see those tasks
    _app, mailbox, running = node()
    first = running.worker.queues[0]
    extra = f"{first}-bound"
    arguments = {
        "queue": extra,
        "exchange": "orders",
        "exchange_type": "topic",
        "routing_key": "order.*",
    }
    (reply,) = mailbox.call("add_consumer", arguments, timeout=2.0, limit=1)
    error = reply[NODE]["error"]
    assert "exchange='orders'" in error and "routing_key='order.*'" in error
    assert "exchange_type='topic'" in error
    assert running.worker.queues == (first,)
    assert plane(running.worker).next_queues is None
    # what Celery's app.control.add_consumer sends by default: the binding millpond makes
    defaults = {"queue": extra, "exchange": None, "exchange_type": None, "routing_key": None}
    (reply,) = mailbox.call("add_consumer", defaults, timeout=2.0, limit=1)
    assert reply == {NODE: {"ok": f"add consumer {extra}"}}


def test_revoke_by_stamped_headers_honours_destination(node: Any) -> None:
    app, _mailbox, running = node()
    replies = app.control.revoke_by_stamped_headers(
        {"mystamp": "v1"}, destination=["nobody@x"], reply=True, timeout=0.5
    )
    assert replies == []
    assert plane(running.worker).revoked.stamps() == {}
    replies = app.control.revoke_by_stamped_headers(
        {"mystamp": "v1"}, destination=[NODE], reply=True, timeout=2.0
    )
    assert replies == [
        {NODE: {"ok": "headers {'mystamp': 'v1'} flagged as revoked, but not terminated"}}
    ]
    assert plane(running.worker).revoked.stamps() == {"mystamp": ["v1"]}


def test_pcre_pattern_matches_from_the_start_of_the_name_as_kombus(node: Any) -> None:
    # kombu's pcre matcher is re.match: `a@test` does not select node-a@test, so a command
    # broadcast with it (a shutdown) must not run here either
    _app, mailbox, running = node()
    assert mailbox.call("ping", pattern="a@test", matcher="pcre", timeout=0.5) == []
    assert mailbox.call("ping", pattern=r"node-\w@", matcher="pcre", timeout=2.0, limit=1) == [
        {NODE: {"ok": "pong"}}
    ]
    assert plane(running.worker).node is not None


def test_an_unknown_matcher_selects_nobody_and_is_logged(
    node: Any, caplog: pytest.LogCaptureFixture
) -> None:
    _app, mailbox, _running = node()
    with caplog.at_level(logging.WARNING, logger="millpond.control"):
        assert mailbox.call("ping", pattern="node-*", matcher="regex", timeout=0.5) == []
    assert any("matcher 'regex'" in r.getMessage() for r in caplog.records)


def test_stamped_terminate_stops_only_the_tasks_of_its_own_headers(node: Any) -> None:
    # Celery terminates the running tasks that carry the headers of *this* request; a task
    # whose stamp was revoked earlier without terminate keeps running
    app, mailbox, running = node()
    key = uuid.uuid4().hex
    GATES[key] = threading.Event()
    try:
        handle = app.tasks["ctl.wait"].apply_async((key,), headers={"batch": "a"})
        pool = running.worker.pool
        assert pool is not None
        wait_until(
            lambda: handle.id in {job.task_id for job in pool.active_jobs()},
            10,
            "ctl.wait to start",
        )
        (reply,) = mailbox.call(
            "revoke_by_stamped_headers", {"headers": {"batch": "a"}}, timeout=2.0, limit=1
        )
        assert "flagged as revoked, but not terminated" in reply[NODE]["ok"]
        (reply,) = mailbox.call(
            "revoke_by_stamped_headers",
            {"headers": {"batch": "b"}, "terminate": True},
            timeout=2.0,
            limit=1,
        )
        assert reply == {NODE: {"ok": "headers {'batch': 'b'} were not terminated"}}
    finally:
        GATES[key].set()


def test_conf_masks_secrets_inside_mapping_settings(node: Any) -> None:
    # Celery's conf censors nested keys too (filter_hidden_settings); Flower shows this reply
    sentinel = {"password": "hunter2", "socket_timeout": 1, "auth": {"passwd": "hunter3"}}
    _app, mailbox, _running = node(sections={"redis": {"sentinel_kwargs": sentinel}})
    (reply,) = mailbox.call("conf", timeout=2.0, limit=1)
    shown = reply[NODE]["redis.sentinel_kwargs"]
    assert "hunter" not in str(reply)
    assert shown == {"password": "********", "socket_timeout": 1, "auth": {"passwd": "********"}}


def test_registered_shows_celerys_default_fields_and_a_changed_rate_limit(node: Any) -> None:
    # with no taskinfoitems Celery lists exchange, routing_key and rate_limit where set, and
    # the rate_limit command changes what it lists
    _app, mailbox, _running = node()
    (reply,) = mailbox.call("registered", timeout=2.0, limit=1)
    assert "ctl.add" in reply[NODE]
    (reply,) = mailbox.call(
        "rate_limit", {"task_name": "ctl.add", "rate_limit": "10/m"}, timeout=2.0, limit=1
    )
    assert reply == {NODE: {"ok": "new rate limit set successfully"}}
    (reply,) = mailbox.call("registered", timeout=2.0, limit=1)
    assert "ctl.add [rate_limit=10/m]" in reply[NODE]
    (reply,) = mailbox.call("registered", {"taskinfoitems": ["max_retries"]}, timeout=2.0, limit=1)
    assert "ctl.add [max_retries=3]" in reply[NODE]
    (reply,) = mailbox.call(
        "rate_limit", {"task_name": "ctl.add", "rate_limit": ""}, timeout=2.0, limit=1
    )
    (reply,) = mailbox.call("registered", timeout=2.0, limit=1)
    assert "ctl.add" in reply[NODE]


def test_inspect_query_task_takes_a_list_of_ids_as_celerys(node: Any) -> None:
    # Celery's Inspect.query_task(*ids) takes one list too (its older unary signature)
    app, _mailbox, running = node()
    key = uuid.uuid4().hex
    GATES[key] = threading.Event()
    try:
        handle = app.tasks["ctl.wait"].apply_async((key,))
        pool = running.worker.pool
        assert pool is not None
        wait_until(
            lambda: handle.id in {job.task_id for job in pool.active_jobs()},
            10,
            "ctl.wait to start",
        )
        inspect = app.control.inspect([NODE], timeout=2.0)
        for found in (inspect.query_task(handle.id), inspect.query_task([handle.id, "other"])):
            assert found is not None
            assert found[NODE][handle.id][0] == "active"
    finally:
        GATES[key].set()


def test_events_share_the_control_nodes_lamport_clock(node: Any) -> None:
    # Celery's worker has one app.clock for its events and its remote-control replies
    from millpond_control.events_hooks import EventsHooks

    _app, _mailbox, running = node()
    (hook,) = [h for h in running.worker.hooks.hooks if isinstance(h, EventsHooks)]
    assert hook.emitter is not None
    control_node = plane(running.worker).node
    assert control_node is not None
    assert hook.emitter.clock is control_node.clock
