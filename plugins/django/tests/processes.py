"""A `millpond beat` subprocess for this directory's tests (the harness has the worker's)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


class BeatProcess:
    """`millpond beat -A djproj.millpond:app`, its JSON log in a file."""

    def __init__(
        self, env: dict[str, str], directory: Path, app: str = "djproj.millpond:app"
    ) -> None:
        self.log = directory / "beat.log"
        full = {k: v for k, v in os.environ.items() if not k.startswith("MILLPOND_")}
        full.update(env, MILLPOND_LOG_FORMAT="json")
        with self.log.open("wb") as sink:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "millpond", "beat", "-A", app],
                cwd=directory, env=full, stdout=sink, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"beat exited with {self.proc.returncode}:\n{self.text()[-4000:]}")
        return True

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
