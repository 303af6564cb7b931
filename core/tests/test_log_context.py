"""`logs.context_binder`: the fast way a task's ids get into structlog's context-local context."""

from __future__ import annotations

import contextvars

import pytest
import structlog

from millpond.observe import logs


def _bound_in_fresh_context(bind: object, *values: object) -> dict[str, object]:
    def run() -> dict[str, object]:
        bind(*values)  # type: ignore[operator]
        return structlog.contextvars.get_contextvars()

    return contextvars.Context().run(run)


@pytest.mark.parametrize(
    "keys", [("one",), ("trace_id", "span_id"), ("a", "b", "c"), tuple("wxyz")]
)
def test_binds_like_bind_contextvars(keys: tuple[str, ...]) -> None:
    values = tuple(f"value of {key}" for key in keys)
    assert _bound_in_fresh_context(logs.context_binder(*keys), *values) == dict(
        zip(keys, values, strict=True)
    )


def test_binding_again_replaces_and_merges_with_other_keys() -> None:
    bind = logs.context_binder("task_id", "retries")

    def run() -> dict[str, object]:
        structlog.contextvars.bind_contextvars(worker="w1")
        bind("t-1", 0)
        bind("t-1", 1)
        return structlog.contextvars.get_contextvars()

    assert contextvars.Context().run(run) == {"worker": "w1", "task_id": "t-1", "retries": 1}


def test_nothing_leaks_into_the_callers_context() -> None:
    logs.context_binder("leak_probe")
    assert "leak_probe" not in structlog.contextvars.get_contextvars()


def test_falls_back_to_bind_contextvars_when_structlog_keeps_its_context_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(logs, "_structlog_variables", lambda keys: None)
    bind = logs.context_binder("task_id", "task_name")
    assert _bound_in_fresh_context(bind, "t-1", "add") == {"task_id": "t-1", "task_name": "add"}
    with pytest.raises(ValueError, match="shorter"):
        _bound_in_fresh_context(bind, "only one")
