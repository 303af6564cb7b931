"""Keeps the green suites out of any pytest session that was not started for one of them.

gevent and eventlet monkey-patch the whole interpreter from their test directory's conftest.py
(plugins/pool-gevent/tests, plugins/pool-eventlet/tests), so each suite must run in its own pytest
process (`python3 dev.py test` does: see GREEN_SUITES in dev.py). A session started on anything
else (plain `pytest`, whose testpaths include every plugin's tests, or `pytest plugins`) skips
them here, before their conftest files are imported, instead of patching everyone else's tests;
asking for two green suites in one session is a usage error. This file is imported before
patching: stdlib and pytest only (dev.py imports nothing else either).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from dev import GREEN_SUITES

HERE = Path(__file__).resolve().parent
SUITES = {Path(suite).parent.name.removeprefix("pool-"): HERE / suite for suite in GREEN_SUITES}


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def _requested(config: pytest.Config) -> set[str]:
    """The green suites this session's command-line arguments point into (never `testpaths`,
    which names them all)."""
    chosen: set[str] = set()
    if config.args_source is not pytest.Config.ArgsSource.ARGS:
        return chosen
    for arg in config.args:
        path = Path(config.invocation_params.dir, arg.split("::", 1)[0]).resolve()
        chosen.update(name for name, suite in SUITES.items() if _inside(path, suite))
    return chosen


def pytest_configure(config: pytest.Config) -> None:
    chosen = _requested(config)
    if len(chosen) > 1:
        raise pytest.UsageError(
            f"the {' and '.join(sorted(chosen))} test suites monkey-patch the interpreter and "
            "cannot share a pytest process: run each on its own, e.g. "
            "`python -m pytest plugins/pool-gevent/tests` then "
            "`python -m pytest plugins/pool-eventlet/tests` (python3 dev.py test does this)"
        )


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    path = Path(collection_path).resolve()
    requested = _requested(config)
    for name, suite in SUITES.items():
        if _inside(path, suite) and name not in requested:
            return True
    return None
