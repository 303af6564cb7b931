"""`app.control` is typed: the core's `ControlClient` protocol, which millpond-control's `Control`
meets, so `mypy --strict` checks remote-control calls like any typed call.

Like core/tests/test_typing.py: two samples, one strict mypy run with a config of its own; the
good one must pass clean, the bad one must give exactly the errors its `# E:` markers say.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

CONTROL_OK = textwrap.dedent('''\
    """What users call on app.control; mypy --strict must report nothing."""

    from typing import Any, assert_type

    from millpond import Millpond
    from millpond.contracts.clients import ControlClient, InspectClient
    from millpond_control.client import Control, open_control

    app = Millpond("typing-control", broker_url="memory://typing-control")


    def check() -> None:  # type-checked, never run: it would wait for workers
        assert_type(app.control, ControlClient)
        mine: ControlClient = open_control(app)  # the plugin's class meets the core protocol
        inspector: InspectClient = mine.inspect(timeout=0.5)
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
        app.control.revoke(1)  # E: Argument 1 to "revoke" of "ControlClient" has incompatible type "int"; expected "str | Sequence[str]"  [arg-type]
        app.control.revoke("id", terminate="yes")  # E: Argument "terminate" to "revoke" of "ControlClient" has incompatible type "str"; expected "bool"  [arg-type]
        app.control.rate_limit("tasks.add", [10])  # E: Argument 2 to "rate_limit" of "ControlClient" has incompatible type "list[int]"; expected "str | float | None"  [arg-type]
        app.control.inspect().actve()  # E: "InspectClient" has no attribute "actve"; maybe "active"?  [attr-defined]
        app.control.revokee("id")  # E: "ControlClient" has no attribute "revokee"; maybe "revoke"?  [attr-defined]
''')


def expected_errors(source: str) -> list[tuple[int, str]]:
    return [
        (n, line.split("# E: ", 1)[1].strip())
        for n, line in enumerate(source.splitlines(), 1)
        if "# E: " in line
    ]


@pytest.fixture(scope="module")
def mypy_errors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[int, str]]]:
    workdir = tmp_path_factory.mktemp("control-typing")
    (workdir / "control_ok.py").write_text(CONTROL_OK)
    (workdir / "control_bad.py").write_text(CONTROL_BAD)
    (workdir / "mypy.ini").write_text("[mypy]\nstrict = True\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(workdir / "mypy.ini"),
            "--cache-dir",
            str(workdir / ".mypy_cache"),
            "--no-color-output",
            "--no-error-summary",
            "--hide-error-context",
            "control_ok.py",
            "control_bad.py",
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode in (0, 1), f"mypy crashed:\n{proc.stdout}\n{proc.stderr}"
    found: dict[str, list[tuple[int, str]]] = {}
    for line in proc.stdout.splitlines():
        match = re.match(r"(control_\w+\.py):(\d+): error: (.*)$", line)
        if match:
            found.setdefault(match[1], []).append((int(match[2]), match[3]))
    assert "error:" not in proc.stdout or found, proc.stdout  # errors outside the samples
    return found


def test_what_users_call_on_app_control_type_checks_clean(
    mypy_errors: dict[str, list[tuple[int, str]]],
) -> None:
    assert mypy_errors.get("control_ok.py", []) == []


def test_wrong_calls_on_app_control_are_reported_where_marked(
    mypy_errors: dict[str, list[tuple[int, str]]],
) -> None:
    assert mypy_errors.get("control_bad.py", []) == expected_errors(CONTROL_BAD)


def test_app_control_is_the_plugins_class(tmp_path: Path) -> None:
    """What mypy is told is what runs: `app.control` is a `Control`, which meets the protocol."""
    from millpond import Millpond
    from millpond_control.client import Control

    app = Millpond("typing-control-runtime", broker_url="memory://typing-control-runtime")
    try:
        assert isinstance(app.control, Control)
    finally:
        app.close()
