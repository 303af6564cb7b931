"""The child process: receive jobs, run them one at a time, send each outcome back, until told
to leave.

A child is a fork of the fork server, which is a fork of the worker taken after the app was
imported and before the worker started any thread: every child starts with the tasks loaded and
nothing half-locked by a thread that does not exist in it.

Signals are how the parent reaches a child that is busy (it reads its socket only between jobs):

* SIGALRM, armed by the child itself with `setitimer` when a job has a soft time limit, raises
  `SoftTimeLimitExceeded` inside the task. The child arms and disarms its own timer, so a limit can
  never land in the next task, as a signal sent by the parent could after a race.
* SIGUSR2 (hard time limit) and SIGTERM (terminate_job, or shutdown) raise `TimeLimitExceeded` or
  `TaskRevokedError` inside the task so it can unwind and its `run` span records why it ended; then
  the child flushes its spans and exits. The parent follows with SIGKILL after `kill_grace` if the
  task swallowed the exception or is stuck in C code.
* SIGINT and SIGQUIT are ignored: Ctrl-C in a terminal reaches the whole process group, and it is
  the worker's decision (warm or cold) what happens to running tasks.

These signals are blocked except while the child waits for a job or runs one, so they never land
in the middle of sending an outcome.

Every exit goes through `os._exit` after `execution.process_exiting()` (the hooks flush what they
buffer: spans in the batch processor would be lost without it): a forked child must not run the
parent's atexit handlers. `execution.process_started()` runs once before the first job.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import traceback
from collections import deque
from dataclasses import dataclass
from types import FrameType
from typing import Any, NoReturn

from millpond.contracts.pool import Execution, Job, Outcome
from millpond.exceptions import SoftTimeLimitExceeded, TaskRevokedError, TimeLimitExceeded
from millpond_pool_prefork import wire
from millpond_pool_prefork.settings import PreforkConfig

#: the parent's signal for "your task ran past its hard time limit"
HARD_LIMIT_SIGNAL = signal.SIGUSR2
#: the parent's signal for "stop now" (terminate_job, a stop that timed out, systemd)
STOP_SIGNAL = signal.SIGTERM
_MANAGED = {signal.SIGALRM, HARD_LIMIT_SIGNAL, STOP_SIGNAL}

#: exit codes (the parent only reads them for its log lines)
EXIT_OK = 0
EXIT_CRASH = 70


class _Stop(BaseException):
    """Unwinds an idle child that was asked to stop."""


@dataclass
class _State:
    job: Job | None = None
    stopping: bool = False
    soft_fired: bool = False


_state = _State()


def _on_soft_limit(_signum: int, _frame: FrameType | None) -> None:
    job = _state.job
    if job is None or _state.soft_fired:
        return  # the task finished just before the timer fired
    _state.soft_fired = True
    raise SoftTimeLimitExceeded(
        f"task {job.task_name}[{job.task_id}] ran past its soft time limit of "
        f"{job.soft_time_limit:g}s; catch SoftTimeLimitExceeded to clean up"
    )


def _on_stop(signum: int, _frame: FrameType | None) -> None:
    if _state.stopping:
        return  # one exception is enough: let the task's cleanup run
    _state.stopping = True
    job = _state.job
    if job is None:
        raise _Stop
    if signum == HARD_LIMIT_SIGNAL:
        raise TimeLimitExceeded(
            f"task {job.task_name}[{job.task_id}] ran past its hard time limit of "
            f"{job.time_limit:g}s; its process is being stopped"
        )
    raise TaskRevokedError(
        f"task {job.task_name}[{job.task_id}] was terminated; its process is being stopped"
    )


def _block() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, _MANAGED)


def _unblock() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _MANAGED)


def _install_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGQUIT"):
        signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGALRM, _on_soft_limit)
    signal.signal(HARD_LIMIT_SIGNAL, _on_stop)
    signal.signal(STOP_SIGNAL, _on_stop)


def resident_mb() -> float:
    """This process's resident memory in MiB: /proc/self/statm (one read), psutil elsewhere."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    except OSError:
        import psutil

        return float(psutil.Process().memory_info().rss) / (1024 * 1024)


def _recycle_reason(config: PreforkConfig, done: int) -> str | None:
    if config.max_tasks_per_child is not None and done >= config.max_tasks_per_child:
        return f"ran {done} tasks (max_tasks_per_child={config.max_tasks_per_child})"
    if config.max_memory_per_child is not None:
        rss = resident_mb()
        if rss >= config.max_memory_per_child:
            return (
                f"resident memory {rss:.0f} MiB reached max_memory_per_child="
                f"{config.max_memory_per_child} MiB"
            )
    return None


def _run(job: Job, execution: Execution) -> Outcome | None:
    """Run one job with its soft limit armed; None when the child was told to stop meanwhile."""
    _state.job = job
    _state.soft_fired = False
    outcome: Outcome | None = None
    try:
        if job.soft_time_limit:
            signal.setitimer(signal.ITIMER_REAL, job.soft_time_limit)
        _unblock()
        outcome = execution.run(job)
    except SoftTimeLimitExceeded as exc:
        # landed after the task body returned, inside execution.run's own bookkeeping
        outcome = Outcome.of(exc)
    except (TimeLimitExceeded, TaskRevokedError, _Stop):
        outcome = None  # likewise outside the task body: the parent reports why it stopped us
    finally:
        _block()
        if job.soft_time_limit:  # a syscall saved per job without one
            signal.setitimer(signal.ITIMER_REAL, 0)
        _state.job = None
    return None if _state.stopping else outcome


def _done_frame(job: Job, outcome: Outcome, leaving: str | None) -> bytes:
    """("done", task id, outcome, why the child leaves now or None)."""
    try:
        return wire.frame(("done", job.task_id, outcome, leaving))
    except Exception as exc:  # a result pickle cannot carry (a lambda, a socket, a lock)
        return wire.frame(
            (
                "done",
                job.task_id,
                Outcome.of(
                    exc,
                    message=f"the result of task {job.task_name} cannot be sent back from the "
                    f"child process ({exc}); return plain data (JSON-compatible values)",
                    runtime=outcome.runtime,
                ),
                leaving,
            )
        )


def _take_frames(sock: socket.socket, reader: wire.FrameReader, *, wait: bool) -> list[Any] | None:
    """The frames the socket holds now (`wait`: block for at least one); None at end of stream.

    A child reads everything its socket has in one call: the parent writes several jobs at once
    (up to `prefetch_per_child`), so a child with a queued job never waits for a round trip.
    """
    while True:
        try:
            data = sock.recv(1 << 16) if wait else sock.recv(1 << 16, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return []
        if not data:
            return None
        frames = reader.feed(data)
        if frames or not wait:
            return frames


def _serve(sock: socket.socket, config: PreforkConfig, execution: Execution) -> int:
    _block()
    _install_signals()
    execution.process_started()
    sock.sendall(wire.frame(("ready", os.getpid())))
    reader = wire.FrameReader()
    queue: deque[Job] = deque()
    done = 0
    while True:
        if queue:
            # a look without waiting keeps the signals blocked (two syscalls fewer per job): one
            # sent meanwhile lands when the next job unblocks them, where it is handled the same
            frames = _take_frames(sock, reader, wait=False)
        else:
            try:
                _unblock()
                frames = _take_frames(sock, reader, wait=True)
            except _Stop:
                return EXIT_OK
            finally:
                _block()
        if frames is None or _state.stopping:
            return EXIT_OK  # None: the parent is gone
        for message in frames:
            kind = message[0]
            if kind == "exit":
                return EXIT_OK
            if kind == "job":
                queue.append(message[1])
            elif kind == "skip":  # terminated before it started: the parent reported it
                queue = deque(j for j in queue if j.task_id != message[1])
        if not queue:
            continue
        job = queue.popleft()
        outcome = _run(job, execution)
        if outcome is None:
            return EXIT_OK
        done += 1
        # the parent learns it in the same frame, so it never hands a job to a leaving child (and
        # gives the jobs still queued here to another child)
        reason = _recycle_reason(config, done)
        # one write per outcome, before the next job starts: an outcome buffered here would be
        # lost with the process if the next job crashed it, and its task would run twice
        sock.sendall(_done_frame(job, outcome, reason))
        if reason is not None:
            return EXIT_OK


def child_main(sock: socket.socket, config: PreforkConfig, execution: Execution) -> NoReturn:
    """The whole life of a child process; never returns."""
    code = EXIT_CRASH
    try:
        code = _serve(sock, config, execution)
    except BaseException:
        try:
            sys.stderr.write(
                f"millpond prefork child {os.getpid()} crashed:\n{traceback.format_exc()}"
            )
            sys.stderr.flush()
        except BaseException:
            pass
    finally:
        try:
            _block()
            execution.process_exiting()
        except BaseException:
            pass
        for stream in (sys.stdout, sys.stderr):  # os._exit skips the interpreter's own flush
            try:
                stream.flush()
            except BaseException:
                pass
        os._exit(code)
