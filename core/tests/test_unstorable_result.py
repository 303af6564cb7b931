"""A task whose return value cannot be stored as JSON: its caller gets a FAILURE saying why.

The backend refuses the value with TypeError (the result-backend contract, checked for every
backend by the broker kit); the worker then stores a TypeError FAILURE in its place, so `get()`
raises at once instead of waiting for a result that never comes. A real worker on the memory
broker, whose backend stores through JSON as the real ones do.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from millpond import Millpond
from millpond.testing.fixtures import RunningWorker


def test_a_result_that_is_not_json_fails_the_task_with_a_type_error(
    memory_app: Millpond, start_worker: Callable[..., RunningWorker]
) -> None:
    @memory_app.task
    def shapeless() -> object:
        return object()

    @memory_app.task
    def fine() -> int:
        return 1

    start_worker(memory_app, pool="threads", concurrency=1)
    with pytest.raises(TypeError, match="result is not JSON serializable"):
        shapeless.delay().get(timeout=20)
    assert fine.delay().get(timeout=20) == 1  # the worker carries on
