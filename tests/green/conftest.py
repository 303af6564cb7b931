"""Keeps the green suites out of any pytest session that was not started for one of them.

gevent and eventlet monkey-patch the whole interpreter from their directory's conftest.py, so each
suite must run in its own pytest process (`python3 dev.py test` does: see GREEN_SUITES in dev.py).
A session started on a parent directory (`pytest tests`, or plain `pytest`) skips them here, before
their conftest files are imported, instead of patching everyone else's tests; asking for two green
suites in one session is a usage error. This file is imported before patching: stdlib only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SUITES = ("gevent", "eventlet")


def _requested(config: pytest.Config) -> set[str]:
    """The green suites this session's command-line arguments point into."""
    chosen: set[str] = set()
    for arg in config.args:
        path = Path(config.invocation_params.dir, arg.split("::", 1)[0]).resolve()
        for suite in SUITES:
            if path == HERE / suite or (HERE / suite) in path.parents:
                chosen.add(suite)
    return chosen


def pytest_configure(config: pytest.Config) -> None:
    chosen = _requested(config)
    if len(chosen) > 1:
        raise pytest.UsageError(
            f"the {' and '.join(sorted(chosen))} test suites monkey-patch the interpreter and "
            "cannot share a pytest process: run each on its own, e.g. "
            "`python -m pytest tests/green/gevent` then `python -m pytest tests/green/eventlet` "
            "(python3 dev.py test does this)"
        )


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    path = Path(collection_path).resolve()
    for suite in SUITES:
        if (path == HERE / suite or HERE / suite in path.parents) and suite not in _requested(
            config
        ):
            return True
    return None
