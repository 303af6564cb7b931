"""Strict mypy over sample programs, for the typing tests of the core and of plugins.

A typing test writes a sample that must check clean and one whose mistakes are marked on their
lines with `# E: <message>  [<code>]`; `strict_mypy` runs mypy once over both, with a config of
its own (so neither the workspace's `[tool.mypy]` nor a user's applies), and `expected_errors`
reads the marks to compare with.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

MARKER = "# E: "
_ERROR = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+): error: (?P<message>.*)$")


def expected_errors(source: str) -> list[tuple[int, str]]:
    """(line, "message  [code]") for every `# E:` mark of `source`, in order."""
    return [
        (number, message.strip())
        for number, line in enumerate(source.splitlines(), start=1)
        for message in line.split(MARKER)[1:]
    ]


def strict_mypy(
    workdir: Path, samples: Mapping[str, str], timeout: float = 300
) -> dict[str, list[tuple[int, str]]]:
    """Run strict mypy over `samples` ({file name: source}) written into `workdir`:
    {file name: [(line, "message  [code]"), ...]} for the files with errors. Fails when mypy
    crashes or reports an error outside the samples."""
    for name, source in samples.items():
        (workdir / name).write_text(source)
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
            *samples,
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode in (0, 1), f"mypy crashed:\n{proc.stdout}\n{proc.stderr}"
    errors: dict[str, list[tuple[int, str]]] = {}
    for line in proc.stdout.splitlines():
        match = _ERROR.match(line)
        if match:
            errors.setdefault(match["file"], []).append((int(match["line"]), match["message"]))
    # every error is in a sample (mypy keeps quiet about installed packages such as millpond)
    assert set(errors) <= set(samples), proc.stdout
    assert "error:" not in proc.stdout or errors, proc.stdout
    return errors
