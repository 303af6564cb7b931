"""The prefork pool with real processes: kills, limits, recycling, the fork server, clean-up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from millpond.config import plugins
from millpond.config.settings import load_settings
from millpond.exceptions import ConfigurationError
from millpond.states import TaskState
from millpond.testing import tasks
from millpond.testing.harness import wait_until
from millpond.testing.pool_kit import Gate, Outcomes, Runner, kit_executor, make_job
from millpond_pool_prefork import SECTION, PreforkPool

pytestmark = pytest.mark.fault

HERE = Path(__file__).resolve().parent
PROMPT = 10.0


def alive(pid: int) -> bool:
    """Whether `pid` is a running (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def parent_of(pid: int) -> int | None:
    """The parent pid, or None when the process is already gone (it may exit between calls)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except FileNotFoundError:
        return None


class Rig:
    """A started prefork pool, its outcomes and a runner."""

    def __init__(self, concurrency: int, **options: Any) -> None:
        self.outcomes = Outcomes()
        self.pool = PreforkPool(
            concurrency,
            self.outcomes,
            {"kill_grace": 0.3, **options},
            execution=kit_executor(tasks.app),
        )
        self.pool.start()
        self.runner = Runner(self.pool, self.outcomes, PROMPT)

    def run(self, name: str, *args: Any, **options: Any) -> Any:
        return self.runner.run(name, *args, **options)

    def pid(self) -> int:
        outcome = self.run("whoami")
        assert outcome.state == TaskState.SUCCESS, outcome
        return int(outcome.result["pid"])


@pytest.fixture
def rig() -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []
    gates: list[Gate] = []

    def make(concurrency: int = 2, **options: Any) -> Rig:
        r = Rig(concurrency, **options)
        made.append(r)
        return r

    make.gates = gates  # type: ignore[attr-defined]
    yield make
    for g in gates:
        g.close()
    for r in made:
        r.pool.terminate()


def test_a_child_killed_mid_task_loses_its_job_and_is_replaced(rig: Callable[..., Rig]) -> None:
    r = rig(2)
    before = set(r.pool.child_pids())
    with Gate() as gate:
        job = r.runner.submit(make_job("gate", gate.port, 60.0))
        (pid,) = gate.wait_arrivals(1, PROMPT)
        assert pid in before
        assert r.pool.pid_of(job.task_id) == pid
        os.kill(pid, signal.SIGKILL)
        outcome = r.outcomes.wait(job, PROMPT)
    assert outcome.state == TaskState.LOST, outcome
    assert outcome.exc_type == "WorkerLostError"
    assert outcome.exc_message.startswith(
        f"child process {pid} exited with signal 9 (SIGKILL) while running task kit.gate["
        f"{job.task_id}]"
    ), outcome.exc_message
    assert "out of memory" in outcome.exc_message
    assert outcome.requeue is True
    wait_until(
        lambda: len(r.pool.child_pids()) == 2 and pid not in r.pool.child_pids(),
        PROMPT,
        "a replacement child",
    )
    jobs = [make_job("add", i, 1) for i in range(6)]
    assert [o.result for o in r.runner.run_all(jobs)] == [i + 1 for i in range(6)]


def test_a_crashing_child_reports_its_exit_code(rig: Callable[..., Rig]) -> None:
    r = rig(1)
    outcome = r.run("crash", 3)
    assert (outcome.state, outcome.exc_type) == (TaskState.LOST, "WorkerLostError"), outcome
    assert "exited with code 3 while running task kit.crash" in outcome.exc_message
    r.runner.wait_free()
    assert r.run("add", 1, 1).result == 2


def test_hard_limit_kills_and_replaces_the_child(rig: Callable[..., Rig]) -> None:
    r = rig(1)
    first = r.pid()
    started = time.monotonic()
    outcome = r.run("sleep", 60.0, time_limit=0.3)
    assert (outcome.state, outcome.exc_type) == (TaskState.TIMEOUT, "TimeLimitExceeded"), outcome
    assert "hard time limit of 0.3s" in outcome.exc_message
    assert f"child process {first} was stopped" in outcome.exc_message
    assert time.monotonic() - started < 3
    wait_until(lambda: not alive(first), PROMPT, "the timed-out child to be gone")
    assert r.pid() != first


def test_hard_limit_escalates_to_sigkill_when_the_task_ignores_it(
    rig: Callable[..., Rig],
) -> None:
    r = rig(1, kill_grace=0.3)
    first = r.pid()
    started = time.monotonic()
    outcome = r.run("stubborn", 60.0, time_limit=0.2)
    elapsed = time.monotonic() - started
    assert outcome.state == TaskState.TIMEOUT, outcome
    assert 0.5 <= elapsed < 5, f"escalation took {elapsed:.2f}s (limit 0.2 s + grace 0.3 s)"
    assert not alive(first)
    assert r.pid() != first


def test_soft_limit_is_caught_inside_the_child_and_the_child_lives_on(
    rig: Callable[..., Rig],
) -> None:
    r = rig(1)
    first = r.pid()
    outcome = r.run("soft_cleanup", 60.0, soft_time_limit=0.2)
    assert (outcome.state, outcome.result) == (TaskState.SUCCESS, "cleaned up"), outcome
    outcome = r.run("sleep", 60.0, soft_time_limit=0.2)
    assert (outcome.state, outcome.exc_type) == (TaskState.FAILURE, "SoftTimeLimitExceeded"), (
        outcome
    )
    assert "soft time limit of 0.2s" in outcome.exc_message
    assert r.pid() == first, "a soft limit must not cost the child its life"


def test_max_tasks_per_child_recycles_after_each_task(rig: Callable[..., Rig]) -> None:
    r = rig(2, max_tasks_per_child=1)
    jobs = [make_job("whoami") for _ in range(20)]
    results = r.runner.run_all(jobs, timeout=30)
    assert all(o.state == TaskState.SUCCESS for o in results), results
    pids = [o.result["pid"] for o in results]
    assert len(set(pids)) == 20, "a child ran more than max_tasks_per_child=1 tasks"
    wait_until(lambda: not any(alive(p) for p in pids), PROMPT, "recycled children to exit")


def test_max_memory_per_child_recycles_a_grown_child(rig: Callable[..., Rig]) -> None:
    probe = rig(1)
    base = probe.run("allocate", 0).result
    probe.pool.stop(PROMPT)
    r = rig(1, max_memory_per_child=int(base) + 40)
    first = r.pid()
    small = r.run("allocate", 1)
    assert small.state == TaskState.SUCCESS, small
    assert r.pid() == first, "recycled below the memory limit"
    with structlog.testing.capture_logs() as logged:
        big = r.run("allocate", 60)
        assert big.state == TaskState.SUCCESS, big
        assert big.result >= base + 60, big
        r.runner.wait_free()
        wait_until(lambda: first not in r.pool.child_pids(), PROMPT, "the grown child to retire")
    assert r.pid() != first
    told = [e for e in logged if e["event"] == "recycling a prefork child"]
    assert [(e["log_level"], e["pid"]) for e in told] == [("info", first)], logged
    assert "max_memory_per_child" in told[0]["reason"]


def test_terminate_job_revokes_it_and_replaces_the_child(rig: Callable[..., Rig]) -> None:
    r = rig(2)
    with Gate() as gate:
        job = r.runner.submit(make_job("gate", gate.port, 60.0))
        (pid,) = gate.wait_arrivals(1, PROMPT)
        assert r.pool.terminate_job(job.task_id)
        outcome = r.outcomes.wait(job, PROMPT)
    assert (outcome.state, outcome.exc_type) == (TaskState.REVOKED, "TaskRevokedError"), outcome
    assert f"child process {pid} was stopped" in outcome.exc_message
    wait_until(lambda: not alive(pid), PROMPT, "the terminated child to be gone")
    wait_until(lambda: len(r.pool.child_pids()) == 2, PROMPT, "a replacement child")


def test_jobs_go_only_to_idle_children(rig: Callable[..., Rig]) -> None:
    """A long task in one child never holds up short ones: no head-of-line blocking."""
    r = rig(2)
    with Gate() as gate:
        long_job = r.runner.submit(make_job("gate", gate.port, 60.0))
        (busy,) = gate.wait_arrivals(1, PROMPT)
        for i in range(10):
            r.runner.wait_free()
            outcome = r.run("whoami")
            assert outcome.result["pid"] != busy, f"job {i} went to the busy child"
        assert r.outcomes.get(long_job.task_id) is None
        gate.open()
        assert r.outcomes.wait(long_job, PROMPT).result == "released"


def test_a_child_runs_the_jobs_queued_behind_its_running_one(rig: Callable[..., Rig]) -> None:
    """prefetch_per_child: the pool takes that many jobs per child, and they run in order."""
    r = rig(1, prefetch_per_child=3, reserve_per_child=0)
    assert r.pool.capacity == 3
    with Gate() as gate:
        first = r.runner.submit(make_job("gate", gate.port, 60.0))
        queued = [r.runner.submit(make_job("whoami")) for _ in range(2)]
        (pid,) = gate.wait_arrivals(1, PROMPT)
        assert r.pool.active == 3
        gate.open()
        assert r.outcomes.wait(first, PROMPT).result == "released"
        results = r.outcomes.wait_all(queued, PROMPT)
    assert [o.result["pid"] for o in results] == [pid, pid], results


def test_the_reserve_held_in_the_worker_refills_a_child(rig: Callable[..., Rig]) -> None:
    """reserve_per_child: jobs beyond what the child holds wait in the pool, not in the child,
    and go to it one by one as its jobs end."""
    r = rig(1, prefetch_per_child=1, reserve_per_child=3)
    assert r.pool.capacity == 4
    with Gate() as gate:
        first = r.runner.submit(make_job("gate", gate.port, 60.0))
        reserve = [r.runner.submit(make_job("whoami")) for _ in range(3)]
        (pid,) = gate.wait_arrivals(1, PROMPT)
        assert r.pool.active == 4
        assert all(r.outcomes.get(job.task_id) is None for job in reserve)
        gate.open()
        assert r.outcomes.wait(first, PROMPT).result == "released"
        results = r.outcomes.wait_all(reserve, PROMPT)
    assert [o.result["pid"] for o in results] == [pid] * 3, results


def test_jobs_queued_in_a_killed_child_run_in_its_replacement(rig: Callable[..., Rig]) -> None:
    """Only the running job is lost with its child: the ones behind it never started."""
    r = rig(1, prefetch_per_child=3)
    with Gate() as gate:
        running = r.runner.submit(make_job("gate", gate.port, 60.0))
        queued = [r.runner.submit(make_job("whoami")) for _ in range(2)]
        (pid,) = gate.wait_arrivals(1, PROMPT)
        os.kill(pid, signal.SIGKILL)
        lost = r.outcomes.wait(running, PROMPT)
        results = r.outcomes.wait_all(queued, PROMPT)
    assert (lost.state, lost.requeue) == (TaskState.LOST, True), lost
    assert all(o.state == TaskState.SUCCESS for o in results), results
    assert {o.result["pid"] for o in results}.isdisjoint({pid}), "ran in the killed child"


def test_terminate_job_revokes_a_queued_job_without_killing_its_child(
    rig: Callable[..., Rig],
) -> None:
    r = rig(1, prefetch_per_child=3)
    with Gate() as gate:
        running = r.runner.submit(make_job("gate", gate.port, 60.0))
        queued = r.runner.submit(make_job("whoami"))
        after = r.runner.submit(make_job("whoami"))
        (pid,) = gate.wait_arrivals(1, PROMPT)
        assert r.pool.terminate_job(queued.task_id)
        revoked = r.outcomes.wait(queued, PROMPT)
        assert (revoked.state, revoked.exc_type) == (TaskState.REVOKED, "TaskRevokedError")
        assert "terminated before it started" in revoked.exc_message
        gate.open()
        assert r.outcomes.wait(running, PROMPT).result == "released"
        assert r.outcomes.wait(after, PROMPT).result["pid"] == pid
    assert r.pid() == pid, "the child was replaced"


def test_a_job_waits_behind_another_only_when_every_child_is_busy(
    rig: Callable[..., Rig],
) -> None:
    r = rig(2, prefetch_per_child=2)
    with Gate() as gate:
        jobs = [r.runner.submit(make_job("gate", gate.port, 60.0)) for _ in range(2)]
        pids = gate.wait_arrivals(2, PROMPT)
        assert len(set(pids)) == 2, "both jobs went to one child while the other was idle"
        gate.open()
        assert [o.result for o in r.outcomes.wait_all(jobs, PROMPT)] == ["released"] * 2


def test_results_and_arguments_that_cannot_cross_fail_cleanly(rig: Callable[..., Rig]) -> None:
    r = rig(1)
    first = r.pid()
    outcome = r.run("unpicklable")
    assert outcome.state == TaskState.FAILURE, outcome
    assert "cannot be sent back from the child process" in outcome.exc_message
    job = make_job("add", lambda: 1, 2)
    r.runner.submit(job)
    outcome = r.outcomes.wait(job, PROMPT)
    assert outcome.state == TaskState.FAILURE, outcome
    assert "cannot be sent to a child process" in outcome.exc_message
    assert r.pid() == first


def test_children_are_forked_by_the_fork_server(rig: Callable[..., Rig]) -> None:
    r = rig(2, max_tasks_per_child=1)
    server = r.pool.forkserver_pid
    assert server is not None
    assert parent_of(server) == os.getpid()
    for pid in r.pool.child_pids():
        assert parent_of(pid) == server
    # replacements made after the supervisor thread started come from the server too
    pid = r.pid()
    assert parent_of(pid) == server or not alive(pid)
    wait_until(lambda: len(r.pool.child_pids()) == 2, PROMPT, "replacements")
    assert all(parent_of(p) == server for p in r.pool.child_pids())


def test_children_inherit_the_fork_servers_frozen_objects(rig: Callable[..., Rig]) -> None:
    # gc.freeze() in the fork server: a child's collections must not walk (and so write to, and
    # so copy) the pages of the app and modules it shares with the server
    outcome = rig(1).run("whoami")
    assert outcome.state == TaskState.SUCCESS, outcome
    assert outcome.result["gc_frozen"] > 1000, outcome.result


def test_the_pool_survives_losing_its_fork_server(rig: Callable[..., Rig]) -> None:
    r = rig(1, max_tasks_per_child=1)
    server = r.pool.forkserver_pid
    assert server is not None
    r.runner.wait_free()
    os.kill(server, signal.SIGKILL)
    wait_until(lambda: r.pool.forkserver_pid != server, PROMPT, "the pool to notice")
    # every task recycles its child, so each needs a fork from a (new) fork server
    jobs = [make_job("add", i, i) for i in range(5)]
    assert [o.result for o in r.runner.run_all(jobs, timeout=30)] == [2 * i for i in range(5)]


def test_warm_stop_and_cold_terminate_leave_no_process_behind(rig: Callable[..., Rig]) -> None:
    warm = rig(2)
    processes = [*warm.pool.child_pids(), warm.pool.forkserver_pid]
    assert warm.run("add", 1, 1).result == 2
    warm.pool.stop(PROMPT)
    assert not any(alive(p) for p in processes if p is not None)
    cold = rig(2)
    processes = [*cold.pool.child_pids(), cold.pool.forkserver_pid]
    with Gate() as gate:
        cold.runner.submit(make_job("gate", gate.port, 60.0))
        gate.wait_arrivals(1, PROMPT)
        started = time.monotonic()
        cold.pool.terminate()
        assert time.monotonic() - started < 3
    wait_until(
        lambda: not any(alive(p) for p in processes if p is not None),
        PROMPT,
        "every child and the fork server to exit",
    )


_ORPHAN = r"""
import json, sys
from millpond.testing import tasks
from millpond.testing.pool_kit import Outcomes, kit_executor, make_job
from millpond_pool_prefork import PreforkPool

pool = PreforkPool(2, Outcomes(), {"kill_grace": 0.3}, execution=kit_executor(tasks.app))
pool.start()
pool.apply_async(make_job("kit.sleep", 60.0))
print(json.dumps([pool.forkserver_pid, *pool.child_pids()]), flush=True)
sys.stdin.read()
"""


def test_children_do_not_outlive_a_killed_worker() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _ORPHAN],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=HERE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        pids = json.loads(proc.stdout.readline())
        assert len(pids) == 3
        assert all(alive(p) for p in pids)
        proc.kill()
        proc.wait(PROMPT)
        wait_until(
            lambda: not any(alive(p) for p in pids),
            PROMPT,
            "the fork server and both children (one busy) to exit after the worker died",
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(PROMPT)


def test_settings_section_is_declared_and_validated() -> None:
    env = {
        "MILLPOND_PREFORK__MAX_TASKS_PER_CHILD": "100",
        "MILLPOND_PREFORK__MAX_MEMORY_PER_CHILD": "512",
    }
    values = load_settings(env=env).section(SECTION)
    assert values["max_tasks_per_child"] == 100
    assert values["max_memory_per_child"] == 512
    assert values["kill_grace"] == 1.0
    with pytest.raises(ConfigurationError, match=r"prefork\.max_tasks_per_child.*too small"):
        load_settings(env={"MILLPOND_PREFORK__MAX_TASKS_PER_CHILD": "0"}).section(SECTION)
    with pytest.raises(ConfigurationError, match="did you mean 'max_tasks_per_child'"):
        load_settings(env={"MILLPOND_PREFORK__MAX_TASK_PER_CHILD": "3"})
    with pytest.raises(ConfigurationError, match=r"unknown setting 'prefork\.grace' \(options\)"):
        PreforkPool(1, Outcomes(), {"grace": 1}, execution=kit_executor(tasks.app))
    with pytest.raises(ConfigurationError, match="kill_grace"):
        PreforkPool(1, Outcomes(), {"kill_grace": "soon"}, execution=kit_executor(tasks.app))
    assert plugins.settings_section("prefork") is SECTION  # found by the pool's name
    assert PreforkPool.default_concurrency() == (os.cpu_count() or 1)
