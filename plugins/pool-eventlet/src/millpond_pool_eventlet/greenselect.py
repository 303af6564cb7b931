"""A green `select.select` for eventlet that never hands a greenlet another call's result.

eventlet's green `select` registers one hub listener per file descriptor and returns as soon as the
first of them fires. When several become ready in the same poll, the hub has already collected all
their callbacks before calling any (eventlet/hubs/poll.py), so after the first one switched the
greenlet back with its result, the others still fire, into whatever that greenlet waits on next: a
later `select` returns an object it was never given (the Redis broker's doorbell then failed with
"'Waker' object has no attribute 'read'"), and any other wait can end early with a bogus value.

This is eventlet's function with one change: its callbacks do nothing once the call has returned.
`install()` puts it wherever eventlet's version was: `select.select`, `eventlet.green.select` and
the green `selectors.SelectSelector` (the only selector left after patching).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

SelectResult = tuple[list[Any], list[Any], list[Any]]

#: eventlet's own green select, kept by `install()` (the tests show what it gets wrong)
upstream: Any = None


def select(
    read_list: Iterable[Any],
    write_list: Iterable[Any],
    error_list: Iterable[Any],
    timeout: float | None = None,
) -> SelectResult:
    import eventlet
    from eventlet.green.select import get_fileno
    from eventlet.hubs import get_hub

    if timeout is not None:
        try:
            timeout = float(timeout)
        except ValueError:
            raise TypeError("Expected number for timeout") from None
    hub = get_hub()
    current = eventlet.getcurrent()
    if hub.greenlet is current:
        raise RuntimeError("do not call blocking functions from the mainloop")
    wanted: dict[int, dict[str, Any]] = {}
    for obj in read_list:
        wanted[get_fileno(obj)] = {"read": obj}
    for obj in write_list:
        wanted.setdefault(get_fileno(obj), {})["write"] = obj
    for obj in error_list:
        wanted.setdefault(get_fileno(obj), {})["error"] = obj

    returned = False

    def wake(result: SelectResult) -> None:
        nonlocal returned
        if not returned:  # a listener of a call that already returned: stay quiet
            returned = True
            current.switch(result)

    def on_read(fd: Any) -> None:
        wake(([wanted[get_fileno(fd)]["read"]], [], []))

    def on_write(fd: Any) -> None:
        wake(([], [wanted[get_fileno(fd)]["write"]], []))

    timers: list[Any] = []

    def on_timeout() -> None:
        # one more turn of the hub first, so a descriptor ready right now still wins
        timers.append(hub.schedule_call_global(0, wake, ([], [], [])))

    if timeout is not None:
        timers.append(hub.schedule_call_global(timeout, on_timeout))
    listeners: list[Any] = []
    try:
        for fd, kinds in wanted.items():
            if "read" in kinds:
                listeners.append(hub.add(hub.READ, fd, on_read, current.throw, lambda: None))
            if "write" in kinds:
                listeners.append(hub.add(hub.WRITE, fd, on_write, current.throw, lambda: None))
        try:
            result: SelectResult = hub.switch()
            return result
        finally:
            returned = True
            for listener in listeners:
                hub.remove(listener)
    finally:
        for timer in timers:
            timer.cancel()


def install() -> None:
    """Replace eventlet's green `select` with this one (after `eventlet.monkey_patch()`)."""
    import select as select_module
    import selectors

    import eventlet.green.select as green_select

    global upstream
    if green_select.select is not select:
        upstream = green_select.select
    select_module.select = select
    green_select.select = select
    green_selector = getattr(selectors, "SelectSelector", None)
    if green_selector is not None and hasattr(green_selector, "_select"):
        green_selector._select = staticmethod(select)
