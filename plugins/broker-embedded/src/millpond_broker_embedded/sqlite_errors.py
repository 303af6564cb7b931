"""sqlite3 errors said as millpond errors: what failed on which file, and what to do.

Shared by the sqlite broker and its exchanges (remote control and events), which both run
statements on the same file.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from millpond.exceptions import BrokerError


@contextmanager
def translate(what: str, path: Path, error: type[Exception] = BrokerError) -> Iterator[None]:
    """Turn sqlite3 errors into millpond errors that say what failed and what to do."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        hint = (
            "another process held a write lock for longer than busy_timeout; raise busy_timeout "
            "or check for a stuck process"
            if "locked" in str(exc) or "busy" in str(exc)
            else "check the file, its directory permissions and free disk space"
        )
        raise error(f"sqlite broker {path}: could not {what}: {exc}; {hint}") from exc
    except sqlite3.Error as exc:
        raise error(f"sqlite broker {path}: could not {what}: {exc}") from exc
