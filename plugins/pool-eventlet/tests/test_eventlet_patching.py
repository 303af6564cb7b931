"""Early patching for the eventlet pool: the shared green-pool checks, and eventlet's deprecation
warning replaced by one log line."""

from __future__ import annotations

import subprocess
import sys

import pytest

import millpond_pool_eventlet.patch
from millpond.testing.harness import WorkerProcess
from millpond_green.suite import GreenPatchingSuite
from millpond_pool_eventlet import EventletPool
from millpond_pool_eventlet.pool import DEPRECATION_NOTICE

pytestmark = pytest.mark.green


class TestEventletPatching(GreenPatchingSuite):
    pool = "eventlet"
    pool_class = EventletPool
    patch_module = millpond_pool_eventlet.patch

    def check_worker_output(self, worker: WorkerProcess) -> None:
        assert "EventletDeprecationWarning" not in worker.stderr()
        notices = [line for line in worker.lines() if line.get("event") == DEPRECATION_NOTICE]
        assert len(notices) == 1, worker.stderr()[-3000:]
        assert notices[0]["level"] == "warning"


def test_the_warning_check_would_catch_eventlets_own_notice() -> None:
    """The stderr check of the suite is not vacuous: a bare `import eventlet` prints its
    multi-line deprecation warning, which `patch()` replaces with the pool's one-line notice."""
    proc = subprocess.run(
        [sys.executable, "-c", "import eventlet"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "EventletDeprecationWarning" in proc.stderr
