"""PostgreSQL broker and result backend for millpond (psycopg 3).

    MILLPOND_BROKER_URL=postgresql://app:secret@localhost:5432/app

See docs/postgres.md for the tables, leases, delays, wake-ups and failure modes.

The public names are imported on first use (PEP 562), so the core can read the settings section
(`millpond_broker_postgres.settings`) to validate `[postgres]` without importing psycopg.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from millpond import lazy_export

if TYPE_CHECKING:
    from millpond_broker_postgres.backend import PostgresResultBackend
    from millpond_broker_postgres.broker import PostgresBroker
    from millpond_broker_postgres.config import PostgresConfig, parse
    from millpond_broker_postgres.consumer import PostgresConsumer

__all__ = [
    "PostgresBroker",
    "PostgresConfig",
    "PostgresConsumer",
    "PostgresResultBackend",
    "parse",
]
__version__ = "0.1.0"

_HOMES = {
    "PostgresBroker": "millpond_broker_postgres.broker",
    "PostgresConfig": "millpond_broker_postgres.config",
    "PostgresConsumer": "millpond_broker_postgres.consumer",
    "PostgresResultBackend": "millpond_broker_postgres.backend",
    "parse": "millpond_broker_postgres.config",
}


def __getattr__(name: str) -> Any:
    return lazy_export(globals(), _HOMES, name)
