"""Clean virtual environments built from wheels of the workspace packages, as a user gets them.

Nothing here touches the development environment: each venv is a fresh `python -m venv`, the
workspace packages go in as wheels built from this tree, and third-party dependencies come from
the package index, exactly as `pip install millpond millpond-pool-threads` would fetch them.
Subprocesses get an environment without the dev venv's PYTHONPATH, VIRTUAL_ENV, MILLPOND_* or
OTEL_* variables, and without the user site directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PIP = ("-m", "pip", "install", "-q", "--disable-pip-version-check")
#: workspace directory of each distribution the install tests build
PACKAGES = {
    "millpond": "core",
    "millpond-broker-embedded": "plugins/broker-embedded",
    "millpond-control": "plugins/control",
    "millpond-canvas": "plugins/canvas",
    "millpond-tracing": "plugins/tracing",
    "millpond-ratelimit": "plugins/ratelimit",
    "millpond-health": "plugins/health",
    "millpond-cli": "plugins/cli",
    "millpond-pool-threads": "plugins/pool-threads",
    "millpond-broker-redis": "plugins/broker-redis",
    "millpond-pool-asyncio": "plugins/pool-asyncio",
}


def _check(proc: subprocess.CompletedProcess[str], what: str) -> subprocess.CompletedProcess[str]:
    if proc.returncode != 0:
        raise AssertionError(
            f"{what} failed with exit code {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def build_wheels(
    sources: Sequence[Path], out: Path, env: Mapping[str, str] | None = None
) -> dict[str, Path]:
    """Build one wheel per source tree into `out` (no isolation: hatchling and setuptools from the
    dev env)."""
    out.mkdir(parents=True, exist_ok=True)
    _check(
        subprocess.run(
            [
                sys.executable,
                *PIP[:2],
                "wheel",
                "-q",
                "--disable-pip-version-check",
                "--no-deps",
                "--no-build-isolation",
                "-w",
                str(out),
                *map(str, sources),
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, **(env or {})},
        ),
        "building wheels of " + ", ".join(s.name for s in sources),
    )
    wheels: dict[str, Path] = {}
    for wheel in out.glob("*.whl"):
        dist = wheel.name.split("-")[0].replace("_", "-")
        wheels[dist] = wheel
    return wheels


def clean_env(
    extra: Mapping[str, str] | None = None, bin_dir: Path | None = None
) -> dict[str, str]:
    drop = ("MILLPOND_", "OTEL_", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONNOUSERSITE"] = "1"
    env.update(extra or {})
    return env


@dataclass
class Venv:
    """A clean virtual environment; `run` executes its console scripts or its python."""

    root: Path

    @classmethod
    def create(cls, root: Path, requirements: Sequence[str], find_links: Path) -> Venv:
        started = time.monotonic()
        _check(
            subprocess.run(
                [sys.executable, "-m", "venv", str(root)],
                check=False,
                capture_output=True,
                text=True,
                timeout=120,
            ),
            f"python -m venv {root}",
        )
        venv = cls(root)
        _check(
            subprocess.run(
                [str(venv.python), *PIP, "--find-links", str(find_links), *requirements],
                check=False,
                capture_output=True,
                text=True,
                timeout=300,
                env=clean_env(),
            ),
            f"pip install {' '.join(requirements)} into {root.name}",
        )
        venv.build_seconds = time.monotonic() - started
        return venv

    build_seconds: float = 0.0

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def python(self) -> Path:
        return self.bin / "python"

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return clean_env(extra, self.bin)

    def run(
        self,
        *args: str,
        cwd: Path,
        env: Mapping[str, str] | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """Run `args[0]` from this venv's bin/ (millpond, python, pip) with the rest as args."""
        exe = self.bin / args[0]
        try:
            return subprocess.run(
                [str(exe), *args[1:]],
                cwd=cwd,
                env=self.env(env),
                check=False,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(
                f"{' '.join(args)} did not finish within {timeout:g}s:\n{exc.stdout!r}\n"
                f"{exc.stderr!r}"
            ) from None

    def popen(self, *args: str, cwd: Path, env: Mapping[str, str], log: Path) -> Any:
        handle = open(log, "wb")  # noqa: SIM115 - closed by the caller's stop()
        proc = subprocess.Popen(
            [str(self.bin / args[0]), *args[1:]],
            cwd=cwd,
            env=self.env(env),
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
        proc.log_handle = handle  # type: ignore[attr-defined]
        return proc

    def missing(self, *modules: str) -> list[str]:
        """Which of `modules` cannot be found in this venv (importlib.util.find_spec)."""
        code = textwrap.dedent(f"""
            import importlib.util
            print(",".join(m for m in {list(modules)!r} if importlib.util.find_spec(m) is None))
        """)
        proc = _check(self.run("python", "-c", code, cwd=self.root), "find_spec")
        return [m for m in proc.stdout.strip().split(",") if m]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)
