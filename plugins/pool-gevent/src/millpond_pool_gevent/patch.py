"""Monkey-patching for the gevent pool: the `millpond.patches` entry point and its check.

gevent only helps if every blocking call in the process (sockets, `select`, `time.sleep`, locks,
threads) goes through its hub. That requires patching before the modules that use them are imported,
which is why the `millpond` command runs `patch()` before it imports its own CLI, settings, logging,
telemetry or the user's app. This module imports nothing but gevent for the same reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: modules that must be cooperative for the pool to work: the consumer loop waits in `select`, the
#: broker clients use sockets, tasks sleep, and helper threads (heartbeats, span export) become
#: greenlets only when threading is patched.
REQUIRED = ("socket", "select", "time", "_thread", "threading")


def patch() -> None:
    """Patch the whole interpreter for gevent, quietly; calling it again does nothing."""
    from gevent import monkey

    if not missing():
        return
    with _entry_points_read_once():
        monkey.patch_all()


def missing() -> list[str]:
    """The required modules gevent has not patched in this process (empty when all are)."""
    from gevent import monkey

    return [name for name in REQUIRED if not monkey.is_module_patched(name)]


@contextmanager
def _entry_points_read_once() -> Iterator[None]:
    """Answer `importlib.metadata.entry_points()` from one reading while gevent patches.

    `patch_all` announces each module it patches to gevent plugins found through entry points,
    and every announcement (about 25) reads the metadata of every installed distribution again:
    some 60 ms, a good part of a worker's start-up. Nothing gets installed while patching, so one
    reading answers them all; the real function is back as soon as patching is over.
    """
    from importlib import metadata

    real = metadata.entry_points
    everything: Any = real()

    def read_once(**params: Any) -> Any:
        return everything.select(**params) if params else everything

    setattr(metadata, "entry_points", read_once)  # noqa: B010 - typed module attribute
    try:
        yield
    finally:
        setattr(metadata, "entry_points", real)  # noqa: B010
