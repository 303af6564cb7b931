"""500 tasks in flight at once on the gevent pool, each with its own trace and log context."""

from __future__ import annotations

from typing import Any

import pytest

from millpond import Millpond
from millpond_green.kit import check_context_per_task

pytestmark = pytest.mark.green


def test_500_concurrent_tasks_each_keep_their_own_context(
    memory_app: Millpond, start_worker: Any, span_exporter: Any
) -> None:
    check_context_per_task(memory_app, start_worker, span_exporter, "gevent", count=500)
