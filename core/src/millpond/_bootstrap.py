"""The `millpond` command's entry point: monkey-patch first, import everything else after.

A green pool (gevent, eventlet) must patch the interpreter before anything creates a thread, a lock
or a socket. So this module decides the pool from argv, `MILLPOND_POOL` and the settings file using
only `sys`, `os`, `tomllib` and `importlib.metadata`, runs that pool's `millpond.patches` entry
point, and only then imports the CLI, settings, logging, telemetry and the user's app.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint


def pool_from_argv(argv: list[str]) -> str | None:
    """The value of -P/--pool in a `worker` command line, if given."""
    if "worker" not in argv:
        return None
    for i, arg in enumerate(argv):
        if arg in ("-P", "--pool") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--pool="):
            return arg.split("=", 1)[1]
        if arg.startswith("-P") and len(arg) > 2 and not arg.startswith("--"):
            return arg[2:].lstrip("=")
    return None


def pool_from_file() -> str | None:
    path = os.environ.get("MILLPOND_SETTINGS_FILE") or "millpond.toml"
    if not os.path.isfile(path):
        return None
    import tomllib

    try:
        with open(path, "rb") as fh:
            value = tomllib.load(fh).get("pool")
    except (OSError, tomllib.TOMLDecodeError):
        return None  # the settings loader reports it properly later
    return value if isinstance(value, str) else None


def chosen_pool(argv: list[str]) -> str | None:
    return pool_from_argv(argv) or os.environ.get("MILLPOND_POOL") or pool_from_file()


_entry_points_cache: dict[str, list[EntryPoint]] | None = None


def entry_points_by_group() -> dict[str, list[EntryPoint]]:
    """Every installed entry point, read once per process (reading them scans every installed
    distribution: tens of milliseconds in a large environment), grouped by group name."""
    global _entry_points_cache
    if _entry_points_cache is None:
        from importlib.metadata import distributions

        grouped: dict[str, list[EntryPoint]] = {}
        seen: set[str] = set()
        for dist in distributions():  # first on sys.path wins, as importlib.metadata does
            name = (dist.metadata["Name"] or "").lower().replace("_", "-")
            if name in seen:
                continue
            seen.add(name)
            for ep in dist.entry_points:
                grouped.setdefault(ep.group, []).append(ep)
        _entry_points_cache = grouped
    return _entry_points_cache


def early_patch(argv: list[str]) -> str | None:
    """Run the chosen pool's patch entry point, if it has one; returns the pool name patched."""
    if "worker" not in argv:
        return None
    pool = chosen_pool(argv)
    if not pool:
        return None
    for ep in entry_points_by_group().get("millpond.patches", []):
        if ep.name != pool:
            continue
        ep.load()()
        os.environ["MILLPOND_PATCHED"] = pool
        return pool
    return None


def main() -> None:
    argv = sys.argv[1:]
    early_patch(argv)
    from millpond.cli import main as cli_main

    sys.exit(cli_main(argv))
