"""Run a step in a helper thread and give up on it after a deadline.

A producer or client stuck inside a broker call cannot be interrupted from outside, and one stuck
run must not hang a half-hour benchmark: the step runs in a daemon thread, and when it overruns,
the run fails with a message saying which step and how long, and the thread is abandoned (it holds
only that run's connection, and dies with the harness).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from benchmarks.model import RunFailed

T = TypeVar("T")


def bounded(step: Callable[[], T], timeout: float, what: str) -> T:
    """`step()`'s value, or `RunFailed` if it takes more than `timeout` seconds; its exception
    propagates unchanged."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = step()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"bounded: {what}", daemon=True)
    thread.start()
    thread.join(max(timeout, 0.0))
    if thread.is_alive():
        raise RunFailed(f"{what} did not finish within {timeout:g} s (abandoned)")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]
