"""The worker end to end on the memory:// broker: results, errors, retries, dead letters, spans."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import structlog
import structlog.testing

from millpond import Millpond, TaskError
from millpond.contracts.broker import dead_letter_queue
from millpond.exceptions import MaxRetriesExceededError, TaskRevokedError
from millpond.exceptions import TimeoutError as MillpondTimeout
from millpond.produce.result import rebuild_exception
from millpond.testing.harness import wait_until
from millpond.wire.protocol import DEATH_REASON, Message, encode_task


class ShopError(Exception):
    pass


def register(app: Millpond) -> dict[str, Any]:
    calls: dict[str, int] = {}

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    @app.task
    def fail(message: str) -> None:
        raise ValueError(message)

    @app.task
    def fail_with(kind: str) -> None:
        if kind == "key":
            raise KeyError("sku-1")
        raise ShopError("order", 42, object())

    @app.task
    def fail_custom() -> None:
        raise ShopError("custom")

    @app.task(bind=True, max_retries=3)
    def flaky(self, until: int) -> int:  # type: ignore[no-untyped-def]
        calls["flaky"] = calls.get("flaky", 0) + 1
        if self.request.retries < until:
            self.retry(countdown=0.05)
        return self.request.retries

    @app.task(autoretry_for=(ConnectionError,), max_retries=2, retry_backoff=0.01)
    def always_down() -> None:
        calls["down"] = calls.get("down", 0) + 1
        raise ConnectionError("still down")

    @app.task(acks_late=False)
    def early(x: int) -> int:
        return x

    @app.task
    def started_at() -> float:
        return time.time()

    return {
        "add": add,
        "fail": fail,
        "fail_custom": fail_custom,
        "fail_with": fail_with,
        "flaky": flaky,
        "always_down": always_down,
        "early": early,
        "started_at": started_at,
        "calls": calls,
    }


def test_results_and_errors_round_trip(memory_app: Millpond, start_worker: Any) -> None:
    t = register(memory_app)
    start_worker(memory_app, pool="solo")
    assert t["add"].delay(2, 3).get(timeout=10) == 5
    with pytest.raises(ValueError, match=r"^boom$"):
        t["fail"].delay("boom").get(timeout=10)
    with pytest.raises(ShopError, match="custom"):  # its module is imported here: rebuilt as itself
        t["fail_custom"].delay().get(timeout=10)
    result = t["fail"].delay("x")
    assert isinstance(result.get(timeout=10, propagate=False), ValueError)
    assert (
        result.status == "FAILURE"
        and result.failed()
        and "ValueError: x" in (result.traceback or "")
    )


def test_a_failure_is_stored_with_its_args_as_celery_stores_it(
    memory_app: Millpond, start_worker: Any
) -> None:
    """The result store keeps an exception's args (not its str), so it is rebuilt as raised:
    `KeyError('sku-1')`, not `KeyError("'sku-1'")`; an arg JSON cannot carry is kept as its repr."""
    t = register(memory_app)
    start_worker(memory_app, pool="threads")
    key = t["fail_with"].delay("key")
    error = key.get(timeout=10, propagate=False)
    assert isinstance(error, KeyError) and error.args == ("sku-1",)
    meta = memory_app.backend.peek(key.id)
    assert meta is not None and meta.result["exc_message"] == ["sku-1"]
    custom = t["fail_with"].delay("custom").get(timeout=10, propagate=False)
    assert isinstance(custom, ShopError) and custom.args[:2] == ("order", 42)
    assert custom.args[2].startswith("<object object at")


def test_get_times_out_with_a_clear_error(memory_app: Millpond) -> None:
    t = register(memory_app)
    result = t["add"].delay(1, 1)  # no worker running
    with pytest.raises(MillpondTimeout, match=r"not ready after 0\.2s"):
        result.get(timeout=0.2)
    assert result.status == "PENDING" and not result.ready()


def test_retry_then_success(memory_app: Millpond, start_worker: Any) -> None:
    t = register(memory_app)
    start_worker(memory_app, pool="solo")
    assert t["flaky"].delay(2).get(timeout=10) == 2
    assert t["calls"]["flaky"] == 3


def test_autoretry_gives_up_after_max_retries(memory_app: Millpond, start_worker: Any) -> None:
    t = register(memory_app)
    start_worker(memory_app, pool="solo")
    with pytest.raises(ConnectionError, match="still down"):
        t["always_down"].delay().get(timeout=10)
    assert t["calls"]["down"] == 3  # the first run and two retries


def test_retry_budget_exhausted_without_exception(memory_app: Millpond, start_worker: Any) -> None:
    t = register(memory_app)
    start_worker(memory_app, pool="solo")
    with pytest.raises(MaxRetriesExceededError):
        t["flaky"].delay(10).get(timeout=10)


def dead_letters(app: Millpond) -> list[Message]:
    return app.broker.dead_letters(app.settings.default_queue)


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (encode_task("no.such.task", [1], {}), "unknown task 'no.such.task'"),
        (Message(body=b"{oops", headers=encode_task("x").headers), "not valid JSON"),
        (None, "wrong arguments for task"),
    ],
)
def test_bad_messages_are_dead_lettered_and_the_worker_goes_on(
    memory_app: Millpond, start_worker: Any, message: Message | None, reason: str
) -> None:
    t = register(memory_app)
    if message is None:
        message = encode_task(t["add"].name, [1, 2, 3], {})
    queue = memory_app.settings.default_queue
    start_worker(memory_app, pool="solo")
    memory_app.broker.publish(queue, message)
    assert t["add"].delay(1, 2).get(timeout=10) == 3  # still working after the bad one
    deadline = time.monotonic() + 5
    while not dead_letters(memory_app) and time.monotonic() < deadline:
        time.sleep(0.01)
    dead = dead_letters(memory_app)
    assert len(dead) == 1, f"expected one message in {dead_letter_queue(queue)}"
    assert reason in dead[0].headers[DEATH_REASON]


def test_a_retry_carries_the_headers_its_message_came_with(
    memory_app: Millpond, start_worker: Any
) -> None:
    """A producer's own headers (a tenant, a request id) reach every run, as Celery's retry
    keeps them; the ones a message is built with are the retry's own."""
    seen: list[tuple[int, Any, Any]] = []

    @memory_app.task(name="mem.tenant_retry", bind=True, default_retry_delay=0)
    def tenant_retry(self: Any) -> str:
        headers = self.request.job.headers
        seen.append((self.request.retries, headers.get("tenant"), headers.get("retries")))
        if self.request.retries < 1:
            raise self.retry(countdown=0)
        return str(headers.get("tenant"))

    start_worker(memory_app, pool="solo")
    result = tenant_retry.apply_async(headers={"tenant": "acme"})
    assert result.get(timeout=10) == "acme"
    assert seen == [(0, "acme", 0), (1, "acme", 1)]


def test_wrong_arguments_fail_the_task_for_its_caller_and_dead_letter_the_message(
    memory_app: Millpond, start_worker: Any
) -> None:
    """As on Celery's worker, the caller's `get()` raises the TypeError at once (it waited for
    ever); the message is still dead-lettered, to replay once the producer is fixed."""
    t = register(memory_app)
    start_worker(memory_app, pool="solo")
    with pytest.raises(TypeError, match=r"wrong arguments for task .*add"):
        t["add"].apply_async((1, 2, 3)).get(timeout=10)
    wait_until(lambda: dead_letters(memory_app), 10, "the message in the dead-letter queue")
    assert "wrong arguments" in dead_letters(memory_app)[0].headers[DEATH_REASON]


def test_early_ack_and_expiry(memory_app: Millpond, start_worker: Any) -> None:
    t = register(memory_app)
    with structlog.testing.capture_logs() as logged:
        expired = t["add"].apply_async((1, 1), expires=time.time() - 1)
        start_worker(memory_app, pool="solo")
        assert t["early"].delay(7).get(timeout=10) == 7
        with pytest.raises(TaskRevokedError, match="expired"):
            expired.get(timeout=10)
    told = [e for e in logged if e["event"].startswith("task not run: expired")]
    assert len(told) == 1, logged
    assert told[0]["log_level"] == "info" and told[0]["task_id"] == expired.id


def test_countdown_is_held_by_the_broker(memory_app: Millpond, start_worker: Any) -> None:
    t = register(memory_app)
    start_worker(memory_app, pool="solo")
    sent = time.time()
    started = t["started_at"].apply_async(countdown=0.5).get(timeout=10)
    assert started - sent >= 0.45


def test_unknown_options_fail_early(memory_app: Millpond) -> None:
    with pytest.raises(TypeError, match="unknown task option"):
        memory_app.task(retries=3)(lambda: None)
    t = register(memory_app)
    with pytest.raises(TypeError, match="unknown option"):
        t["add"].apply_async((1, 2), countdonw=3)


@pytest.mark.parametrize("key", ["time_limit", "soft_time_limit", "expires", "default_retry_delay"])
@pytest.mark.parametrize("value", [-1, float("nan"), float("inf"), "5", True])
def test_a_time_option_that_is_not_a_finite_number_fails_at_declaration(
    memory_app: Millpond, key: str, value: Any
) -> None:
    with pytest.raises(TypeError, match=f"task option '{key}' must be a finite number >= 0"):
        memory_app.task(**{key: value})(lambda: None)


def test_join_reraises_task_errors(memory_app: Millpond, start_worker: Any) -> None:
    t = register(memory_app)
    start_worker(memory_app, pool="solo")
    t["fail"].delay("from join")
    with pytest.raises(ValueError, match="from join"):
        memory_app.broker.join(memory_app.settings.default_queue, timeout=10)


def test_warm_stop_exits_zero(memory_app: Millpond, start_worker: Any) -> None:
    register(memory_app)
    running = start_worker(memory_app, pool="solo")
    assert running.stop() == 0


def test_time_limit_on_solo_warns(memory_app: Millpond, start_worker: Any) -> None:
    from structlog.testing import capture_logs

    @memory_app.task(time_limit=5)
    def limited() -> str:
        return "ran"

    with capture_logs() as logs:
        start_worker(memory_app, pool="solo")
        assert limited.delay().get(timeout=10) == "ran"
    warnings = [e["event"] for e in logs if e["log_level"] == "warning"]
    assert any("solo pool cannot enforce" in w and "time_limit=5s" in w for w in warnings), warnings


def test_time_limit_on_solo_refused_when_strict(memory_app: Millpond) -> None:
    from millpond.consume.worker import Worker
    from millpond.exceptions import MillpondError

    @memory_app.task(time_limit=5)
    def limited() -> None: ...

    worker = Worker(memory_app, pool="solo", unsupported_options="error")
    with pytest.raises(MillpondError, match="unsupported_options = error"):
        worker.run()


def test_span_tree_publish_process_body(
    memory_app: Millpond, start_worker: Any, span_exporter: Any
) -> None:
    """publish -> process -> the body's own span, one trace; the body runs inside `process`."""
    from opentelemetry import trace

    @memory_app.task
    def traced_add(x: int, y: int) -> int:
        with trace.get_tracer("shop").start_as_current_span("add numbers"):
            return x + y

    start_worker(memory_app, pool="solo")
    span_exporter.clear()
    result = traced_add.delay(2, 2)
    assert result.get(timeout=10) == 4
    queue = memory_app.settings.default_queue
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        spans = {s.name: s for s in span_exporter.get_finished_spans()}
        if {f"publish {queue}", f"process {queue}", "add numbers"} <= set(spans):
            break
        time.sleep(0.01)
    publish, process, body = (
        spans[f"publish {queue}"],
        spans[f"process {queue}"],
        spans["add numbers"],
    )
    assert process.parent is not None and process.parent.span_id == publish.context.span_id
    assert body.parent is not None and body.parent.span_id == process.context.span_id
    assert publish.context.trace_id == process.context.trace_id == body.context.trace_id
    assert process.attributes["messaging.message.id"] == result.id
    assert process.attributes["messaging.destination.name"] == queue
    assert process.attributes["messaging.operation.type"] == "process"
    assert process.attributes["millpond.pool"] == "solo"
    assert json.dumps(dict(process.attributes))  # attribute values are plain
    assert not [s for s in spans if s.startswith("run ")], "one span per task, not two"


def test_unknown_error_types_become_task_errors() -> None:
    err = rebuild_exception(
        {
            "exc_type": "PaymentDeclined",
            "exc_module": "billing.not.imported",
            "exc_message": ["card expired"],
        }
    )
    assert isinstance(err, TaskError)
    assert type(err).__name__ == "PaymentDeclined"
    assert "card expired" in str(err)


def test_worker_survives_a_broker_that_raises(
    memory_app: Millpond, start_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consumer that raises (instead of reconnecting inside fetch) does not stop the worker."""
    from millpond_broker_embedded.memory import MemoryConsumer

    t = register(memory_app)
    real_fetch = MemoryConsumer.fetch
    failures = {"left": 2}

    def flaky_fetch(self: MemoryConsumer, *args: Any, **kwargs: Any) -> Any:
        if failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("broker went away")
        return real_fetch(self, *args, **kwargs)

    monkeypatch.setattr(MemoryConsumer, "fetch", flaky_fetch)
    running = start_worker(memory_app, pool="solo")
    assert t["add"].delay(4, 4).get(timeout=10) == 8
    assert failures["left"] == 0
    assert running.thread.is_alive()


def test_solo_prefetch_window_defaults_to_its_pool_and_yields_to_the_user(
    memory_app: Millpond,
) -> None:
    from millpond.config.settings import load_settings
    from millpond.consume.worker import Worker

    solo = Worker(memory_app, settings=load_settings({"pool": "solo"}, env={}))
    assert solo.prefetch == 64  # the solo pool's default multiplier
    chosen = Worker(
        memory_app, settings=load_settings({"pool": "solo", "prefetch_multiplier": 2}, env={})
    )
    assert chosen.prefetch == 2
    threads = Worker(
        memory_app, settings=load_settings({"pool": "threads", "concurrency": 3}, env={})
    )
    assert threads.prefetch == 12


def test_the_banner_carries_the_lines_hooks_describe(memory_app: Millpond) -> None:
    """A hook names where it serves (the health plugin's probe port) in the start-up banner."""
    from millpond.config.settings import load_settings
    from millpond.consume.worker import Worker
    from millpond.contracts.hooks import Hooks, WorkerView
    from millpond_cli.main import banner

    class Serving(Hooks):
        def describe_worker(self, worker: WorkerView) -> str:
            return f"serving:     {worker.name} on port 1"

    memory_app.add_hooks(Serving())
    worker = Worker(memory_app, settings=load_settings({"pool": "solo"}, env={}))
    assert f"\n  serving:     {worker.name} on port 1\n" in banner(worker)


class FetchSpy:
    """Whether the loop's waker was set as each fetch began: a fetch that starts with it set
    returns at once (a loop that keeps doing so spins; one that starts with it cleared waits out
    its timeout though the loop had something to do)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from millpond_broker_embedded.memory import MemoryConsumer

        self.woken: list[bool] = []
        real_fetch = MemoryConsumer.fetch

        def spied(consumer: MemoryConsumer, room: int, timeout: float, waker: Any) -> Any:
            self.woken.append(waker is not None and waker.is_set)
            return real_fetch(consumer, room, timeout, waker)

        monkeypatch.setattr(MemoryConsumer, "fetch", spied)


def test_an_idle_worker_woken_with_nothing_to_do_goes_back_to_waiting(
    memory_app: Millpond, start_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A remote-control call (or any wake-up) with no completion behind it is acted on, then the
    loop waits again: it does not keep fetching in a busy loop until the next task finishes."""
    spy = FetchSpy(monkeypatch)
    running = start_worker(memory_app, pool="threads", concurrency=2)
    called: list[int] = []
    running.worker.call_soon(lambda: called.append(len(spy.woken)))
    running.worker.inbox.waker.wake()  # as a control command that changed the buffer does
    wait_until(lambda: called, 10, "the call to run on the loop")
    wait_until(lambda: len(spy.woken) >= called[0] + 4, 10, "four more fetches")
    # each of the two wake-ups may land after the call ran and is then acted on once; a spinning
    # loop starts every fetch with the waker still set
    assert spy.woken[called[0] : called[0] + 4].count(True) <= 2, spy.woken
    assert running.stop() == 0


def test_a_call_made_while_a_solo_task_runs_is_not_left_for_the_next_fetch_timeout(
    memory_app: Millpond, start_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Solo runs the task on the loop's thread and settles it mid-turn; a call (or a stop) that
    woke the loop meanwhile must still end the fetch that follows, not wait out its timeout."""
    import threading

    spy = FetchSpy(monkeypatch)
    release, finished = threading.Event(), threading.Event()

    @memory_app.task(name="solo.hold")
    def hold() -> None:
        assert release.wait(10)
        finished.set()

    running = start_worker(memory_app, pool="solo")
    hold.delay()
    wait_until(lambda: running.worker.pool.active, 10, "the task to start")
    called: list[bool] = []
    running.worker.call_soon(lambda: called.append(True))
    fetches_before = len(spy.woken)
    release.set()
    wait_until(lambda: called, 10, "the call to run on the loop")
    assert finished.is_set()
    first_after = spy.woken[fetches_before:][:1]
    assert first_after in ([], [True]), spy.woken  # none, or one that returned at once
    assert running.stop() == 0


def test_retry_past_its_budget_raises_in_the_task_as_celerys_does(
    memory_app: Millpond, start_worker: Any
) -> None:
    """Celery's `self.retry()` raises `MaxRetriesExceededError` (or the `exc` it was given) inside
    the task once the budget is spent, so the task can catch it and give up its own way."""

    @memory_app.task(bind=True, max_retries=1)
    def give_up(self, with_exc: bool, limit: int | None = None) -> str:  # type: ignore[no-untyped-def]
        try:
            self.retry(exc=ShopError("down") if with_exc else None, countdown=0, max_retries=limit)
        except MaxRetriesExceededError:
            return f"gave up after {self.request.retries}"
        except ShopError:
            return f"gave up on the error after {self.request.retries}"
        return "not reached"

    start_worker(memory_app, pool="solo")
    assert give_up.delay(False).get(timeout=10) == "gave up after 1"
    assert give_up.delay(True).get(timeout=10) == "gave up on the error after 1"
    assert give_up.delay(False, 2).get(timeout=10) == "gave up after 2"  # the call's limit wins


def test_result_of_a_retrying_or_revoked_task_is_its_exception(
    memory_app: Millpond, start_worker: Any
) -> None:
    """As Celery's: `.result` (and `.info`) in RETRY and REVOKED hold the exception, not its
    stored form."""

    @memory_app.task(bind=True)
    def later(self) -> None:  # type: ignore[no-untyped-def]
        self.retry(exc=ShopError("not yet"), countdown=60)

    t = register(memory_app)
    expired = t["add"].apply_async((1, 1), expires=time.time() - 1)
    start_worker(memory_app, pool="solo")
    retrying = later.delay()
    wait_until(lambda: retrying.state == "RETRY", 10, "the task to be in RETRY")
    assert isinstance(retrying.result, ShopError) and retrying.result.args == ("not yet",)
    assert isinstance(retrying.info, ShopError)
    assert isinstance(expired.get(timeout=10, propagate=False), TaskRevokedError)
    assert isinstance(expired.result, TaskRevokedError) and "expired" in str(expired.result)


def test_a_forgotten_result_reads_pending_as_celerys_does(
    memory_app: Millpond, start_worker: Any
) -> None:
    t = register(memory_app)
    start_worker(memory_app, pool="solo")
    result = t["add"].delay(1, 2)
    assert result.get(timeout=10) == 3 and result.state == "SUCCESS"
    result.forget()
    assert result.state == "PENDING" and result.result is None and not result.ready()


def test_a_retry_keeps_the_priority_it_was_sent_with(
    memory_app: Millpond, start_worker: Any
) -> None:
    """As Celery's `signature_from_request`: the retry goes out with the message's priority."""
    from millpond.contracts.hooks import Hooks, Publication

    seen: list[tuple[int, Any]] = []

    class Seen(Hooks):
        def before_publish(self, publication: Publication) -> None:
            seen.append((publication.retries, publication.message.properties.get("priority")))

    @memory_app.task(bind=True)
    def urgent(self) -> int:  # type: ignore[no-untyped-def]
        if self.request.retries < 1:
            self.retry(countdown=0)
        return self.request.retries

    memory_app.add_hooks(Seen())
    start_worker(memory_app, pool="solo")
    assert urgent.apply_async(priority=7).get(timeout=10) == 1
    assert seen == [(0, 7), (1, 7)]


def test_str_of_a_result_is_its_task_id_as_celerys_is(memory_app: Millpond) -> None:
    """Celery code stores `str(result)` as the task id (a row, a JSON reply): it must be the id."""
    t = register(memory_app)
    result = t["add"].delay(1, 2)  # no worker needed
    assert str(result) == f"{result}" == result.id
    assert repr(result) == f"<AsyncResult {result.id}>"
