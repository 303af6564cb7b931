"""Monkey-patching for the eventlet pool: the `millpond.patches` entry point and its check.

eventlet only helps if every blocking call in the process (sockets, `select`, `time.sleep`, locks,
threads) goes through its hub, which requires patching before the modules that use them are
imported: the `millpond` command runs `patch()` before it imports its own CLI, settings, logging,
telemetry or the user's app. This module imports nothing but eventlet for the same reason.

Importing eventlet prints a multi-line EventletDeprecationWarning. The pool replaces it with a
one-line notice in the worker's own log when it starts, so `patch()` keeps the import quiet.
"""

from __future__ import annotations

import warnings

#: modules that must be cooperative for the pool to work: the consumer loop waits in `select`, the
#: broker clients use sockets, tasks sleep, and helper threads (heartbeats, span export) become
#: greenthreads only when threading is patched.
REQUIRED = ("socket", "select", "time", "thread")


def import_eventlet() -> None:
    """`import eventlet` without its import-time deprecation warning (the pool logs its own)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
        # eventlet imports dnspython, whose DNSSEC module touches cryptography's DSA classes when
        # cryptography is installed: a deprecation notice about code the worker never runs
        warnings.filterwarnings("ignore", message=r"DSA is deprecated", module=r"dns\.")
        import eventlet  # noqa: F401


def patch() -> None:
    """Patch the whole interpreter for eventlet, quietly; calling it again does nothing.

    eventlet's green `select` can return a result meant for an earlier call; it is replaced by a
    corrected one (see `millpond_pool_eventlet.greenselect`).
    """
    import_eventlet()
    import eventlet

    from millpond_pool_eventlet import greenselect

    if missing():
        eventlet.monkey_patch()
    greenselect.install()  # also when someone else called eventlet.monkey_patch() first


def missing() -> list[str]:
    """The required modules eventlet has not patched in this process (empty when all are)."""
    import_eventlet()
    from eventlet import patcher

    return [name for name in REQUIRED if not patcher.is_monkey_patched(name)]
