"""The canvas on real in-process workers: chains, groups, chords, callbacks, map/starmap/chunks,
results and their relations, and the messages a canvas puts on the wire (Celery's layout).

Each test runs against the memory broker and the embedded sqlite broker (a real file, the
default broker); the cross-process chord join is tested with two worker processes sharing one
sqlite file."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from millpond import ChordError, GroupResult, Millpond, chain, chord, group, signature
from millpond.contracts.hooks import Hooks, Publication
from millpond.exceptions import PublishError, TaskRevokedError
from millpond.testing.fixtures import unique
from millpond.wire.protocol import decode_task, encode_task
from millpond_canvas import CanvasError, Signature

ROOT = Path(__file__).resolve().parents[3]  # the repository


class Ledger:
    """What errbacks and callbacks saw, from any thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[Any, ...]] = []
        self.changed = threading.Condition(self.lock)

    def add(self, *event: Any) -> None:
        with self.changed:
            self.events.append(event)
            self.changed.notify_all()

    def wait(self, count: int, timeout: float = 10) -> list[tuple[Any, ...]]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.events) >= count, timeout), self.events
            return list(self.events)


def canvas_app(broker_url: str) -> tuple[Millpond, Ledger]:
    queue = unique("canvas")
    app = Millpond("canvas", broker_url=broker_url, default_queue=queue, queues=[queue])
    ledger = Ledger()

    @app.task(name="t.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="t.tsum")
    def tsum(values: list[int]) -> int:
        return sum(values)

    @app.task(name="t.boom")
    def boom(x: Any = None) -> None:
        raise ValueError(f"boom {x}")

    @app.task(name="t.on_error")
    def on_error(request: Any, exc: BaseException, traceback: str | None) -> None:
        ledger.add("inline errback", request.id, type(exc).__name__, str(exc), bool(traceback))

    @app.task(name="t.on_error_id")
    def on_error_id(task_id: str) -> None:
        ledger.add("errback task", task_id)

    @app.task(name="t.record")
    def record(value: Any, label: str = "") -> Any:
        ledger.add("callback", label, value)
        return value

    calls: dict[str, int] = {}

    @app.task(name="t.flaky", max_retries=2, default_retry_delay=0.01, bind=True)
    def flaky(self: Any, x: int) -> int:
        calls[self.request.id] = calls.get(self.request.id, 0) + 1
        if calls[self.request.id] == 1:
            raise self.retry(countdown=0.01)
        return x * 2

    return app, ledger


@pytest.fixture(params=["memory", "sqlite"])
def app_and_ledger(
    request: pytest.FixtureRequest, tmp_path: Path, start_worker: Any
) -> Iterator[tuple[Millpond, Ledger]]:
    url = f"memory://{unique('mem')}" if request.param == "memory" else f"sqlite://{tmp_path}/b.db"
    app, ledger = canvas_app(url)
    running = start_worker(app, pool="threads", concurrency=4)
    yield app, ledger
    running.stop()
    app.close()


def test_a_chain_feeds_each_result_to_the_next_and_links_parents(
    app_and_ledger: tuple[Millpond, Ledger],
) -> None:
    app, _ = app_and_ledger
    add = app.tasks["t.add"]
    result = (add.s(1, 2) | add.s(10) | add.s(100))()
    assert result.get(timeout=10) == 113
    assert result.parent is not None and result.parent.get(timeout=10) == 13
    assert result.parent.parent is not None and result.parent.parent.get(timeout=10) == 3
    first = result.parent.parent
    # the worker stored each step's next step as its child, as Celery's does
    assert [c.id for c in first.children] == [result.parent.id]  # type: ignore[union-attr]
    assert [value for _, value in first.collect(timeout=10)] == [3, 13, 113]  # type: ignore[union-attr]


def test_an_immutable_step_ignores_the_previous_result(
    app_and_ledger: tuple[Millpond, Ledger],
) -> None:
    app, _ = app_and_ledger
    add = app.tasks["t.add"]
    assert chain(add.s(1, 1), add.si(5, 5), add.s(1))().get(timeout=10) == 11


def test_an_immutable_group_or_chord_ignores_the_previous_result(
    app_and_ledger: tuple[Millpond, Ledger],
) -> None:
    """`group(...).set(immutable=True)` (or `set_immutable(True)`) makes every member immutable,
    and a chord's the same of its header, and an immutable chain takes no partial arguments, as
    in Celery: the flag was kept on the group (or chain) alone, so the members got the previous
    result prepended (add(2, 2, 2): wrong arguments, the message dead-lettered)."""
    app, _ = app_and_ledger
    add, tsum = app.tasks["t.add"], app.tasks["t.tsum"]
    grouped = group(add.s(2, 2), add.s(3, 3)).set(immutable=True)
    assert chain(add.s(1, 1), grouped)().get(timeout=10) == [4, 6]
    joined = chord([add.s(2, 2), add.s(3, 3)], tsum.s())
    joined.set_immutable(True)
    assert chain(add.s(1, 1), joined)().get(timeout=10) == 10
    # an immutable chain (a callback here) gives its first step no partial arguments either
    then = chain(add.s(5, 5), add.s(1)).set(immutable=True)
    then_result = then.freeze()
    add.apply_async((1, 1), link=then)
    assert then_result.get(timeout=10) == 11


def test_a_group_runs_in_parallel_and_its_result_can_be_saved_and_restored(
    app_and_ledger: tuple[Millpond, Ledger],
) -> None:
    app, _ = app_and_ledger
    add = app.tasks["t.add"]
    result = group(add.s(i, i) for i in range(6))()
    assert isinstance(result, GroupResult)
    assert result.get(timeout=10) == [0, 2, 4, 6, 8, 10]
    assert result.completed_count() == 6 and result.ready()
    result.save()
    restored = GroupResult.restore(result.id, app)
    assert restored is not None
    assert [r.id for r in restored.results] == [r.id for r in result.results]
    assert restored.get(timeout=10) == [0, 2, 4, 6, 8, 10]


def test_a_header_task_sent_wrong_arguments_fails_the_chord_and_runs_the_errback(
    app_and_ledger: tuple[Millpond, Ledger],
) -> None:
    """A task whose arguments do not fit its function fails with a TypeError as on Celery's
    worker (its message is dead-lettered too): the chord fails with a ChordError and the chain's
    errback runs, where the chord waited for that part for ever."""
    app, ledger = app_and_ledger
    add, record, on_error_id = app.tasks["t.add"], app.tasks["t.record"], app.tasks["t.on_error_id"]
    bad = add.s(1, 2, 3)
    result = chord([add.s(1, 1), bad], record.s(label="never")).apply_async()
    with pytest.raises(ChordError, match="wrong arguments"):
        result.get(timeout=10)
    linked = add.s(1, 2, 3).on_error(on_error_id.s()) if hasattr(Signature, "on_error") else None
    step = add.s(1, 2, 3).set(link_error=on_error_id.s()) if linked is None else linked
    failed = step.apply_async()
    with pytest.raises(TypeError, match="wrong arguments"):
        failed.get(timeout=10)
    assert ("errback task", failed.id) in ledger.wait(1)
    assert not [e for e in ledger.events if e[1] == "never"]


def test_a_chord_runs_its_body_once_with_every_header_result_in_order(
    app_and_ledger: tuple[Millpond, Ledger],
) -> None:
    app, ledger = app_and_ledger
    add, record = app.tasks["t.add"], app.tasks["t.record"]
    result = chord((add.s(i, i) for i in range(10)), record.s(label="body"))()
    assert result.get(timeout=10) == [2 * i for i in range(10)]
    assert isinstance(result.parent, GroupResult)
    assert len(result.parent.results) == 10
    assert [e for e in ledger.wait(1) if e[1] == "body"] == [
        ("callback", "body", [2 * i for i in range(10)])
    ]


def test_a_failing_header_task_fails_the_body_with_a_chord_error_and_runs_its_errback_once(
    app_and_ledger: tuple[Millpond, Ledger],
) -> None:
    app, ledger = app_and_ledger
    add, boom, tsum = app.tasks["t.add"], app.tasks["t.boom"], app.tasks["t.tsum"]
    body = tsum.s()
    body.link_error(app.tasks["t.on_error"].s())
    result = chord([add.s(1, 1), boom.s("in the header"), add.s(2, 2)], body)()
    with pytest.raises(
        ChordError, match=r"Dependency .* raised ValueError\('boom in the header'\)"
    ):
        result.get(timeout=10)
    (event,) = ledger.wait(1)
    assert event[0] == "inline errback" and event[1] == result.id
    assert event[2] == "ChordError"


def test_link_and_both_kinds_of_link_error(app_and_ledger: tuple[Millpond, Ledger]) -> None:
    app, ledger = app_and_ledger
    add, boom = app.tasks["t.add"], app.tasks["t.boom"]
    ok = add.apply_async((2, 3), link=app.tasks["t.record"].s(label="linked"))
    assert ok.get(timeout=10) == 5
    failed = boom.apply_async(
        ("x",), link_error=[app.tasks["t.on_error"].s(), app.tasks["t.on_error_id"].s()]
    )
    with pytest.raises(ValueError, match="boom x"):
        failed.get(timeout=10)
    events = sorted(ledger.wait(3), key=str)
    assert ("callback", "linked", 5) in events
    assert ("errback task", failed.id) in events
    inline = next(e for e in events if e[0] == "inline errback")
    assert inline == ("inline errback", failed.id, "ValueError", "boom x", True)


def test_a_failed_step_stops_the_chain_and_fails_what_follows(
    app_and_ledger: tuple[Millpond, Ledger],
) -> None:
    app, ledger = app_and_ledger
    add, boom, record = app.tasks["t.add"], app.tasks["t.boom"], app.tasks["t.record"]
    result = (add.s(1, 1) | boom.s() | record.s(label="never"))()
    with pytest.raises(ValueError, match="boom 2"):
        result.get(timeout=10)  # the last step is stored with the failure that stopped it
    assert result.parent is not None
    assert result.parent.parent is not None and result.parent.parent.get(timeout=10) == 2
    assert not [e for e in ledger.events if e[1] == "never"]


def test_map_starmap_and_chunks(app_and_ledger: tuple[Millpond, Ledger]) -> None:
    app, _ = app_and_ledger
    add, tsum = app.tasks["t.add"], app.tasks["t.tsum"]
    assert add.starmap([(1, 2), (3, 4)]).delay().get(timeout=10) == [3, 7]
    assert tsum.map([[1, 2], [3, 4, 5]]).delay().get(timeout=10) == [3, 12]
    chunked = add.chunks([(i, i) for i in range(7)], 3)()
    assert chunked.get(timeout=10) == [[0, 2, 4], [6, 8, 10], [12]]


def test_a_chord_inside_a_chain_and_a_group_upgraded_to_a_chord(
    app_and_ledger: tuple[Millpond, Ledger],
) -> None:
    app, _ = app_and_ledger
    add, tsum = app.tasks["t.add"], app.tasks["t.tsum"]
    nested = (add.s(1, 1) | chord((add.si(i, i) for i in range(3)), tsum.s()) | add.s(1000))()
    assert nested.get(timeout=10) == 1006
    upgraded = (group(add.si(i, 1) for i in range(4)) | tsum.s())()  # Celery's group | s = chord
    assert upgraded.get(timeout=10) == 10


def test_a_chord_with_a_group_body_in_a_chord_header(
    app_and_ledger: tuple[Millpond, Ledger],
) -> None:
    """Each task of the inner chord's group body is a part of the outer join, as Celery counts
    it: the body's group was sent with two group ids (a TypeError in the worker that completed
    the inner join, its message requeued again and again, the outer chord PENDING for ever)."""
    app, _ = app_and_ledger
    add, tsum = app.tasks["t.add"], app.tasks["t.tsum"]
    inner = chord([add.s(1, 1), add.s(2, 2)], group(tsum.s(), tsum.s()))
    assert chord([inner, add.s(3, 3)], tsum.s())().get(timeout=10) == 18


@pytest.mark.parametrize("grouped", [False, True], ids=["task body", "group body"])
def test_a_failed_chord_in_a_chord_header_fails_the_outer_chord(
    app_and_ledger: tuple[Millpond, Ledger], grouped: bool
) -> None:
    """A chord in an outer chord's header whose own header fails returns its body's parts to
    the outer join as failed: the outer body is stored FAILURE with a ChordError naming the
    inner body. It used to wait for them for ever (PENDING), as a failed chain in a header
    would without its failed part."""
    app, _ = app_and_ledger
    add, tsum, boom = app.tasks["t.add"], app.tasks["t.tsum"], app.tasks["t.boom"]
    body = group(tsum.s(), tsum.s()) if grouped else tsum.s()
    inner = chord([boom.s(1), add.s(2, 2)], body)
    result = chord([inner, add.s(3, 3)], tsum.s())()
    with pytest.raises(ChordError, match=r"Dependency .* raised ChordError"):
        result.get(timeout=10)
    assert result.state == "FAILURE"


def test_a_retried_step_keeps_the_rest_of_its_chain(
    app_and_ledger: tuple[Millpond, Ledger],
) -> None:
    app, _ = app_and_ledger
    result = (app.tasks["t.add"].s(2, 3) | app.tasks["t.flaky"].s() | app.tasks["t.add"].s(1))()
    assert result.get(timeout=10) == 11


def test_the_wire_is_celerys_layout(memory_app: Millpond) -> None:
    """What a canvas puts in a message: the embed fields and headers Celery's workers read."""
    app = memory_app
    add = app.task(name="w.add")(lambda x, y: x + y)
    tsum = app.task(name="w.tsum")(sum)
    chain(add.s(1, 2), add.s(3), add.s(4))()
    chord([add.s(1, 1), add.s(2, 2)], tsum.s())()
    consumer = app.broker.consumer([app.settings.default_queue], 10)
    try:
        messages = [decode_task(d.message) for d in consumer.fetch(10, 2.0)]
    finally:
        consumer.close()
    first, *headers = messages
    steps = first.embed["chain"]
    assert [s["task"] for s in steps] == ["w.add", "w.add"]
    assert [s["args"] for s in steps] == [[4], [3]]  # reversed: the next step is the last
    assert all(s["subtask_type"] is None and s["immutable"] is False for s in steps)
    assert all("task_id" in s["options"] for s in steps)  # frozen: ids known to the caller
    assert [(m.group_id, m.group_index) for m in headers] == [
        (headers[0].group_id, 0),
        (headers[0].group_id, 1),
    ]
    body = headers[0].embed["chord"]
    assert body["task"] == "w.tsum" and "task_id" in body["options"]
    assert json.loads(json.dumps(body)) == body


def test_later_steps_go_to_the_queue_their_producer_meant(memory_app: Millpond) -> None:
    """The worker that sends a chain's next step, a chord's body or a link sends it to the queue
    the producer would have used (the task's own queue option), not to the worker's own queue."""
    app = memory_app
    add = app.task(name="q.add")(lambda x, y: x + y)
    report = app.task(name="q.report", queue="reports")(lambda values: values)
    chain(add.s(1, 2), report.s())()
    chord([add.s(1, 1)], report.s())()
    add.apply_async((1, 1), link=report.s())
    consumer = app.broker.consumer([app.settings.default_queue], 10)
    try:
        messages = [decode_task(d.message) for d in consumer.fetch(10, 2.0)]
    finally:
        consumer.close()
    chained, header, linked = messages
    assert chained.embed["chain"][-1]["options"]["queue"] == "reports"
    assert header.embed["chord"]["options"]["queue"] == "reports"
    assert linked.embed["callbacks"][0]["options"]["queue"] == "reports"
    # a step sent where the caller said keeps the caller's queue
    elsewhere = report.s().set(queue="elsewhere")
    elsewhere.freeze()
    assert elsewhere.options["queue"] == "elsewhere"


def test_a_signature_is_sent_with_its_tasks_own_options(memory_app: Millpond) -> None:
    """`task.s().apply_async()`, `.delay()`, a group's members and a chain's or chord's first
    tasks carry the task's declared options, as `task.apply_async()` does (Celery's too)."""
    app = memory_app
    reports = unique("reports")
    report = app.task(
        name="o.report", queue=reports, time_limit=5, soft_time_limit=2, priority=3, expires=600
    )(lambda *values: values)
    sent = [
        report.s(1).apply_async(),
        report.s(2).delay(),
        *group(report.s(3), report.s(4)).apply_async().results,
        chain(report.s(5), report.s()).apply_async().parent,
    ]
    chord([report.s(6)], report.s())()
    report.apply_async((7,))
    consumer = app.broker.consumer([reports], 10)
    try:
        deliveries = consumer.fetch(10, 2.0)
    finally:
        consumer.close()
    assert app.broker.queue_length(app.settings.default_queue) == 0, "sent to the default queue"
    assert len(deliveries) == 7
    messages = [decode_task(d.message) for d in deliveries]
    assert {m.task_id for m in messages} >= {r.id for r in sent}
    for d, m in zip(deliveries, messages, strict=True):
        assert (m.time_limit, m.soft_time_limit) == (5, 2), m.args
        assert d.message.properties.get("priority") == 3, m.args
        assert m.expires is not None and m.expires > time.time() + 500, m.args
    # what the call says still wins over the task's option
    report.s(8).apply_async(queue=app.settings.default_queue, time_limit=9)
    consumer = app.broker.consumer([app.settings.default_queue], 10)
    try:
        (override,) = [decode_task(d.message) for d in consumer.fetch(10, 2.0)]
    finally:
        consumer.close()
    assert (override.args, override.time_limit, override.soft_time_limit) == ((8,), 9, 2)


def test_signatures_round_trip_and_refuse_what_they_cannot_do(memory_app: Millpond) -> None:
    app = memory_app
    add = app.task(name="r.add")(lambda x, y: x + y)
    sig = add.s(1).set(countdown=5)
    again = Signature.from_dict(json.loads(json.dumps(sig)), app)
    assert (again.name, again.args, again.options) == ("r.add", [1], {"countdown": 5})
    assert sig(2) == 3  # calling a signature runs the task here, as Celery's does
    nested = Signature.from_dict(json.loads(json.dumps(chord([add.s(1, 1)], add.s(2)))), app)
    assert isinstance(nested, chord)
    with pytest.raises(CanvasError, match="not bound to an app"):
        signature("r.add", (1, 2)).delay()
    with pytest.raises(CanvasError, match="use a chord"):
        group([add.s(1, 1)]).link(add.s())
    with pytest.raises(CanvasError, match="not a signature"):
        Signature.from_dict({"args": []})


def test_a_chord_needs_a_backend_that_can_join() -> None:
    queue = unique("nojoin")
    app = Millpond("nojoin", broker_url=f"memory://{queue}", default_queue=queue)
    app.backend.supports_chords = False  # type: ignore[union-attr]
    add = app.task(name="n.add")(lambda x, y: x + y)
    with pytest.raises(CanvasError, match="a chord needs a result backend that joins"):
        chord([add.s(1, 1)], add.s(1))()


def test_a_malformed_canvas_field_dead_letters_the_message(memory_app: Millpond) -> None:
    from millpond.exceptions import MalformedMessage

    message = encode_task("x.add", (1, 2), {})
    message.body = json.dumps([[1, 2], {}, {"chain": [{"no": "task"}]}]).encode()
    with pytest.raises(MalformedMessage, match=r"embed chain\[0\] must be a signature"):
        decode_task(message)


def test_revoked_and_expired_results_are_stored_as_celery_stores_them(
    memory_app: Millpond, start_worker: Any
) -> None:
    app = memory_app
    add = app.task(name="e.add")(lambda x, y: x + y)
    start_worker(app, pool="solo")
    expired = add.apply_async((1, 2), expires=-1.0)
    with pytest.raises(TaskRevokedError, match="expired"):
        expired.get(timeout=10)
    meta = app.backend.peek(expired.id)  # type: ignore[union-attr]
    assert meta is not None and meta.status == "REVOKED"
    assert meta.result["exc_type"] == "TaskRevokedError"
    assert meta.result["exc_module"] == "celery.exceptions"
    assert isinstance(meta.result["exc_message"], list)


CHORD_WORKER = r"""
import sys
from millpond import Millpond
from millpond.config.settings import load_settings
from millpond.consume.worker import Worker

app = Millpond("xproc", broker_url=sys.argv[1], default_queue=sys.argv[2], queues=[sys.argv[2]])

@app.task(name="x.slow_add")
def slow_add(x, y):
    import time
    time.sleep(0.02)
    return x + y

@app.task(name="x.tsum")
def tsum(values):
    from pathlib import Path
    with open(Path(sys.argv[3]), "a") as fh:
        fh.write(f"{sum(values)}\n")
    return sum(values)

settings = load_settings({"pool": "threads", "concurrency": 2}, env={}, code=app.code_config)
Worker(app, settings=settings).run()
"""


def test_a_chord_header_split_between_two_worker_processes_runs_its_body_once(
    tmp_path: Path,
) -> None:
    url, queue, ledger = f"sqlite://{tmp_path}/x.db", unique("xproc"), tmp_path / "bodies.txt"
    script = tmp_path / "worker.py"
    script.write_text(CHORD_WORKER)
    workers = [
        subprocess.Popen([sys.executable, str(script), url, queue, str(ledger)], cwd=ROOT)
        for _ in range(2)
    ]
    app = Millpond("xproc-producer", broker_url=url, default_queue=queue)
    try:
        add, tsum = app.signature("x.slow_add"), app.signature("x.tsum")
        results = [chord((add.clone((i, n)) for i in range(20)), tsum.clone())() for n in range(5)]
        totals = [r.get(timeout=60) for r in results]
        assert totals == [sum(i + n for i in range(20)) for n in range(5)]
        assert sorted(int(x) for x in ledger.read_text().split()) == sorted(totals)
    finally:
        for proc in workers:
            proc.terminate()
        for proc in workers:
            proc.wait(30)
        app.close()


def test_each_step_of_a_chain_is_in_the_trace_of_the_step_that_sent_it(
    memory_app: Millpond, start_worker: Any, span_exporter: Any
) -> None:
    """publish -> process (step 1) -> publish (worker, for step 2) -> process (step 2) -> ..."""
    app = memory_app
    add = app.task(name="tr.add")(lambda x, y: x + y)
    start_worker(app, pool="threads", concurrency=2)
    span_exporter.clear()
    result = (add.s(1, 1) | add.s(2) | add.s(3))()
    assert result.get(timeout=10) == 7
    ids = [result.parent.parent.id, result.parent.id, result.id]  # type: ignore[union-attr]
    queue = app.settings.default_queue

    def spans_of(task_id: str, name: str) -> list[Any]:
        return [
            s
            for s in span_exporter.get_finished_spans()
            if s.name == name and s.attributes.get("messaging.message.id") == task_id
        ]

    def complete() -> bool:
        return all(spans_of(i, f"process {queue}") for i in ids)

    import time

    deadline = time.monotonic() + 10
    while not complete():
        assert time.monotonic() < deadline, "the chain's process spans did not all end"
        time.sleep(0.01)
    processes = [spans_of(i, f"process {queue}")[0] for i in ids]
    publishes = [spans_of(i, f"publish {queue}")[0] for i in ids]
    assert len({s.context.trace_id for s in [*processes, *publishes]}) == 1, "not one trace"
    for step in (1, 2):
        # the worker's publish of step N+1 is a child of step N's process span
        assert publishes[step].parent.span_id == processes[step - 1].context.span_id
        assert processes[step].parent.span_id == publishes[step].context.span_id


def test_a_join_claimed_by_a_worker_that_died_is_completed_by_a_redelivered_header_task(
    memory_app: Millpond, start_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker returned the last part, claimed the join, and died before sending the body: its
    header tasks' messages come back, find the results stored and the join claimed, wait for the
    claim to lapse, and then one of them sends the body, once."""
    from millpond.states import TaskState
    from millpond_broker_embedded import memory

    monkeypatch.setattr(memory, "CHORD_CLAIM_TTL", 0.5)
    app = memory_app
    ran: list[list[int]] = []
    part = app.task(name="cl.part")(lambda x: x)
    body = app.task(name="cl.body")(lambda values: ran.append(values) or sum(values))
    result = chord([part.s(1), part.s(2)], body.s())()
    header = result.parent
    backend = app.backend
    assert backend is not None
    # the "dead worker": both header tasks ran, their parts returned, the join claimed, no body
    for index, (member, value) in enumerate(zip(header.results, (1, 2), strict=True)):
        from millpond.contracts.backend import ResultMeta

        backend.store(ResultMeta(task_id=member.id, status=TaskState.SUCCESS, result=value))
        parts = backend.chord_part_return(header.id, member.id, index, "SUCCESS", value)
    assert parts is not None  # it had the join, and died with it
    # its messages come back (delivered once already, never acknowledged)
    consumer = app.broker.consumer([app.settings.default_queue], 10)
    try:
        for delivery in consumer.fetch(10, 2.0):
            consumer.reject(delivery, requeue=True)
    finally:
        consumer.close()
    start_worker(app, pool="threads", concurrency=2)
    assert result.get(timeout=10) == 3
    assert ran == [[1, 2]]


# -- publishing together -----------------------------------------------------------------------------


class PublishLog(Hooks):
    """Which publishes the hooks saw begin and end, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def before_publish(self, publication: Publication) -> Any:
        self.seen.append(("before", publication.task_id))
        return publication.task_id

    def after_publish(
        self, publication: Publication, token: Any, error: BaseException | None
    ) -> None:
        assert token == publication.task_id
        self.seen.append(("after" if error is None else "failed", publication.task_id))


def test_publishing_together_hands_the_block_to_the_broker_at_its_end() -> None:
    queue = unique("together")
    app = Millpond("together", broker_url=f"memory://{queue}", default_queue=queue)
    log = PublishLog()
    app.add_hooks(log)
    with app.publishing_together():
        first = app.send_task("t.a")
        with app.publishing_together():  # joins the outer block
            second = app.send_task("t.b")
        assert app.broker.queue_length(queue) == 0, "published before the block ended"
    assert app.broker.queue_length(queue) == 2
    ids = [first.id, second.id]
    assert log.seen == [
        ("before", ids[0]),
        ("before", ids[1]),
        ("after", ids[0]),
        ("after", ids[1]),
    ]
    app.send_task("t.c")  # outside a block: at once
    assert app.broker.queue_length(queue) == 3
    app.close()


def test_a_group_is_published_in_one_batch_and_a_failed_batch_fails_every_publish() -> None:
    queue = unique("together")
    app = Millpond("together", broker_url=f"memory://{queue}", default_queue=queue)
    log = PublishLog()
    app.add_hooks(log)
    batches: list[int] = []
    real = app.broker.publish_many

    def recording(batch: Any) -> None:
        batches.append(len(batch))
        if len(batch) == 3:
            raise PublishError("the broker is gone")
        real(batch)

    app.broker.publish_many = recording  # type: ignore[method-assign]
    group(signature("t.x", (i,), app=app) for i in range(5)).apply_async()
    assert batches == [5] and app.broker.queue_length(queue) == 5
    with pytest.raises(PublishError, match="the broker is gone"):
        group(signature("t.x", (i,), app=app) for i in range(3)).apply_async()
    assert [kind for kind, _ in log.seen[-3:]] == ["failed"] * 3
    app.close()


def test_a_batch_the_broker_took_in_part_reports_only_the_rest_as_failed() -> None:
    """A broker that names the task ids it did not take (`PublishError.not_sent`, RabbitMQ after
    its nack retries) stored the others: their publish hooks see them sent, only the rest fail."""
    queue = unique("together")
    app = Millpond("together", broker_url=f"memory://{queue}", default_queue=queue)
    log = PublishLog()
    app.add_hooks(log)
    real = app.broker.publish_many

    def partly(batch: Any) -> None:
        real(batch[:1])
        error = PublishError("nacked 2 of 3")
        error.not_sent = frozenset(item.message.task_id for item in batch[1:])
        raise error

    app.broker.publish_many = partly  # type: ignore[method-assign]
    sigs = [signature("t.x", (i,), app=app) for i in range(3)]
    with pytest.raises(PublishError, match="nacked 2 of 3"):
        group(sigs).apply_async()
    ends = [(kind, tid) for kind, tid in log.seen if kind != "before"]
    assert [kind for kind, _ in ends] == ["after", "failed", "failed"]
    assert app.broker.queue_length(queue) == 1
    app.close()


def test_a_chord_refuses_a_header_chain_that_ends_in_a_group(
    app_and_ledger: tuple[Millpond, Ledger],
) -> None:
    app, _ = app_and_ledger
    add, tsum = app.tasks["t.add"], app.tasks["t.tsum"]
    header = [chain(add.s(1, 1), group(add.s(10), add.s(20))), add.s(100, 100)]
    with pytest.raises(CanvasError, match="ends in a group cannot be a member of a chord"):
        chord(header, tsum.s())()
    # a chain whose group is followed by a task is a chord itself, and fine in a header
    fine = [chain(add.s(1, 1), group(add.s(10), add.s(20)), tsum.s()), add.s(100, 100)]
    assert chord(fine, tsum.s())().get(timeout=10) == 34 + 200


def test_options_given_to_a_chord_reach_its_body(start_worker: Any) -> None:
    """`chord(...).apply_async(queue=..., priority=...)` sends the body with them too, as Celery's
    `chord.run` does (`body.options.update(options)`); `countdown` delays the header only. The
    body used to go to the app's default queue, where a worker of the named queue never saw it."""
    home, elsewhere = unique("home"), unique("elsewhere")
    app = Millpond("opts", broker_url=f"memory://{unique('mem')}", default_queue=home)
    add = app.task(name="c.add")(lambda x, y: x + y)
    tsum = app.task(name="c.tsum")(sum)
    # on the wire: the body the header carries has the chord's options, not its countdown
    chord([add.s(1, 1)], tsum.s()).apply_async(
        queue=elsewhere, priority=4, time_limit=7, countdown=0.01
    )
    consumer = app.broker.consumer([elsewhere], 10)
    try:
        (header,) = [decode_task(d.message) for d in consumer.fetch(10, 2.0)]
    finally:
        consumer.close()
    body = header.embed["chord"]["options"]
    assert (body["queue"], body["priority"], body["time_limit"]) == (elsewhere, 4, 7)
    assert "countdown" not in body
    # and on a worker that consumes only the named queue, the chord completes
    running = start_worker(app, pool="threads", concurrency=2, queues=(elsewhere,))
    try:
        result = chord([add.s(1, 1), add.s(2, 2)], tsum.s()).apply_async(queue=elsewhere)
        assert result.get(timeout=5) == 6
    finally:
        running.stop()
        app.close()
