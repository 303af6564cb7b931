"""What this repository's end-to-end tests share beyond `millpond.testing.harness` (whose
`WorkerProcess` and `wait_until` they use, like any plugin's tests)."""

from __future__ import annotations

from pathlib import Path

#: the repository root: the working directory of workers that import `tests.*` or `examples.*`
ROOT = Path(__file__).resolve().parents[2]


def lines_of(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []
