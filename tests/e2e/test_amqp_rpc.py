"""The rpc:// result backend on the real RabbitMQ, millpond to millpond: results (success, a
failure's type, a retry, a long task, tasks finishing out of order, many threads waiting at once)
from `millpond worker` subprocesses to this process's reply queue; the reply queue and the result
message laid out as Celery's rpc backend has them; peek and forget; what rpc:// cannot do and says
so; the bounded buffer; a lost reply connection. Celery on either side: tests/interop/.

The tests that only need tasks run share one module-scoped worker on a queue of its own
(`shared_worker`, `served`); a test that depends on the worker's flags starts its own (`spawn`)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import amqp
import pytest

from millpond import Millpond, chain, chord
from millpond.contracts.backend import ResultMeta
from millpond.contracts.broker import dead_letter_queue
from millpond.exceptions import ConfigurationError, NotSupported
from millpond.exceptions import TimeoutError as ResultTimeout
from millpond.states import TaskState
from millpond.testing.harness import WorkerProcess, wait_until
from millpond.testing.proxy import Proxy
from millpond.wire.protocol import DELIVERY_COUNT, decode_task
from millpond_broker_amqp import AmqpBroker, rpc
from millpond_broker_amqp.codec import from_properties
from millpond_canvas import CanvasError
from tests.e2e.docs_runner import DOCS, clean_env, run_guide
from tests.e2e.harness import ROOT
from tests.e2e.rpc_app import declare_gate, open_gate

pytestmark = [pytest.mark.amqp, pytest.mark.e2e]

URL = "amqp://guest:guest@127.0.0.1:5672//"
APP = "tests.e2e.rpc_app:app"


def unique(prefix: str = "mp-rpc") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class Admin:
    """A raw py-amqp connection for the test's own checks and clean-up."""

    def __init__(self) -> None:
        self.conn = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest")
        self.conn.connect()
        self.queues: list[str] = []

    def exists(self, queue: str) -> bool:
        chan = self.conn.channel()
        try:
            chan.queue_declare(queue, passive=True)
            return True
        except amqp.exceptions.NotFound:
            return False
        finally:
            if chan.is_open:
                chan.close()

    def consumers(self, queue: str) -> int:
        chan = self.conn.channel()
        try:
            return int(chan.queue_declare(queue, passive=True).consumer_count)
        except amqp.exceptions.NotFound:
            return -1
        finally:
            if chan.is_open:
                chan.close()

    def get(self, queue: str) -> amqp.Message | None:
        chan = self.conn.channel()
        chan.auto_decode = False
        try:
            return chan.basic_get(queue, no_ack=True)
        finally:
            chan.close()

    def close(self) -> None:
        chan = self.conn.channel()
        for name in self.queues:
            for queue in (name, dead_letter_queue(name)):
                chan.queue_delete(queue)
            chan.exchange_delete(name)
        self.conn.close()


@pytest.fixture
def admin() -> Iterator[Admin]:
    helper = Admin()
    yield helper
    helper.close()


@pytest.fixture
def queue(admin: Admin) -> str:
    name = unique()
    admin.queues.append(name)
    return name


def worker_env(queue: str) -> dict[str, str]:
    return {
        "MILLPOND_BROKER_URL": URL,
        "MILLPOND_RESULT_BACKEND": "rpc://",
        "MILLPOND_QUEUES": queue,
        "MILLPOND_DEFAULT_QUEUE": queue,  # where it sends a chain's next steps
    }


@pytest.fixture
def spawn(tmp_path: Path, queue: str) -> Iterator[Callable[..., WorkerProcess]]:
    """`millpond worker` subprocesses on `queue` with rpc:// results, killed by PID afterwards:
    for a test that needs a worker of its own (its own flags), else see `served`."""
    started: list[WorkerProcess] = []

    def start(*args: str) -> WorkerProcess:
        worker = WorkerProcess(
            ["-A", APP, *args], worker_env(queue), tmp_path, name=f"worker-{len(started)}", cwd=ROOT
        )
        started.append(worker)
        return worker.wait_ready()

    yield start
    for worker in started:
        worker.kill()


@pytest.fixture
def producer(queue: str) -> Iterator[Millpond]:
    app = Millpond("rpc-producer", broker_url=URL, result_backend="rpc://", default_queue=queue)
    yield app
    app.close()


@pytest.fixture(scope="module")
def served_queue() -> Iterator[str]:
    """The queue of the module's shared worker, deleted (with its dead letters) at the end."""
    name = unique("mp-rpc-served")
    yield name
    admin = Admin()
    admin.queues.append(name)
    admin.close()


@pytest.fixture(scope="module")
def shared_worker(
    tmp_path_factory: pytest.TempPathFactory, served_queue: str
) -> Iterator[WorkerProcess]:
    """One `millpond worker -P threads -c 4` for every test here that needs a worker to run its
    tasks but checks nothing of the worker's own start-up, shutdown or flags: what those tests
    prove is what reaches the producer (each has a producer, so a reply queue, of its own).
    Started once instead of once per test; killed by PID after the module's last test."""
    worker = WorkerProcess(
        ["-A", APP, "-P", "threads", "-c", "4"],
        worker_env(served_queue),
        tmp_path_factory.mktemp("rpc-served"),
        cwd=ROOT,
    )
    try:
        yield worker.wait_ready()
    finally:
        worker.kill()


@pytest.fixture
def served(shared_worker: WorkerProcess, served_queue: str) -> Iterator[Millpond]:
    """A producer (a reply queue of its own) sending to the module's shared worker."""
    if shared_worker.proc.poll() is not None:
        raise AssertionError(
            f"the shared worker exited with {shared_worker.proc.returncode}:\n"
            f"{shared_worker.text()[-4000:]}"
        )
    app = Millpond(
        "rpc-producer", broker_url=URL, result_backend="rpc://", default_queue=served_queue
    )
    yield app
    app.close()


def reply_queue(app: Millpond) -> str:
    backend = app.backend
    assert isinstance(backend, rpc.RpcResultBackend)
    return backend.reply_to("any")


# -- results from a millpond worker ----------------------------------------------------------------


def test_success_failure_and_retry_come_back(served: Millpond) -> None:
    added = served.send_task("rpc.add", (2, 3))
    failed = served.send_task("rpc.fail", ("bad input",))
    retried = served.send_task("rpc.flaky", (2,))
    assert added.get(timeout=30) == 5
    with pytest.raises(ValueError, match="bad input"):
        failed.get(timeout=30)
    assert failed.state == TaskState.FAILURE
    assert "ValueError: bad input" in (failed.traceback or "")
    # the retries went out with the caller's reply_to: the final result still comes here
    assert retried.get(timeout=30) == 2
    assert added.ready() and added.successful() and failed.failed()


def test_results_arrive_whenever_they_come(served: Millpond, admin: Admin) -> None:
    """A held task, a long one and quick ones: each result reaches its own handle whatever the
    order they finish in, and results read while waiting for another task are kept."""
    gate = unique("mp-rpc-gate")
    declare_gate(gate)
    admin.queues.append(gate)
    held = served.send_task("rpc.gated", (gate, {"late": True}))
    slow = served.send_task("rpc.slow", (2.0,))
    quick = [served.send_task("rpc.add", (i, i)) for i in range(5)]
    # waiting for the last quick one reads the others' results (they finished first) as well
    assert quick[-1].get(timeout=30) == 8
    assert [r.get(timeout=0) for r in quick] == [0, 2, 4, 6, 8]
    assert held.state == TaskState.PENDING and not held.ready()
    with pytest.raises(ResultTimeout):
        held.get(timeout=0.2)
    assert slow.get(timeout=30) == 2.0  # the long one: nothing polls while it runs
    assert held.state == TaskState.PENDING
    open_gate(gate)
    assert held.get(timeout=30) == {"late": True}


def test_a_redelivered_task_runs_and_replies(
    served: Millpond, shared_worker: WorkerProcess
) -> None:
    """A worker with rpc:// cannot tell whether a redelivered task already finished (only its
    caller got the result): it runs it, and the result still reaches the caller."""
    again = served.send_task("rpc.add", (4, 5), headers={DELIVERY_COUNT: 1})
    assert again.get(timeout=30) == 9
    assert "already finished" not in shared_worker.text()


def test_threads_waiting_at_once_each_get_their_own(served: Millpond) -> None:
    handles = [served.send_task("rpc.add", (n, 1000)) for n in range(40)]
    got: dict[int, Any] = {}
    errors: list[BaseException] = []

    def wait(n: int) -> None:
        try:
            got[n] = handles[n].get(timeout=30)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=wait, args=(n,)) for n in reversed(range(40))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert got == {n: n + 1000 for n in range(40)}


def test_a_chain_replies_to_the_process_that_sent_it(served: Millpond) -> None:
    """The worker sends a chain's later steps with the caller's reply_to (in each step's options,
    where Celery puts it), so the chain's result and its failure come back here."""
    add = served.signature
    result = chain(add("rpc.add", (1, 1)), add("rpc.add", (10,)), add("rpc.add", (100,)))
    handle = result.apply_async()
    assert handle.get(timeout=30) == 112
    assert handle.parent is not None and handle.parent.get(timeout=5) == 12
    broken = chain(add("rpc.add", (1, 1)), add("rpc.fail", ()), add("rpc.add", (100,)))
    with pytest.raises(ValueError, match="2"):
        broken.apply_async().get(timeout=30)


def test_a_forked_child_has_its_own_reply_queue(served: Millpond) -> None:
    assert served.send_task("rpc.add", (1, 1)).get(timeout=30) == 2
    parent_queue = reply_queue(served)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child sends and reads on its own connection, then leaves without cleanup
        code = 1
        try:
            os.close(read)
            value = served.send_task("rpc.add", (2, 2)).get(timeout=30)
            os.write(write, json.dumps([value, reply_queue(served)]).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        reported = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the forked child could not get its result"
    value, child_queue = json.loads(reported)
    assert value == 4
    assert child_queue != parent_queue
    # the parent's reply connection was left alone by the child
    assert served.send_task("rpc.add", (3, 3)).get(timeout=30) == 6
    assert reply_queue(served) == parent_queue


# -- Celery's layout -------------------------------------------------------------------------------


def test_reply_queue_and_reply_to_are_celerys(producer: Millpond, admin: Admin) -> None:
    from celery import Celery

    queue = producer.settings.default_queue
    sent = producer.send_task("rpc.add", (1, 2))
    name = reply_queue(producer)
    assert admin.exists(name)
    uuid.UUID(name)  # an oid, like Celery's
    raw = admin.get(queue)
    assert raw is not None
    message = from_properties(raw.properties, raw.body)
    assert raw.properties["reply_to"] == name
    assert raw.properties["correlation_id"] == sent.id
    assert decode_task(message).reply_to == name
    # Celery's rpc backend declares its reply queue with exactly these arguments: declaring ours
    # its way (durable, auto-delete, not exclusive, x-expires = result_expires) must agree
    celery = Celery("layout", broker="pyamqp://guest:guest@127.0.0.1:5672//", backend="rpc://")
    try:
        binding = celery.backend.binding
        binding.name = binding.routing_key = name
        with celery.connection_for_write() as conn:
            binding(conn.default_channel).declare()  # PRECONDITION_FAILED if they differ
        assert binding.durable and binding.auto_delete and not binding.exclusive
        assert binding.expires == producer.settings.result_expires
    finally:
        celery.close()
    # the producer that sent nothing more keeps the same queue for every task
    assert reply_queue(producer) == name


def test_result_message_is_what_celerys_rpc_backend_reads(admin: Admin, queue: str) -> None:
    from celery import Celery

    broker = AmqpBroker(URL)
    backend = rpc.RpcResultBackend("rpc://", {"result_expires": 60.0})
    backend.bind_broker(broker)
    target = unique("mp-rpc-target")
    admin.queues.append(target)
    chan = admin.conn.channel()
    chan.queue_declare(target, durable=True, auto_delete=False)
    chan.close()
    task_id = str(uuid.uuid4())
    backend.store(
        ResultMeta(
            task_id=task_id,
            status=TaskState.FAILURE,
            result={"exc_type": "ValueError", "exc_module": "builtins", "exc_message": ["no"]},
            traceback="Traceback ...",
            date_done="2024-01-01T00:00:00+00:00",
            name="rpc.fail",
            reply_to=target,
        )
    )
    broker.close()
    raw = wait_until(lambda: admin.get(target), 10, "the result message")
    props = raw.properties
    assert props["correlation_id"] == task_id
    assert props["content_type"] == "application/json"
    assert props["content_encoding"] == "utf-8"
    assert props["delivery_mode"] == 1  # transient, as Celery sends results
    body = json.loads(raw.body)
    assert {"task_id", "status", "result", "traceback", "children", "date_done"} <= set(body)
    assert (body["task_id"], body["status"], body["children"]) == (task_id, "FAILURE", [])
    celery = Celery("layout", broker="pyamqp://guest:guest@127.0.0.1:5672//", backend="rpc://")
    try:
        meta = celery.backend.meta_from_decoded(body)
        assert isinstance(meta["result"], ValueError) and meta["result"].args == ("no",)
    finally:
        celery.close()


# -- peek, forget, and what rpc:// cannot do -------------------------------------------------------


def test_peek_does_not_wait_and_forget_drops(served: Millpond) -> None:
    backend = served.backend
    assert backend is not None
    handle = served.send_task("rpc.add", (20, 22))
    start = time.monotonic()
    assert backend.peek(str(uuid.uuid4())) is None
    assert time.monotonic() - start < 0.5
    assert handle.get(timeout=30) == 42
    meta = backend.peek(handle.id)
    assert meta is not None and (meta.status, meta.result) == (TaskState.SUCCESS, 42)
    assert served.AsyncResult(handle.id).get(timeout=0) == 42  # a second handle reads it too
    handle.forget()
    assert backend.peek(handle.id) is None
    assert served.AsyncResult(handle.id).state == TaskState.PENDING
    # nobody waits: ready() (a peek) reads what has arrived, so a loop over it ends
    later = served.send_task("rpc.add", (1, 2))
    wait_until(lambda: served.AsyncResult(later.id).ready(), 30, "ready() to see the result")
    assert later.get(timeout=0) == 3


def test_another_process_is_told_it_cannot_read_rpc_results(
    served: Millpond, served_queue: str
) -> None:
    handle = served.send_task("rpc.add", (1, 1))
    assert handle.get(timeout=30) == 2
    env = {**os.environ, "MILLPOND_BROKER_URL": URL, "MILLPOND_RESULT_BACKEND": "rpc://"}
    done = subprocess.run(
        [sys.executable, "-m", "millpond", "result", handle.id],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done
    assert "only to the process that sent the task" in done.stderr
    assert "redis://" in done.stderr
    # the same in code: another app (another reply queue) that sent nothing
    other = Millpond("other", broker_url=URL, result_backend="rpc://", default_queue=served_queue)
    try:
        with pytest.raises(NotSupported, match="only to the process that sent the task"):
            other.AsyncResult(handle.id).get(timeout=1)
    finally:
        other.close()


def test_millpond_send_without_wait_asks_for_no_reply(queue: str, admin: Admin) -> None:
    """Nobody could read the result (only the sending process could, and it exits): the message
    names no reply queue, so the worker sends nothing and warns about nothing."""
    env = {
        **os.environ,
        "MILLPOND_BROKER_URL": URL,
        "MILLPOND_RESULT_BACKEND": "rpc://",
        "MILLPOND_DEFAULT_QUEUE": queue,
    }
    done = subprocess.run(
        [sys.executable, "-m", "millpond", "send", "rpc.add", "1", "2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    raw = admin.get(queue)
    assert raw is not None
    assert raw.properties["correlation_id"] == done.stdout.strip()
    assert "reply_to" not in raw.properties


def test_chords_and_groups_say_which_backend_can(producer: Millpond) -> None:
    add = producer.signature
    with pytest.raises(CanvasError, match="redis://"):
        chord([add("rpc.add", (1, 1))], add("rpc.add", (1,))).apply_async()
    backend = producer.backend
    assert backend is not None and not backend.supports_chords
    with pytest.raises(NotSupported, match=r"cannot join chords.*redis://"):
        backend.set_chord_size("g", 2)
    with pytest.raises(NotSupported, match=r"cannot save groups.*redis://"):
        producer.GroupResult("g", [producer.AsyncResult(str(uuid.uuid4()))]).save()


def test_rpc_needs_a_rabbitmq_broker_and_a_bare_url() -> None:
    app = Millpond("wrong", broker_url=f"memory://{unique()}", result_backend="rpc://")
    with pytest.raises(ConfigurationError, match="sends results over RabbitMQ"):
        _ = app.backend
    with pytest.raises(ConfigurationError, match="takes no host"):
        rpc.RpcResultBackend("rpc://rabbit:5672/")


# -- bounds and faults -----------------------------------------------------------------------------


def test_results_nobody_reads_are_bounded(
    spawn: Callable[..., WorkerProcess],
    producer: Millpond,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One worker thread runs them in order, so they arrive in order: beyond the limit the
    oldest results nobody asked for are dropped, with a warning; the newest are kept. (A worker
    of its own: the order needs `-c 1`.)"""
    monkeypatch.setattr(rpc, "BUFFER_LIMIT", 5)
    spawn("-P", "threads", "-c", "1")
    handles = [producer.send_task("rpc.add", (n, 0)) for n in range(9)]
    with caplog.at_level(logging.WARNING, logger="millpond.backend.rpc"):
        assert handles[-1].get(timeout=30) == 8
    assert [h.get(timeout=0) for h in handles[4:]] == [4, 5, 6, 7, 8]
    backend = producer.backend
    assert backend is not None
    assert [backend.peek(h.id) for h in handles[:4]] == [None] * 4
    assert "keeps at most 5 results nobody has asked for" in caplog.text


def test_worker_logs_a_caller_that_has_gone(caplog: pytest.LogCaptureFixture) -> None:
    broker = AmqpBroker(URL)
    backend = rpc.RpcResultBackend("rpc://")
    backend.bind_broker(broker)
    nobody = unique("nobody")
    try:
        with caplog.at_level(logging.WARNING, logger="millpond.backend.rpc"):
            for task_id in ("gone-1", "gone-2"):
                backend.store(
                    ResultMeta(task_id=task_id, status=TaskState.SUCCESS, result=1, reply_to=nobody)
                )
        # once per reply queue: a misconfigured caller does not flood the worker's log
        assert caplog.text.count("does not exist") == 1
        assert "gone-1" in caplog.text
        # no reply_to (the caller asked for no result): nothing is sent, nothing is logged
        caplog.clear()
        backend.store(ResultMeta(task_id="quiet", status=TaskState.SUCCESS, result=1))
        assert not caplog.text
    finally:
        broker.close()


@pytest.mark.fault
def test_reply_connection_lost_and_back(
    shared_worker: WorkerProcess,
    served_queue: str,
    admin: Admin,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The caller's connection drops while it waits: RabbitMQ deletes the reply queue; the
    waiting thread reconnects and declares it again, and a result sent after that arrives; so
    does the result of a task sent after the drop. Only this process's connection goes through
    the proxy: the shared worker's stays up."""
    gate = unique("mp-rpc-gate")
    declare_gate(gate)
    admin.queues.append(gate)
    with Proxy(("127.0.0.1", 5672)) as proxy:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}//"
        app = Millpond(
            "rpc-proxied", broker_url=url, result_backend="rpc://", default_queue=served_queue
        )
        try:
            assert app.send_task("rpc.add", (1, 1)).get(timeout=30) == 2
            name = reply_queue(app)
            held = app.send_task("rpc.gated", (gate, "after"))
            outcome: list[Any] = []
            waiter = threading.Thread(target=lambda: outcome.append(held.get(timeout=60)))
            with caplog.at_level(logging.WARNING, logger="millpond.backend.rpc"):
                waiter.start()
                before = proxy.accepted
                proxy.drop()

                def consumed_again() -> bool:
                    return proxy.accepted > before and admin.consumers(name) == 1

                wait_until(consumed_again, 20, "the waiter to reconnect and consume again")
                open_gate(gate)
                waiter.join(60)
            assert outcome == ["after"]
            assert "lost the rpc:// reply connection" in caplog.text
            # nobody waits now: the next send notices the dropped connection and reconnects first
            proxy.drop()
            wait_until(lambda: not admin.exists(name), 20, "RabbitMQ to delete the reply queue")
            assert app.send_task("rpc.add", (2, 2)).get(timeout=30) == 4
            assert reply_queue(app) == name
        finally:
            app.close()


# -- the guide -------------------------------------------------------------------------------------


def test_the_rpc_example_of_the_rabbitmq_guide_runs(queue: str, tmp_path: Path) -> None:
    env = clean_env(
        MILLPOND_BROKER_URL=URL,
        MILLPOND_RESULT_BACKEND="rpc://",
        MILLPOND_QUEUES=queue,
        MILLPOND_DEFAULT_QUEUE=queue,
    )
    guide = DOCS / "rabbitmq.md"
    assert re.search(r"```python\n", guide.read_text()[guide.read_text().index("### rpc://") :])
    worker = WorkerProcess(["-A", "examples.shop:app", "-P", "threads"], env, tmp_path, cwd=ROOT)
    try:
        worker.wait_ready()
        printed = run_guide(guide, env, start="### rpc://", worker_log=worker.stderr_path)
        assert "refund failed: order o-1 was never charged" in printed
    finally:
        worker.kill()
