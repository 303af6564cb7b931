"""millpond's prefork pool: N pre-forked child processes (`--pool prefork`)."""

from __future__ import annotations

from millpond_pool_prefork.pool import PreforkPool
from millpond_pool_prefork.settings import SECTION

__all__ = ["SECTION", "PreforkPool"]
