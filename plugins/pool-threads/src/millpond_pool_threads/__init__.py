"""millpond's threads pool: N long-lived threads for I/O-bound tasks (`--pool threads`)."""

from __future__ import annotations

from millpond_pool_threads.pool import ThreadPool
from millpond_pool_threads.settings import SECTION

__all__ = ["SECTION", "ThreadPool"]
