"""asyncio execution pool for millpond: `async def` tasks run natively on an event loop.

    pip install millpond millpond-pool-asyncio
    millpond worker -A shop.tasks:app --pool asyncio -c 500

See pool.py for how it works and docs/writing-a-pool.md for the contract it implements.
"""

from __future__ import annotations

from millpond_pool_asyncio.pool import AsyncioPool
from millpond_pool_asyncio.settings import SETTINGS

__all__ = ["SETTINGS", "AsyncioPool"]
__version__ = "0.1.0"
