"""The pytest plugin (`millpond.testing.fixtures`, registered through `pytest11`) as a project
uses it: examples/testing's own test suite, which uses only the plugin's fixtures, run in a fresh
pytest process on the memory broker, on Redis and on a private PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ROOT / "examples" / "testing"


def run_project(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MILLPOND_", "OTEL_"))}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", *args],
        cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    "broker",
    [
        pytest.param(None, id="memory"),
        pytest.param("redis://127.0.0.1:6379/0", id="redis", marks=pytest.mark.redis),
    ],
)
def test_the_example_projects_tests_pass(broker: str | None) -> None:
    done = run_project(*(["--millpond-broker", broker] if broker else []))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "6 passed" in done.stdout, done.stdout[-2000:]


def test_a_bad_app_path_is_a_usage_error() -> None:
    done = run_project("--millpond-app", "orders:nothing_here", "-k", "real_worker")
    assert done.returncode != 0
    assert "cannot be loaded" in done.stdout + done.stderr


def test_the_example_projects_tests_pass_on_postgres() -> None:
    from millpond.testing.servers import PostgresServer

    server = PostgresServer().start()
    try:
        done = run_project("--millpond-broker", server.url)
    finally:
        server.stop()
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "6 passed" in done.stdout, done.stdout[-2000:]
