"""Early patching for the gevent pool: the shared green-pool checks, and gevent's own warning."""

from __future__ import annotations

import subprocess
import sys

import pytest

import millpond_pool_gevent.patch
from millpond_green.suite import GreenPatchingSuite
from millpond_pool_gevent import GeventPool

pytestmark = pytest.mark.green


class TestGeventPatching(GreenPatchingSuite):
    pool = "gevent"
    pool_class = GeventPool
    patch_module = millpond_pool_gevent.patch


def test_the_warning_check_would_catch_a_late_patch() -> None:
    """The clean-stderr check of the suite is not vacuous: patching after ssl users were imported
    warns."""
    code = "import requests\nfrom millpond_pool_gevent.patch import patch\npatch()\n"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "MonkeyPatchWarning" in proc.stderr
