"""`app.control` is typed as millpond-control's `Control`, so `mypy --strict` checks
remote-control calls like any typed call.

Like core/tests/test_typing.py: two samples, one strict mypy run with a config of its own; the
good one must pass clean, the bad one must give exactly the errors its `# E:` markers say.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from millpond.testing.typecheck import expected_errors, strict_mypy

CONTROL_OK = textwrap.dedent('''\
    """What users call on app.control; mypy --strict must report nothing."""

    from typing import Any, assert_type

    from millpond import Millpond
    from millpond_control.client import Control, Inspect, open_control

    app = Millpond("typing-control", broker_url="memory://typing-control")


    def check() -> None:  # type-checked, never run: it would wait for workers
        assert_type(app.control, Control)
        mine: Control = open_control(app)
        inspector: Inspect = mine.inspect(timeout=0.5)
        assert_type(inspector.active(), dict[str, Any] | None)
        replies = app.control.revoke("a-task-id", terminate=True, reply=True)
        assert_type(replies, list[dict[str, Any]] | None)
        app.control.revoke(["one", "two"], destination=["w1@host"])
        app.control.rate_limit("tasks.add", "10/m", reply=True)
        app.control.rate_limit("tasks.add", None)
        assert_type(app.control.ping(timeout=0.5), list[dict[str, Any]])
        app.control.broadcast("shutdown", destination=["w1@host"])
        app.control.add_consumer("images", reply=True)
        assert isinstance(app.control, Control)
''')

CONTROL_BAD = textwrap.dedent('''\
    """Mistakes mypy --strict must report on app.control, each where the markers say."""

    from millpond import Millpond

    app = Millpond("typing-control", broker_url="memory://typing-control")


    def mistakes() -> None:
        app.control.revoke(1)  # E: Argument 1 to "revoke" of "Control" has incompatible type "int"; expected "str | Sequence[str]"  [arg-type]
        app.control.revoke("id", terminate="yes")  # E: Argument "terminate" to "revoke" of "Control" has incompatible type "str"; expected "bool"  [arg-type]
        app.control.rate_limit("tasks.add", [10])  # E: Argument 2 to "rate_limit" of "Control" has incompatible type "list[int]"; expected "str | float | None"  [arg-type]
        app.control.inspect().actve()  # E: "Inspect" has no attribute "actve"; maybe "active"?  [attr-defined]
        app.control.revokee("id")  # E: "Control" has no attribute "revokee"; maybe "revoke"?  [attr-defined]
''')


@pytest.fixture(scope="module")
def mypy_errors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[int, str]]]:
    samples = {"control_ok.py": CONTROL_OK, "control_bad.py": CONTROL_BAD}
    return strict_mypy(tmp_path_factory.mktemp("control-typing"), samples)


def test_what_users_call_on_app_control_type_checks_clean(
    mypy_errors: dict[str, list[tuple[int, str]]],
) -> None:
    assert mypy_errors.get("control_ok.py", []) == []


def test_wrong_calls_on_app_control_are_reported_where_marked(
    mypy_errors: dict[str, list[tuple[int, str]]],
) -> None:
    assert mypy_errors.get("control_bad.py", []) == expected_errors(CONTROL_BAD)


def test_app_control_is_the_plugins_class(tmp_path: Path) -> None:
    """What mypy is told is what runs: `app.control` is a `Control`."""
    from millpond import Millpond
    from millpond_control.client import Control

    app = Millpond("typing-control-runtime", broker_url="memory://typing-control-runtime")
    try:
        assert isinstance(app.control, Control)
    finally:
        app.close()
