"""`millpond control` as a user runs it: a wrong `--args` is a usage error (exit 2) that names the
flag, before any broadcast is sent."""

from __future__ import annotations

from pathlib import Path

from millpond.testing.harness import run_command, sqlite_url


def test_control_args_that_are_not_an_object_are_refused(tmp_path: Path) -> None:
    done = run_command(
        "control", "revoke", "some-id", "--args", "[1]", "-b", sqlite_url(tmp_path), cwd=tmp_path
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--args must be a JSON object" in done.stderr
    assert "Traceback" not in done.stderr
