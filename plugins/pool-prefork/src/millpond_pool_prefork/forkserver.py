"""The fork server: a process forked once, at pool start, whose only job is to fork children.

Why: the pool needs new children long after start-up (a child was killed, recycled, or the pool
grew), when the worker has threads (the consumer's heartbeats, the pool's supervisor, the batch span
processor). Forking a multi-threaded process copies locks that other threads may hold at that
instant, and the child can deadlock on them. The fork server is a copy of the worker taken before
those threads existed, with the app imported; it stays single-threaded and idle, so each child it
forks is a clean copy of that state.

Protocol, over a SOCK_SEQPACKET socketpair (one message per send, file descriptors attached):

* parent -> server: `("spawn", token)` with one socket fd: fork a child that serves on that socket.
* server -> parent: `("spawned", token, pid)`, `("failed", token, reason)`, and
  `("exited", pid, wait_status)` whenever one of its children ends (only the server can reap them).

When the parent closes its end (a stop, or the worker died), the server asks its remaining
children to stop (SIGTERM), gives them `grace` seconds, SIGKILLs the rest, reaps and exits.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

#: the largest control message (they are tiny tuples)
_MESSAGE_SIZE = 4096

ChildTarget = Callable[[socket.socket], NoReturn]


def wait_pid(pid: int, timeout: float) -> int | None:
    """Reap our child `pid` within `timeout` seconds; its wait status, or None if still running."""
    deadline = time.monotonic() + timeout
    pidfd = _pidfd(pid)
    try:
        while True:
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return 0  # already reaped elsewhere
            if done:
                return status
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if pidfd is not None:
                select.select([pidfd], [], [], left)  # readable when the process exits
            else:
                time.sleep(min(left, 0.01))
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _pidfd(pid: int) -> int | None:
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        return int(opener(pid))
    except OSError:
        return None


class ForkServer:
    """The parent's handle on the fork server process."""

    def __init__(self, target: ChildTarget, grace: float) -> None:
        self._target = target
        self._grace = grace
        self.pid: int | None = None
        self.sock: socket.socket | None = None

    def start(self) -> None:
        """Fork the server now (call before the process starts threads)."""
        for stream in (sys.stdout, sys.stderr):  # or every child would repeat buffered output
            with contextlib.suppress(Exception):
                stream.flush()
        parent_end, server_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the server process (coverage cannot see it)
            code = 1
            try:
                parent_end.close()
                code = _serve(server_end, self._target, self._grace)
            except BaseException:
                with contextlib.suppress(BaseException):
                    sys.stderr.write(f"millpond fork server crashed:\n{traceback.format_exc()}")
            finally:
                os._exit(code)
        server_end.close()
        self.pid = pid
        self.sock = parent_end

    def spawn(self, token: int, fd: int) -> None:
        """Ask for a child serving on socket `fd` (the reply arrives through `read`)."""
        assert self.sock is not None
        socket.send_fds(self.sock, [pickle.dumps(("spawn", token))], [fd])

    def read(self) -> list[Any] | None:
        """The messages waiting on the control socket; None once the server is gone."""
        assert self.sock is not None
        out: list[Any] = []
        while True:
            try:
                data = self.sock.recv(_MESSAGE_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return out
            except OSError:
                return out or None
            if not data:
                return out or None
            out.append(pickle.loads(data))  # noqa: S301 - our own process at the other end

    def close(self, timeout: float) -> None:
        """Close the control socket (the server then stops its children) and reap the server."""
        sock, pid = self.sock, self.pid
        self.sock = None
        if sock is not None:
            sock.close()
        if pid is not None:
            if wait_pid(pid, timeout) is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                wait_pid(pid, 5.0)
            self.pid = None


# -- the server process ----------------------------------------------------------------------------


def _serve(ctrl: socket.socket, target: ChildTarget, grace: float) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGQUIT"):
        signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM):
        signal.signal(signum, signal.SIG_DFL)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    # Every child is a copy of this process: move what it holds (the app, the imported modules)
    # out of the collector's reach, so a child's collections never write to those objects' GC
    # headers and their pages stay shared with this process instead of being copied per child.
    # No gc.collect() first: it would cost every prefork start a full collection (tens of ms) to
    # spare the few young objects that freezing keeps alive.
    gc.freeze()
    children: set[int] = set()

    def reply(message: tuple[Any, ...]) -> bool:
        try:
            ctrl.send(pickle.dumps(message))
            return True
        except OSError:
            return False

    def reap() -> bool:
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                children.clear()
                break
            if pid == 0:
                break
            children.discard(pid)
            if not reply(("exited", pid, status)):
                return False
        return True

    try:
        while True:
            readable, _, _ = select.select([ctrl.fileno(), wake_r], [], [])
            if wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 512)
                if not reap():
                    break
            if ctrl.fileno() in readable:
                try:
                    data, fds, _flags, _addr = socket.recv_fds(ctrl, _MESSAGE_SIZE, 1)
                except OSError:
                    break
                if not data:
                    break  # the parent closed its end, or died
                kind, token = pickle.loads(data)  # noqa: S301
                if kind != "spawn" or len(fds) != 1:
                    for fd in fds:
                        os.close(fd)
                    reply(("failed", token, f"bad request {kind!r} with {len(fds)} fds"))
                    continue
                try:
                    pid = os.fork()
                except OSError as exc:
                    os.close(fds[0])
                    reply(("failed", token, f"fork failed: {exc}"))
                    continue
                if pid == 0:  # pragma: no cover - the new child
                    _become_child(ctrl, (wake_r, wake_w), fds[0], target)
                os.close(fds[0])
                children.add(pid)
                if not reply(("spawned", token, pid)):
                    break
    finally:
        _stop_children(children, grace)
    return 0


def _become_child(
    ctrl: socket.socket, pipe: tuple[int, int], fd: int, target: ChildTarget
) -> NoReturn:
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        ctrl.close()
        for end in pipe:
            os.close(end)
        sock = socket.socket(fileno=fd)
    except BaseException:
        os._exit(71)
    target(sock)


def _stop_children(children: set[int], grace: float) -> None:
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while children and time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid:
            children.discard(pid)
        else:
            time.sleep(0.01)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in list(children):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
