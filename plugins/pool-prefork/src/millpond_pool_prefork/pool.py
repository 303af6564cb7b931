"""The prefork pool: N child processes, each running one job at a time with a few queued behind it.

Processes give CPU-bound Python real parallelism and make every limit enforceable: a child can be
interrupted with a signal, killed and replaced. The worker process keeps the broker connection and
the `process` spans; children only run jobs.

Structure:

* a fork server (`forkserver`), forked at `start()` before any thread exists, forks every child;
* per child, a socketpair carrying length-prefixed pickles (`wire`): jobs down (several in one
  write when several are handed out at once), outcomes up (the supervisor reads every outcome a
  socket holds in one read);
* one supervisor thread in the worker that `select()`s on every child socket and the fork server,
  completes jobs, notices deaths (end of stream, then the exit status from the fork server),
  enforces hard time limits, escalates kills, and keeps N children alive.

A child holds up to `prefetch_per_child` jobs: the one it runs (the head of its queue) and the
ones queued behind it, so it starts its next job without waiting for a round trip through the
supervisor and the worker loop (that round trip per job was most of the pool's cost for short
tasks). A job goes to the least busy child: it is queued behind a running job only when every
child is busy, and at most `prefetch_per_child - 1` jobs wait behind any one task. The pool's
`capacity` is `concurrency * (prefetch_per_child + reserve_per_child)`: the reserve waits in
`_pending`, and the supervisor thread hands it to a child as each outcome arrives, so the
children are refilled without waiting for the worker loop (busy with broker round trips) to
take the completion and hand over new jobs. A job that arrives while a replacement child is
still starting waits in `_pending` too; jobs queued in a child that dies or recycles itself
never started, and go back to `_pending`.

Deaths and limits (the outcome is what the worker sees):

* killed by a signal or the kernel (OOM), or crashed: LOST (`WorkerLostError`, with the signal);
  the worker requeues or fails it per the task's `reject_on_worker_lost`. The child is replaced.
* hard time limit: SIGUSR2 (the task sees `TimeLimitExceeded` and may unwind), SIGKILL after
  `kill_grace`; TIMEOUT. Replaced.
* `terminate_job`: the same with SIGTERM (`TaskRevokedError` in the task); REVOKED. Replaced.
* soft time limit: the child's own timer raises `SoftTimeLimitExceeded` in the task.
* recycling (`max_tasks_per_child`, `max_memory_per_child`): the child reports its last task with
  "and now I leave" in the same message (so no job is ever handed to a leaving child), flushes its
  spans and exits; its replacement is forked at once.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import selectors
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import structlog

from millpond.contracts.pool import (
    BasePool,
    Capabilities,
    CompletionCallback,
    Execution,
    Job,
    Outcome,
)
from millpond.exceptions import WorkerLostError
from millpond.observe.throttle import Throttled
from millpond.states import TaskState
from millpond_pool_prefork import wire
from millpond_pool_prefork.child import HARD_LIMIT_SIGNAL, STOP_SIGNAL, child_main
from millpond_pool_prefork.forkserver import ForkServer
from millpond_pool_prefork.settings import PreforkConfig, resolve

__all__ = ["PreforkPool"]

log = structlog.get_logger("millpond.pool.prefork")

# child states
STARTING = "starting"  # forked (or asked for), not ready yet
IDLE = "idle"  # ready, no job
BUSY = "busy"  # running a job (maybe with more queued behind it)
EXITING = "exiting"  # told to leave, or leaving on its own (recycled): takes no job
KILLING = "killing"  # signalled by a limit or terminate_job; reported when it is gone

#: how long a child's exit status may lag behind the end of its stream before we stop waiting
STATUS_WAIT = 2.0
#: how long a stop waits for the supervisor thread and the fork server to finish
CLOSE_WAIT = 5.0

Completion = tuple[Job, Outcome]


@dataclass(eq=False)
class _Child:
    token: int
    sock: socket.socket
    state: str = STARTING
    pid: int | None = None
    pidfd: int | None = None
    #: jobs sent to it, in order: the head is running, the rest wait in its socket or its queue
    queue: deque[Job] = field(default_factory=deque)
    #: monotonic time the running job passes its hard limit
    hard_deadline: float | None = None
    #: what is reported for the job when the child is gone
    kill_reason: Outcome | None = None
    kill_at: float | None = None
    #: leave after the current job (the pool shrank, or is stopping)
    retire: bool = False
    eof: bool = False
    status: int | None = None
    status_known: bool = False
    status_deadline: float | None = None
    reader: wire.FrameReader = field(default_factory=wire.FrameReader)
    registered: bool = False
    tasks: int = 0

    @property
    def job(self) -> Job | None:
        """The job it is running (the head of its queue)."""
        return self.queue[0] if self.queue else None

    @property
    def live(self) -> bool:
        """Counts toward the pool's size: will run jobs (now or once it is ready)."""
        return self.state in (STARTING, IDLE, BUSY) and not self.retire


def _not_started(timeout: float | None) -> Outcome:
    message = (
        f"the warm stop timed out after {timeout:g}s before the task started; it goes back to "
        "the broker"
    )
    return Outcome.of(WorkerLostError(message), TaskState.LOST, requeue=True)


def describe_status(status: int | None) -> str:
    """How a child ended, in words, from its wait status."""
    if status is None:
        return "exited (its exit status is unknown)"
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        return f"exited with signal {signum} ({name})"
    if os.WIFEXITED(status):
        return f"exited with code {os.WEXITSTATUS(status)}"
    return f"exited (wait status {status})"


def loss_hint(status: int | None) -> str:
    """What a user can do about a child that died that way."""
    if status is not None and os.WIFSIGNALED(status):
        if os.WTERMSIG(status) == signal.SIGKILL:
            return (
                "; it may have run out of memory (the kernel's OOM killer sends SIGKILL; "
                "see max_memory_per_child) or been killed by an operator"
            )
        return "; the task (or a library it calls) crashed the process, or it was killed"
    return "; the task (or a library it calls) ended the process, e.g. with os._exit()"


class PreforkPool(BasePool):
    name = "prefork"
    capabilities = Capabilities(
        soft_time_limit=True, hard_time_limit=True, terminate_job=True, resize=True
    )
    #: the worker's window must cover every child's queue (`capacity`, 4 jobs per child by
    #: default) with room to spare, or the children wait for the broker instead of the pool
    default_prefetch_multiplier = 16

    @classmethod
    def check_environment(cls) -> None:
        if not hasattr(os, "fork"):
            raise RuntimeError(
                "the prefork pool needs os.fork(), which this platform does not have; use "
                "--pool threads (or solo) instead"
            )

    def __init__(
        self,
        concurrency: int,
        on_complete: CompletionCallback,
        options: Mapping[str, Any] | None = None,
        *,
        execution: Execution,
    ) -> None:
        super().__init__(concurrency, on_complete, options, execution=execution)
        self.config: PreforkConfig = resolve(self.options)
        #: recycling for memory is told at INFO, at most one line per 10 s
        self._told = Throttled(log.info)
        self._cond = threading.Condition()
        #: held from taking the outbox until its frames are written: the worker thread and the
        #: supervisor both flush, and two unserialised flushes can write one child's frames out
        #: of order (the child then runs jobs in an order the parent does not expect and their
        #: completions are dropped as stale) or interleave two partial writes
        self._send_lock = threading.Lock()
        self._children: dict[int, _Child] = {}
        self._tokens = itertools.count(1)
        self._pending: deque[tuple[Job, bytes]] = deque()
        #: frames decided under the lock, sent after it is released (`_flush`)
        self._outbox: list[tuple[_Child, bytes]] = []
        self._deadlines_changed = False
        self._server: ForkServer | None = None
        self._supervisor: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self._stopping = False
        self._abandoned = False
        self._closing = False

    @property
    def capacity(self) -> int:
        """Every child's running job and the ones queued behind it (`prefetch_per_child`), and
        the reserve the supervisor refills the children from (`reserve_per_child`)."""
        return self.concurrency * (self.config.prefetch_per_child + self.config.reserve_per_child)

    # -- introspection (tests, the CLI's status) -------------------------------------------------
    def child_pids(self) -> list[int]:
        """Process ids of the children that run or will run jobs."""
        with self._cond:
            return [c.pid for c in self._children.values() if c.pid is not None and c.live]

    def pid_of(self, task_id: str) -> int | None:
        """The process id of the child running `task_id`, if one is."""
        with self._cond:
            for child in self._children.values():
                if child.job is not None and child.job.task_id == task_id:
                    return child.pid
        return None

    @property
    def forkserver_pid(self) -> int | None:
        return self._server.pid if self._server else None

    # -- lifecycle -------------------------------------------------------------------------------
    def on_start(self) -> None:
        self._stopping = self._abandoned = self._closing = False
        self._server = ForkServer(
            partial(child_main, config=self.config, execution=self.execution),
            self.config.kill_grace,
        )
        self._server.start()  # before the supervisor thread: the server must fork thread-free
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._supervisor = threading.Thread(
            target=self._supervise, name="millpond-prefork-supervisor", daemon=True
        )
        self._supervisor.start()
        deadline = time.monotonic() + self.config.start_timeout
        with self._cond:
            self._ensure_children()
            while sum(1 for c in self._children.values() if c.state == IDLE) < self.concurrency:
                left = deadline - time.monotonic()
                if left <= 0 or self.start_cancelled.is_set():
                    break
                self._cond.wait(min(left, 0.05))  # a stop request is seen within 50 ms
            ready = sum(1 for c in self._children.values() if c.state == IDLE)
        if self.start_cancelled.is_set():
            self.on_terminate()
            return
        if ready < self.concurrency:
            self.on_terminate()
            raise RuntimeError(
                f"only {ready} of {self.concurrency} prefork children were ready after "
                f"{self.config.start_timeout:g}s; look for a child's error on stderr, or raise "
                "prefork.start_timeout on a slow machine"
            )

    def on_apply(self, job: Job) -> None:
        try:
            payload = wire.frame(("job", job))
        except Exception as exc:
            self.complete(
                job,
                Outcome.of(
                    exc,
                    message=f"task {job.task_name}[{job.task_id}] cannot be sent to a child "
                    f"process: its arguments cannot be pickled ({exc})",
                ),
            )
            return
        with self._cond:
            if self._closing or self._abandoned:
                raise RuntimeError("the prefork pool is stopped and takes no new jobs")
            self._pending.append((job, payload))
            self._dispatch()
        self._flush()

    def on_stop(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        completions: list[Completion] = []
        with self._cond:
            self._stopping = True
            for child in self._children.values():
                child.retire = True
            self._dispatch()  # pending jobs still run; idle children are told to leave
        self._flush()
        self._wake()
        with self._cond:
            while self._children:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left)
            if self._children:
                reason = (
                    f"the warm stop timed out after {timeout:g}s with the task still "
                    "running; its process was killed"
                )
                for child in self._children.values():
                    if child.job is not None and child.kill_reason is None:
                        child.kill_reason = Outcome.of(WorkerLostError(reason), TaskState.LOST)
                    while len(child.queue) > 1:  # never started: back to the broker
                        completions.append((child.queue.pop(), _not_started(timeout)))
                    self._signal(child, signal.SIGKILL)
                while self._pending:
                    completions.append((self._pending.popleft()[0], _not_started(timeout)))
                end = time.monotonic() + STATUS_WAIT + 1
                while self._children and time.monotonic() < end:
                    self._cond.wait(end - time.monotonic())
                for child in list(self._children.values()):  # never heard of again: report
                    self._finalize(child, completions)
        self._outbox.clear()
        self._report(completions)
        self._close()

    def on_terminate(self) -> None:
        with self._cond:
            self._stopping = self._abandoned = True
            for child in self._children.values():
                self._signal(child, signal.SIGKILL)
            self._pending.clear()
        self._close()

    def _close(self) -> None:
        with self._cond:
            if self._closing and self._supervisor is None:
                return
            self._closing = True
        self._wake()
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None and supervisor is not threading.current_thread():
            supervisor.join(CLOSE_WAIT)
        if self._server is not None:
            self._server.close(self.config.kill_grace + CLOSE_WAIT)
        with self._cond:
            for child in self._children.values():
                self._release(child)
            self._children.clear()
            self._cond.notify_all()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1

    # -- capabilities ----------------------------------------------------------------------------
    def processes(self) -> list[int]:
        with self._cond:
            return [c.pid for c in self._children.values() if c.live and c.pid is not None]

    def terminate_job(self, task_id: str, signum: int | None = None) -> bool:
        completions: list[Completion] = []
        found = False
        with self._cond:
            for job, payload in list(self._pending):
                if job.task_id == task_id:
                    self._pending.remove((job, payload))
                    completions.append(
                        (
                            job,
                            Outcome.revoked(
                                f"task {job.task_name}[{task_id}] was terminated before it started"
                            ),
                        )
                    )
                    found = True
            for child in list(self._children.values()):  # a kill spawns a replacement
                for queued in list(child.queue)[1:]:  # sent, not started: the child skips it
                    if queued.task_id == task_id:
                        child.queue.remove(queued)
                        self._outbox.append((child, wire.frame(("skip", task_id))))
                        completions.append(
                            (
                                queued,
                                Outcome.revoked(
                                    f"task {queued.task_name}[{task_id}] was terminated before "
                                    "it started"
                                ),
                            )
                        )
                        found = True
                running = child.job
                if running is None or running.task_id != task_id:
                    continue
                found = True
                if child.state == BUSY:
                    self._begin_kill(
                        child,
                        STOP_SIGNAL if signum is None else signum,
                        Outcome.revoked(
                            f"task {running.task_name}[{task_id}] was terminated on request; child "
                            f"process {child.pid} was stopped"
                        ),
                    )
        self._flush()
        self._wake()
        self._report(completions)
        return found

    def resize(self, concurrency: int) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        with self._cond:
            self.concurrency = concurrency
            live = [c for c in self._children.values() if c.live]
            excess = len(live) - concurrency
            # the cheapest to let go first: starting, then idle, then busy (after their job)
            order = {STARTING: 0, IDLE: 1, BUSY: 2}
            for child in sorted(live, key=lambda c: order[c.state])[: max(0, excess)]:
                child.retire = True
            self._dispatch()
            self._ensure_children()
        self._flush()
        self._wake()

    # -- children (called with the lock held) ----------------------------------------------------
    def _ensure_children(self) -> None:
        if self._abandoned or self._closing or self._server is None:
            return
        live = sum(1 for c in self._children.values() if c.live)
        if self._stopping:
            ready = sum(1 for c in self._children.values() if c.state in (STARTING, IDLE))
            want = min(len(self._pending) - ready, self.concurrency - live)
        else:
            want = self.concurrency - live
        for _ in range(max(0, want)):
            self._spawn()

    def _spawn(self) -> None:
        assert self._server is not None
        if self._server.sock is None or self._server.pid is None:
            self._restart_server()
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        token = next(self._tokens)
        try:
            self._server.spawn(token, child_end.fileno())
        except OSError as exc:
            parent_end.close()
            log.error("cannot ask the fork server for a child", error=str(exc))
            return
        finally:
            child_end.close()
        self._children[token] = _Child(token=token, sock=parent_end)
        self._wake()

    def _restart_server(self) -> None:
        log.warning(
            "the prefork fork server is gone; starting a new one from the worker process "
            "(a fork of a process with threads: less safe, restart the worker soon)"
        )
        assert self._server is not None
        self._server.close(0.1)
        self._server.start()

    def _dispatch(self) -> None:
        """Give pending jobs to the least busy children, and idle retirees their leave (into the
        outbox)."""
        sends = self._outbox
        now = time.monotonic()
        window = self.config.prefetch_per_child
        takers = [
            c
            for c in self._children.values()
            if c.state in (IDLE, BUSY) and (self._stopping or not c.retire)
        ]
        # a job waits behind a running one only when every child is busy: not while a child
        # that will take it is starting (at start-up, after a resize, a recycle or a death)
        starting = any(c.state == STARTING and c.live for c in self._children.values())
        while self._pending and takers:
            child = min(takers, key=lambda c: len(c.queue))
            if len(child.queue) >= (1 if starting else window):
                break
            job, payload = self._pending.popleft()
            child.queue.append(job)
            if child.state == IDLE:
                child.state = BUSY
                self._arm(child, now)
            sends.append((child, payload))
        for child in self._children.values():
            leaving = child.retire or self._stopping
            if child.state == IDLE and leaving and not (self._stopping and self._pending):
                child.state = EXITING
                sends.append((child, wire.frame(("exit",))))
        if self._pending:
            self._ensure_children()

    def _arm(self, child: _Child, now: float) -> None:
        """Start the hard time limit of the child's head job (it starts now, or just did)."""
        job = child.job
        if job is not None and job.time_limit:
            child.hard_deadline = now + job.time_limit
            self._deadlines_changed = True
        else:
            child.hard_deadline = None

    def _requeue(self, child: _Child, *, running: bool = True) -> None:
        """The jobs queued in a child that leaves never started (behind its head, when `running`):
        first in line for another child."""
        keep = 1 if running else 0
        while len(child.queue) > keep:
            job = child.queue.pop()
            self._pending.appendleft((job, wire.frame(("job", job))))

    def _flush(self) -> None:
        """Send what the outbox holds, one write per child (call without the lock: a send may
        block briefly)."""
        with self._send_lock:
            with self._cond:
                sends, self._outbox = self._outbox, []
                wake, self._deadlines_changed = self._deadlines_changed, False
            if wake and threading.current_thread() is not self._supervisor:
                self._wake()  # the supervisor must re-compute its timeout for the new deadline
            if not sends:
                return
            batches: dict[_Child, list[bytes]] = {}
            for child, payload in sends:
                batches.setdefault(child, []).append(payload)
            for child, payloads in batches.items():
                try:
                    child.sock.sendall(payloads[0] if len(payloads) == 1 else b"".join(payloads))
                except OSError:
                    pass  # the child died: its end of stream is seen and handled by the supervisor

    def _begin_kill(self, child: _Child, signum: int, reason: Outcome) -> None:
        child.state = KILLING
        child.kill_reason = reason
        child.hard_deadline = None
        for queued in list(child.queue)[1:]:  # they never started: another child runs them
            self._outbox.append((child, wire.frame(("skip", queued.task_id))))
        self._requeue(child)
        grace = self.config.kill_grace
        self._signal(child, signum if grace > 0 else signal.SIGKILL)
        child.kill_at = time.monotonic() + grace
        self._ensure_children()  # its replacement starts now, not when it is gone

    def _signal(self, child: _Child, signum: int) -> None:
        if child.eof and child.status_known:
            return
        try:
            if child.pidfd is not None:
                signal.pidfd_send_signal(child.pidfd, signum)
            elif child.pid is not None:
                os.kill(child.pid, signum)
        except ProcessLookupError:
            pass

    def _learn_pid(self, child: _Child, pid: int) -> None:
        if child.pid is None:
            child.pid = pid
        if child.pidfd is None and hasattr(os, "pidfd_open"):
            with contextlib.suppress(OSError):
                child.pidfd = os.pidfd_open(pid)

    def _release(self, child: _Child) -> None:
        with contextlib.suppress(OSError):
            child.sock.close()
        if child.pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(child.pidfd)
            child.pidfd = None

    def _finalize(self, child: _Child, completions: list[Completion]) -> None:
        """The child is gone: report its job, forget it, replace it."""
        self._children.pop(child.token, None)
        self._release(child)
        self._requeue(child)
        job = child.job
        child.queue.clear()
        if job is not None:
            if child.kill_reason is not None:
                completions.append((job, child.kill_reason))
            else:
                message = (
                    f"child process {child.pid} {describe_status(child.status)} while "
                    f"running task {job.task_name}[{job.task_id}]"
                    f"{loss_hint(child.status)}"
                )
                lost = Outcome.of(WorkerLostError(message), TaskState.LOST, requeue=True)
                completions.append((job, lost))
        elif child.state not in (EXITING, KILLING) and not self._stopping:
            log.warning(
                "a prefork child exited while idle; replacing it",
                pid=child.pid,
                how=describe_status(child.status),
            )
        self._ensure_children()
        self._dispatch()
        self._cond.notify_all()

    # -- the supervisor thread -------------------------------------------------------------------
    def _wake(self) -> None:
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"w")

    def _supervise(self) -> None:
        selector = selectors.DefaultSelector()
        server = self._server
        assert server is not None
        selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        server_sock = server.sock
        if server_sock is not None:
            selector.register(server_sock, selectors.EVENT_READ, "server")
        try:
            while True:
                with self._cond:
                    if self._closing:
                        return
                    if server.sock is not server_sock:  # restarted
                        if server_sock is not None:
                            with contextlib.suppress(KeyError, ValueError):
                                selector.unregister(server_sock)
                        server_sock = server.sock
                        if server_sock is not None:
                            selector.register(server_sock, selectors.EVENT_READ, "server")
                    for child in self._children.values():
                        if not child.registered and not child.eof:
                            selector.register(child.sock, selectors.EVENT_READ, child)
                            child.registered = True
                    timeout = self._next_timeout()
                events = selector.select(timeout)
                completions: list[Completion] = []
                with self._cond:
                    for key, _ in events:
                        if key.data == "wake":
                            with contextlib.suppress(BlockingIOError, OSError):
                                os.read(self._wake_r, 4096)
                        elif key.data == "server":
                            self._on_server(selector, completions)
                        else:
                            self._on_child(key.data, selector, completions)
                    self._on_deadlines(completions)
                self._flush()
                self._report(completions)
        finally:
            selector.close()

    def _next_timeout(self) -> float | None:
        deadlines = []
        for child in self._children.values():
            for when in (child.hard_deadline, child.kill_at, child.status_deadline):
                if when is not None:
                    deadlines.append(when)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _on_server(self, selector: selectors.BaseSelector, completions: list[Completion]) -> None:
        assert self._server is not None
        messages = self._server.read()
        if messages is None:
            sock = self._server.sock
            if sock is not None:
                with contextlib.suppress(KeyError, ValueError):
                    selector.unregister(sock)
            if not self._closing:
                log.error(
                    "the prefork fork server exited; children are still served, and a new "
                    "fork server is started when one is needed",
                    pid=self._server.pid,
                )
                self._server.close(0.5)
            return
        by_pid = {c.pid: c for c in self._children.values() if c.pid is not None}
        for message in messages:
            kind = message[0]
            if kind == "spawned":
                _, token, pid = message
                child = self._children.get(token)
                if child is not None:
                    self._learn_pid(child, pid)
                    by_pid[pid] = child
            elif kind == "exited":
                _, pid, status = message
                child = by_pid.get(pid)
                if child is not None:
                    child.status, child.status_known = status, True
                    if child.eof:
                        self._finalize(child, completions)
            elif kind == "failed":
                _, token, reason = message
                log.error("the fork server could not start a child", reason=reason)
                child = self._children.pop(token, None)
                if child is not None:
                    self._release(child)

    def _on_child(
        self, child: _Child, selector: selectors.BaseSelector, completions: list[Completion]
    ) -> None:
        try:
            data = child.sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            try:
                messages = child.reader.feed(data)
            except Exception as exc:  # corrupt stream: the child cannot be trusted any more
                log.error("a prefork child sent garbage; killing it", pid=child.pid, error=str(exc))
                self._signal(child, signal.SIGKILL)
                return
            for message in messages:
                self._on_message(child, message, completions)
            return
        # end of stream: the child is gone (or closed its socket, which is as good as gone)
        child.eof = True
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(child.sock)
        if child.status_known or child.pid is None:
            self._finalize(child, completions)
        else:
            child.status_deadline = time.monotonic() + STATUS_WAIT

    def _on_message(self, child: _Child, message: Any, completions: list[Completion]) -> None:
        kind = message[0]
        if kind == "ready":
            self._learn_pid(child, message[1])
            if child.state == STARTING:
                child.state = IDLE
            self._dispatch()
            self._cond.notify_all()
        elif kind == "done":
            _, task_id, outcome, leaving = message
            job = child.job
            if job is None or job.task_id != task_id:
                stray = next((j for j in child.queue if j.task_id == task_id), None)
                if stray is None:
                    return  # terminated before it started, and it raced its skip: reported already
                # a job behind the head finished first: report it rather than wait for it forever
                log.warning(
                    "a prefork child finished a job out of the order it was given",
                    pid=child.pid,
                    task_id=task_id,
                    expected=job.task_id if job is not None else None,
                )
                child.queue.remove(stray)
                child.tasks += 1
                completions.append((stray, outcome))
                return
            # a job that finished as its kill was under way: its real outcome wins
            completions.append((job, outcome))
            child.queue.popleft()
            child.tasks += 1
            if leaving is not None:
                self._requeue(child, running=False)
                child.hard_deadline = None
                if child.state == BUSY:
                    child.state = EXITING
                if "max_memory_per_child" in leaving:  # worth an operator's attention
                    self._told.log(
                        "memory", "recycling a prefork child", pid=child.pid, reason=leaving
                    )
                else:
                    log.debug("recycling a prefork child", pid=child.pid, reason=leaving)
                self._ensure_children()
            elif child.state == BUSY:
                if child.queue:
                    self._arm(child, time.monotonic())  # its next job starts now
                else:
                    child.state, child.hard_deadline = IDLE, None
            self._dispatch()

    def _on_deadlines(self, completions: list[Completion]) -> None:
        now = time.monotonic()
        for child in list(self._children.values()):
            job = child.job
            if child.hard_deadline is not None and now >= child.hard_deadline and job is not None:
                self._begin_kill(
                    child,
                    HARD_LIMIT_SIGNAL,
                    Outcome.hard_timeout(job, f"its child process {child.pid} was stopped"),
                )
            if child.kill_at is not None and now >= child.kill_at:
                child.kill_at = None
                self._signal(child, signal.SIGKILL)
            if child.status_deadline is not None and now >= child.status_deadline:
                child.status_deadline = None
                self._finalize(child, completions)

    def _report(self, completions: list[Completion]) -> None:
        if self._abandoned:
            return
        for job, outcome in completions:
            self.complete(job, outcome)
