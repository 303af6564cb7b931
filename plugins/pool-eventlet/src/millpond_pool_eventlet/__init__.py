"""eventlet greenthread pool for millpond (legacy: eventlet is deprecated upstream; prefer gevent).

This package is imported twice in a worker's life: first by the `millpond` command for its
`millpond.patches` entry point (`millpond_pool_eventlet.patch:patch`), before anything else is
imported, and later for the pool class. So importing the package itself must import neither
eventlet nor millpond: `EventletPool` is resolved lazily from `millpond_pool_eventlet.pool`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["EventletPool"]

if TYPE_CHECKING:
    from millpond_pool_eventlet.pool import EventletPool


def __getattr__(name: str) -> Any:
    if name == "EventletPool":
        from millpond_pool_eventlet.pool import EventletPool

        return EventletPool
    raise AttributeError(f"module 'millpond_pool_eventlet' has no attribute {name!r}")
