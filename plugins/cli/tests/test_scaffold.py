"""`millpond new-pool`: what the template writes (installing it and running the kit in a clean
venv is in the workspace's tests/install/test_install.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from millpond.exceptions import ConfigurationError
from millpond_cli.scaffold import core_range, create_pool


def clean_env() -> dict[str, str]:
    """The environment without millpond's settings or a PYTHONPATH: the command as a user runs it."""
    drop = ("MILLPOND_", "OTEL_", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def test_generates_a_complete_package(tmp_path: Path) -> None:
    created = create_pool("ripple-wave", tmp_path)
    root = tmp_path / "millpond-pool-ripple-wave"
    assert created.root == root
    assert sorted(p.relative_to(root).as_posix() for p in created.files) == [
        ".gitignore",
        "README.md",
        "pyproject.toml",
        "src/millpond_pool_ripple_wave/__init__.py",
        "src/millpond_pool_ripple_wave/py.typed",
        "tests/test_contract.py",
    ]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert project["build-system"]["build-backend"] == "hatchling.build"
    assert project["project"]["name"] == "millpond-pool-ripple-wave"
    assert project["project"]["dependencies"] == ["millpond>=0.1,<0.2"]
    assert project["project"]["entry-points"]["millpond.pools"] == {
        "ripple-wave": "millpond_pool_ripple_wave:RippleWavePool"
    }
    for path in created.files:
        text = path.read_text()
        assert "{{" not in text, f"a placeholder was left in {path}"
        if path.suffix == ".py":
            compile(text, str(path), "exec")
    init = (root / "src/millpond_pool_ripple_wave/__init__.py").read_text()
    assert 'name = "ripple-wave"' in init
    assert "class RippleWavePool(BasePool)" in init
    assert (
        "class TestRippleWavePoolContract(PoolContract)"
        in (root / "tests/test_contract.py").read_text()
    )


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("Ripple", "not a usable pool name"),
        ("2fast", "not a usable pool name"),
        ("a b", "not a usable pool name"),
        ("ripple-", "not a usable pool name"),
        ("threads", "first-party pool (millpond-pool-threads)"),
        ("asyncio", "first-party pool (millpond-pool-asyncio)"),
    ],
)
def test_refuses_unusable_names(tmp_path: Path, name: str, needle: str) -> None:
    with pytest.raises(ConfigurationError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        create_pool(name, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_never_overwrites(tmp_path: Path) -> None:
    create_pool("ripple", tmp_path)
    with pytest.raises(ConfigurationError, match="already exists and is not empty"):
        create_pool("ripple", tmp_path)


def test_core_range_follows_the_core_version() -> None:
    assert core_range("0.1.0") == ">=0.1,<0.2"
    assert core_range("0.4.2rc1") == ">=0.4,<0.5"
    assert core_range("1.3.0") == ">=1.3,<2"


@pytest.mark.e2e
def test_the_command(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "millpond", "new-pool", *args],
            cwd=tmp_path,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    made = run("ripple", "--dir", "out")
    assert made.returncode == 0, made.stderr
    assert "created out/millpond-pool-ripple" in made.stdout
    assert "pytest out/millpond-pool-ripple" in made.stdout
    assert (tmp_path / "out/millpond-pool-ripple/pyproject.toml").is_file()
    again = run("ripple", "--dir", "out")
    assert again.returncode == 2
    assert "already exists" in again.stderr
    bad = run("Bad Name")
    assert bad.returncode == 2
    assert "not a usable pool name" in bad.stderr
