"""Rate limits: Celery's rate strings, the per-worker token bucket, and the lanes that keep limited
messages beside the prefetch window (all on an injected clock: no sleeps)."""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest

from millpond import Millpond
from millpond.consume.worker import Worker
from millpond.contracts.pool import Job
from millpond.exceptions import MillpondError
from millpond_ratelimit import (
    Gate,
    InvalidRateLimit,
    RateLimits,
    SharedLimiter,
    TokenBucket,
    describe_rate,
    parse_rate,
)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def job(name: str = "limited", n: int = 0, *, held: bool = True) -> Job:
    return Job(
        task_id=f"{name}-{n}",
        task_name=name,
        args=(),
        kwargs={},
        delivery=object() if held else None,
    )


class HandBacks:
    """Records what the gate gives back to the broker (and can refuse, like a broker that is away)."""

    def __init__(self, accept: bool = True) -> None:
        self.accept = accept
        self.sent: list[tuple[str, float]] = []

    def __call__(self, j: Job, delay: float) -> bool:
        if self.accept:
            self.sent.append((j.task_id, delay))
        return self.accept


def gate(clock: Clock, hand_back: HandBacks | None = None, **kw: Any) -> Gate:
    kw.setdefault("parking", 4)
    kw.setdefault("max_hold", 60.0)
    return Gate(hand_back=hand_back or HandBacks(), clock=clock, **kw)


def limits_of(worker: Worker) -> RateLimits:
    """The worker's rate-limit component (the `ratelimit` entry point of this package)."""
    found = worker.components["ratelimit"]
    assert isinstance(found, RateLimits)
    return found


# -- parsing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "per_second"),
    [
        ("10/s", 10.0),
        ("10/m", 10 / 60),
        ("10/h", 10 / 3600),
        ("2.5/s", 2.5),
        ("7", 7.0),
        (" 30 / M ", 0.5),
        (5, 5.0),
        (0.5, 0.5),
        ("0.5", 0.5),
    ],
)
def test_celery_rate_strings(text: str | float, per_second: float) -> None:
    assert parse_rate(text) == pytest.approx(per_second)


@pytest.mark.parametrize("off", [None, "", "0", 0, "0/m", 0.0])
def test_zero_and_empty_mean_no_limit(off: str | float | None) -> None:
    assert parse_rate(off) is None


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("10/d", "unit 'd'"),
        ("ten/m", "does not start with a number"),
        ("-1/s", "negative"),
        (-3, "negative"),
        (True, "not a rate"),
        ("inf", "finite"),
        ([10], "not a rate"),
    ],
)
def test_bad_rates_say_what_is_allowed(bad: Any, says: str) -> None:
    with pytest.raises(InvalidRateLimit, match=says):
        parse_rate(bad)


def test_describe_rate() -> None:
    assert describe_rate(parse_rate("10/m")) == "10/m"
    assert describe_rate(parse_rate("3/s")) == "3/s"
    assert describe_rate(parse_rate("5/h")) == "5/h"
    assert describe_rate(None) == "no limit"


def test_task_option_is_checked_when_declared() -> None:
    app = Millpond("decl", broker_url="memory://")

    @app.task(rate_limit="10/m")
    def fine() -> None: ...

    assert fine.options.rate_limit == "10/m"
    with pytest.raises(TypeError, match=r"rate_limit.*unit 'x'"):

        @app.task(rate_limit="10/x")
        def typo() -> None: ...

    with pytest.raises(TypeError, match="rate_limit_scope"):

        @app.task(rate_limit="1/s", rate_limit_scope="cluster")
        def scoped() -> None: ...


# -- the bucket ----------------------------------------------------------------------------------


def test_bucket_starts_full_and_refills_at_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(2.0, clock=clock)  # 2 per second, capacity 1 (Celery's)
    assert bucket.take()
    assert not bucket.take()
    assert bucket.wait() == pytest.approx(0.5)
    clock.advance(0.25)
    assert not bucket.take()
    assert bucket.wait() == pytest.approx(0.25)
    clock.advance(0.25)
    assert bucket.take()


def test_bucket_never_saves_more_than_its_capacity() -> None:
    clock = Clock()
    bucket = TokenBucket(1.0, clock=clock)
    clock.advance(3600)  # idle for an hour: still one token, no burst
    assert bucket.take()
    assert not bucket.take()


# -- lanes ---------------------------------------------------------------------------------------


def drain_over(g: Gate, clock: Clock, seconds: float) -> list[float]:
    """Run the gate as the worker loop does (take what is due, sleep until `next_due`) for
    `seconds` of the test clock; the times tokens were given."""
    starts: list[float] = []
    end = clock.now + seconds
    while clock.now <= end:
        while (j := g.take()) is not None:
            starts.append(clock.now)
            assert j.task_name == "limited"
        due = g.next_due()
        if due is None:
            break
        clock.advance(max(due, 1e-6))
    return starts


def test_unlimited_tasks_pass_straight_through() -> None:
    g = gate(Clock())
    g.set_rate("limited", 1.0)
    assert g.admit(job("other")) is False
    assert g.admit(job("limited")) is True
    assert g.parked == 1


def test_the_limit_holds_at_the_moments_tokens_are_taken() -> None:
    clock = Clock()
    g = gate(clock, parking=100, max_hold=1000)
    g.set_rate("limited", 10 / 60)  # 10/m
    for n in range(30):
        assert g.admit(job(n=n))
    starts = drain_over(g, clock, 120.0)
    # one at once (the bucket starts full), then one every 6 s: 1 + 120/6 = 21
    assert len(starts) == 21
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps == pytest.approx([6.0] * 20)


def test_parked_messages_sit_beside_the_window() -> None:
    clock = Clock()
    g = gate(clock, parking=4)
    g.set_rate("limited", 1.0)
    assert g.room == 4
    for n in range(3):
        g.admit(job(n=n))
    assert g.beside_window == 3
    # an early-acked message (no delivery) holds nothing the window counts
    g.admit(job(n=9, held=False))
    assert g.beside_window == 3


def test_a_full_lane_hands_the_rest_back_spread_at_the_rate() -> None:
    clock = Clock()
    backs = HandBacks()
    g = gate(clock, backs, parking=4, max_hold=1000)
    g.set_rate("limited", 2.0)  # 2/s
    for n in range(10):
        assert g.admit(job(n=n))
    assert g.parked == 4
    assert [tid for tid, _ in backs.sent] == [f"limited-{n}" for n in range(4, 10)]
    delays = [d for _, d in backs.sent]
    # the four parked take 0 s, 0.5, 1.0, 1.5: the first handed back is due at 2.0, then every 0.5
    assert delays == pytest.approx([2.0, 2.5, 3.0, 3.5, 4.0, 4.5])
    assert g.handed_back == 6


def test_a_message_that_would_wait_past_max_hold_goes_back_to_the_broker() -> None:
    clock = Clock()
    backs = HandBacks()
    g = gate(clock, backs, parking=100, max_hold=60)
    g.set_rate("limited", 1 / 60)  # 1/m: the second would wait 60 s, the third 120 s
    for n in range(3):
        g.admit(job(n=n))
    assert g.parked == 2
    assert backs.sent == [("limited-2", pytest.approx(120.0))]


def test_a_broker_that_will_not_take_it_back_leaves_it_waiting_in_the_window() -> None:
    clock = Clock()
    g = gate(clock, HandBacks(accept=False), parking=2)
    g.set_rate("limited", 1.0)
    for n in range(5):
        g.admit(job(n=n))
    assert g.parked == 5
    assert g.beside_window == 2  # the overflow counts against the window, as in Celery


def test_messages_that_waited_max_hold_are_handed_back() -> None:
    clock = Clock()
    backs = HandBacks()
    g = gate(clock, backs, parking=10, max_hold=5)
    g.set_rate("limited", 1.0)
    for n in range(3):
        g.admit(job(n=n))
    clock.advance(4)
    assert g.send_back_stale() == 0
    clock.advance(2)  # the pool stayed busy: nothing was taken for 6 s
    assert g.send_back_stale() == 3
    assert g.parked == 0
    assert [tid for tid, _ in backs.sent] == ["limited-0", "limited-1", "limited-2"]


def test_next_due_wakes_the_loop_for_the_next_token() -> None:
    clock = Clock()
    g = gate(clock)
    g.set_rate("limited", 0.5)
    assert g.next_due() is None  # nothing parked: no reason to wake
    g.admit(job(n=0))
    g.admit(job(n=1))
    assert g.next_due() == 0.0
    assert g.take() is not None
    assert g.next_due() == pytest.approx(2.0)
    clock.advance(2.0)
    assert g.take() is not None


def test_removing_a_limit_releases_its_waiting_jobs() -> None:
    clock = Clock()
    g = gate(clock)
    g.set_rate("limited", 0.1)
    for n in range(3):
        g.admit(job(n=n))
    released = g.set_rate("limited", None)
    assert [j.task_id for j in released] == ["limited-0", "limited-1", "limited-2"]
    assert not g.limited("limited") and g.room == 0


def test_changing_a_rate_keeps_the_waiting_jobs() -> None:
    clock = Clock()
    g = gate(clock, max_hold=1000)
    g.set_rate("limited", 0.01)
    g.admit(job(n=0))
    g.admit(job(n=1))
    assert g.take() is not None
    assert g.take() is None
    g.set_rate("limited", 100.0)  # a fresh (full) bucket at the new rate
    assert g.take() is not None


def test_lanes_take_turns() -> None:
    clock = Clock()
    g = gate(clock)
    g.set_rate("a", 1.0)
    g.set_rate("b", 1.0)
    for n in range(2):
        g.admit(job("a", n))
        g.admit(job("b", n))
    first, second = g.take(), g.take()
    assert first is not None and second is not None
    assert {first.task_name, second.task_name} == {"a", "b"}


class FakeStore(SharedLimiter):
    """A shared bucket on the test clock (the real one is Redis; see the broker-redis tests)."""

    def __init__(self, clock: Clock, fail: bool = False) -> None:
        super().__init__("fake://")
        self.bucket: TokenBucket | None = None
        self.clock = clock
        self.asks = 0
        self.fail = fail

    def acquire(self, name: str, rate: float, capacity: float = 1.0) -> float:
        self.asks += 1
        if self.fail:
            raise ConnectionError("store away")
        if self.bucket is None:
            self.bucket = TokenBucket(rate, capacity, clock=self.clock)
        return 0.0 if self.bucket.take() else self.bucket.wait()


def test_a_shared_lane_asks_its_store_only_when_the_store_said_to() -> None:
    clock = Clock()
    store = FakeStore(clock)
    g = gate(clock, shared=lambda: store)
    g.set_rate("limited", 1.0, shared=True)
    assert g.take() is None and store.asks == 0  # nothing waiting: no round trip
    for n in range(3):
        g.admit(job(n=n))
    assert g.take() is not None
    assert g.take() is None
    asks = store.asks
    for _ in range(50):  # the store said "1 s": no more asks meanwhile
        assert g.take() is None
        clock.advance(0.01)
    assert store.asks == asks
    clock.advance(0.51)
    assert g.take() is not None


def test_a_shared_lane_fails_closed_while_its_store_is_away() -> None:
    clock = Clock()
    store = FakeStore(clock, fail=True)
    g = gate(clock, shared=lambda: store)
    g.set_rate("limited", 100.0, shared=True)
    g.admit(job(n=0))
    assert g.take() is None
    assert g.next_due() == pytest.approx(1.0)  # asks again in a second
    store.fail = False
    clock.advance(1.0)
    assert g.take() is not None


def test_a_shared_limit_needs_a_store() -> None:
    g = gate(Clock())
    with pytest.raises(ValueError, match="shared store"):
        g.set_rate("limited", 1.0, shared=True)


# -- in a worker (memory:// broker, real threads pool) ---------------------------------------------


def limited_app(app: Millpond) -> dict[str, Any]:
    @app.task(name="rl.limited", rate_limit="20/s")
    def limited(n: int) -> float:
        return time.time()

    @app.task(name="rl.free")
    def free(n: int) -> float:
        return time.time()

    return {"limited": limited, "free": free}


def test_a_limited_flood_does_not_hold_back_other_tasks(memory_app: Millpond) -> None:
    from millpond.testing.fixtures import RunningWorker

    t = limited_app(memory_app)
    limited = [t["limited"].delay(n) for n in range(16)]  # 0.75 s of work at 20/s
    free = [t["free"].delay(n) for n in range(40)]  # queued behind the whole flood
    running = RunningWorker(memory_app, pool="threads", concurrency=2, prefetch_multiplier=1)
    worker, given = running.worker, []
    made = limits_of(worker).gate
    take = made.take

    def taken() -> Job | None:  # when each token was given (the limit's own clock)
        job = take()
        if job is not None:
            given.append(time.monotonic())
        return job

    made.take = taken  # type: ignore[method-assign]
    running.start()
    try:
        free_done = [r.get(timeout=30) for r in free]
        starts = sorted(r.get(timeout=30) for r in limited)
    finally:
        running.stop()
    # the free tasks all ran before the flood of limited ones drained
    assert max(free_done) < starts[-1]
    assert len(given) == 16
    gaps = [b - a for a, b in itertools.pairwise(given)]
    assert min(gaps) >= 0.05 - 1e-3, f"two tokens given {min(gaps):.4f} s apart (limit 20/s)"
    # a prefetch of 2 would have held two limited messages; the rest went back to the broker
    assert made.handed_back > 0


def test_set_rate_limit_at_run_time(memory_app: Millpond, start_worker: Any) -> None:
    from millpond.exceptions import UnknownTask

    t = limited_app(memory_app)
    running = start_worker(memory_app, pool="threads", concurrency=2)
    worker = limits_of(running.worker)
    with pytest.raises(InvalidRateLimit, match="unit 'd'"):
        worker.set_rate_limit("rl.free", "1/d")
    with pytest.raises(UnknownTask, match=r"rl\.nope"):
        worker.set_rate_limit("rl.nope", "1/s")
    worker.set_rate_limit("rl.free", "10/s")
    assert worker.rate_limit_of("rl.free") == 10.0
    starts = sorted(r.get(timeout=30) for r in [t["free"].delay(n) for n in range(6)])
    assert starts[-1] - starts[0] > 0.35, "six tasks at 10/s take at least 0.5 s"
    worker.set_rate_limit("rl.limited", None)  # off: a flood runs at once
    assert worker.rate_limit_of("rl.limited") is None
    starts = sorted(r.get(timeout=30) for r in [t["limited"].delay(n) for n in range(40)])
    assert starts[-1] - starts[0] < 1.5, "40 tasks at the old 20/s would take 1.95 s"


def test_disable_rate_limits(memory_app: Millpond, start_worker: Any) -> None:
    t = limited_app(memory_app)
    running = start_worker(memory_app, pool="threads", concurrency=2, disable_rate_limits=True)
    assert limits_of(running.worker).rate_limit_of("rl.limited") is None
    assert t["limited"].delay(1).get(timeout=30)


def test_a_global_limit_without_a_store_fails_at_start_up(memory_app: Millpond) -> None:
    from millpond.testing.fixtures import RunningWorker

    @memory_app.task(name="rl.shared", rate_limit="1/s", rate_limit_scope="global")
    def shared() -> None: ...

    with pytest.raises(MillpondError, match="needs a shared store"):
        RunningWorker(memory_app, pool="threads").start()


def test_the_loop_wakes_for_a_token_only_when_the_pool_has_a_slot(memory_app: Millpond) -> None:
    """With the pool full a completion wakes the loop anyway: waking for a token that is ready
    but has nowhere to go would spin the loop (and steal CPU from the tasks)."""
    limited_app(memory_app)
    worker = Worker(memory_app, pool="threads", concurrency=2)
    clock = Clock()
    limits = limits_of(worker)
    limits.gate = g = gate(clock)
    g.set_rate("rl.limited", 0.5)

    class Slots:
        active, concurrency, capacity = 2, 2, 2

    worker.pool = Slots()  # type: ignore[assignment]
    assert worker._wait(0.5) == 0.5  # nothing parked
    g.admit(job("rl.limited"))
    assert worker._wait(0.5) == 0.5  # a token is there, but no slot: sleep until a completion
    Slots.active = 1
    assert worker._wait(0.5) == 0.001  # a slot and a token: go at once
    assert g.take() is not None
    g.admit(job("rl.limited", 1))
    assert worker._wait(5.0) == pytest.approx(2.0)  # the next token is 2 s away


def test_an_early_ack_limited_task_is_acknowledged_when_it_starts(
    memory_app: Millpond, start_worker: Any
) -> None:
    """acks_late=False acknowledges before the task runs; for a limited task that is when it
    leaves its lane, so the waiting messages are still the broker's to take back."""

    @memory_app.task(name="rl.early", rate_limit="50/s", acks_late=False)
    def early(n: int) -> int:
        return n

    results = [early.delay(n) for n in range(12)]
    running = start_worker(memory_app, pool="threads", concurrency=2, prefetch_multiplier=1)
    assert sorted(r.get(timeout=30) for r in results) == list(range(12))
    assert (
        limits_of(running.worker).gate.handed_back > 0
    )  # only possible while still unacknowledged
    assert running.worker.acks is not None and running.worker.acks.held == 0


def test_the_window_follows_what_the_lanes_hold_in_steps(memory_app: Millpond) -> None:
    limited_app(memory_app)
    worker = Worker(memory_app, pool="threads", concurrency=2, prefetch_multiplier=4)
    assert worker.prefetch == 8
    clock = Clock()
    limits = limits_of(worker)
    limits.gate = g = gate(clock, parking=8, max_hold=1000)  # step: 8 / 4 = 2
    assert limits.window_room() == 0  # no limited task: the prefetch count alone
    g.set_rate("rl.limited", 0.01)
    g.set_rate("rl.other", 0.01)
    assert limits.window_room() == 2  # empty lanes: one step of room
    for n in range(3):
        g.admit(job("rl.limited", n))
    assert limits.window_room() == 4 + 2  # 3 held: rounded up to 4, plus a step
    for n in range(8):
        g.admit(job("rl.other", n))
    assert limits.window_room() == 12 + 2  # 11 held
    for n in range(3, 8):
        g.admit(job("rl.limited", n))
    assert limits.window_room() == 16  # both lanes full: never past their room (2 x 8)


def test_a_raised_rate_does_not_keep_handing_back_at_the_old_spacing() -> None:
    """Handed-back messages were spaced at the old rate (1/m: minutes apart); after a raise to
    100/s a message that must go back is due by the new rate, not after the old schedule."""
    clock = Clock()
    backs = HandBacks()
    g = gate(clock, backs, parking=1, max_hold=1000)
    g.set_rate("limited", 1 / 60)
    for n in range(4):
        g.admit(job(n=n))
    assert [d for _, d in backs.sent] == pytest.approx([60.0, 120.0, 180.0])
    g.set_rate("limited", 100.0)
    g.admit(job(n=4))  # the lane (room 1) is full: this one goes back
    assert backs.sent[-1] == ("limited-4", pytest.approx(0.01))
