"""The `millpond` command's entry point: monkey-patch first, import everything else after.

A green pool (gevent, eventlet) must patch the interpreter before anything creates a thread, a lock
or a socket. So this module decides the pool from argv, `MILLPOND_POOL` and the settings file using
only `sys`, `os`, `tomllib` and `importlib.metadata`, runs that pool's `millpond.patches` entry
point, and only then imports the CLI, settings, logging, telemetry and the user's app.

That is why this module reads entry points with the standard library rather than through
stevedore (`millpond.config.plugins`): importing stevedore imports `logging` (whose module-level
lock would be created unpatched) and `millpond.config`, and nothing of millpond's but this module
(and, for `python -m millpond`, the core's lazy `__init__` and `__main__`, which find this script
the same way) may be imported before the patch (the e2e test
`test_early_patch_runs_before_anything_is_imported` and the tests under `tests/green` check it).
A pool chosen only in code (`Millpond(..., pool="gevent")`) cannot be patched this early: the
worker command detects that case after importing the app and says so.
"""

from __future__ import annotations

import os
import sys


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
    """The pool the flags, the environment or the file choose, in that order of precedence."""
    return pool_from_argv(argv) or os.environ.get("MILLPOND_POOL") or pool_from_file()


def early_patch(argv: list[str]) -> str | None:
    """Run the chosen pool's patch entry point, if it has one; returns the pool name patched."""
    if "worker" not in argv:
        return None
    pool = chosen_pool(argv)
    if not pool:
        return None
    from importlib.metadata import entry_points

    for ep in entry_points(group="millpond.patches", name=pool):
        ep.load()()
        os.environ["MILLPOND_PATCHED"] = pool
        return pool
    return None


def main() -> None:
    argv = sys.argv[1:]
    patched = early_patch(argv)
    from millpond_cli.main import main as cli_main

    sys.exit(cli_main(argv, patched=patched))
