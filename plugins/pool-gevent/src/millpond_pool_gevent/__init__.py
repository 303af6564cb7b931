"""gevent greenlet pool for millpond: thousands of concurrent I/O-bound tasks in one process.

This package is imported twice in a worker's life: first by the `millpond` command for its
`millpond.patches` entry point (`millpond_pool_gevent.patch:patch`), before anything else is
imported, and later for the pool class. So importing the package itself must import neither gevent
nor millpond: `GeventPool` is resolved lazily from `millpond_pool_gevent.pool`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["GeventPool"]

if TYPE_CHECKING:
    from millpond_pool_gevent.pool import GeventPool


def __getattr__(name: str) -> Any:
    if name == "GeventPool":
        from millpond_pool_gevent.pool import GeventPool

        return GeventPool
    raise AttributeError(f"module 'millpond_pool_gevent' has no attribute {name!r}")
