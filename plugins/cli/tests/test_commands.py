"""The `millpond` command on its own: `python -m millpond` runs this package's script, the pool the
bootstrap patches for, `millpond plugins` (and what listing imports), `millpond config`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import pytest

from millpond.config import plugins
from millpond.testing.harness import run_command
from millpond_cli.bootstrap import pool_from_argv

ROOT = Path(__file__).resolve().parents[3]


#: a one-shot command run from the repository root, output captured
millpond = partial(run_command, cwd=ROOT)


def test_python_m_millpond_runs_the_console_script_this_package_declares() -> None:
    """The core's `__main__` finds the `millpond` script through the installed metadata, so
    `python -m millpond` and `python -m millpond_cli` are the same command."""
    core = millpond("--version")
    assert core.returncode == 0, core.stderr
    assert core.stdout.startswith("millpond 0.")
    own = subprocess.run(
        [sys.executable, "-m", "millpond_cli", "--version"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert (own.returncode, own.stdout) == (0, core.stdout), own.stderr


def test_python_m_millpond_without_the_command_says_what_to_install() -> None:
    code = (
        "import importlib.metadata as metadata, runpy\n"
        "def missing(name):\n"
        "    raise metadata.PackageNotFoundError(name)\n"
        "metadata.distribution = missing\n"
        "runpy.run_module('millpond', run_name='__main__')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 1
    assert "the `millpond` command is not installed: pip install millpond-cli" in proc.stderr


@pytest.mark.parametrize(
    ("argv", "pool"),
    [
        (["worker", "-P", "gevent"], "gevent"),
        (["worker", "-Pgevent"], "gevent"),
        (["worker", "--pool", "x"], "x"),
        (["worker", "--pool=x"], "x"),
        (["worker", "-A", "a:b"], None),
        (["send", "-P", "x"], None),
    ],
)
def test_pool_from_argv(argv: list[str], pool: str | None) -> None:
    assert pool_from_argv(argv) == pool


def test_plugins_lists_every_group_with_distribution_version_and_core_range() -> None:
    out = millpond("plugins")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["NAME", "DISTRIBUTION", "VERSION", "CORE", "VERSIONS"]
    titles = ("pools:", "brokers:", "result backends:", "shared rate limiters:", "hooks:",
              "settings sections:")  # fmt: skip
    for title in titles:
        assert title in lines, out.stdout
    rows = {tuple(line.split()) for line in lines if line.startswith("  ")}
    assert ("solo", "millpond-pool-solo", "0.1.0", ">=0.1,<0.2") in rows
    assert ("sqlite", "millpond-broker-embedded", "0.1.0", ">=0.1,<0.2") in rows
    assert ("gevent", "millpond-pool-gevent", "0.1.0", ">=0.1,<0.2") in rows
    limiters = lines[lines.index("shared rate limiters:") + 1 :]
    assert limiters[0].split()[:2] == ["redis", "millpond-broker-redis"], out.stdout
    # the columns line up: every row's distribution starts where the header's does
    column = lines[0].index("DISTRIBUTION")
    for line in lines[1:]:
        if line.startswith("  ") and "none installed" not in line:
            assert line[column - 2 : column] == "  " and line[column] != " ", line


def test_every_group_listed_has_a_title() -> None:
    """`millpond plugins` titles each group from the core's one table of group names."""
    assert all(group.kind and group.title for group in plugins.GROUPS.values())
    assert plugins.GROUPS[plugins.PATCHES][:2] == ("early patch", "early patches")
    assert plugins.GROUPS[plugins.BACKENDS].kind == "result backend"


def test_plugins_imports_no_plugin() -> None:
    """Listing reads metadata only: a threads user's `millpond plugins` must not import gevent."""
    code = textwrap.dedent("""
        import sys
        from millpond_cli.main import main
        code = main(["plugins"])
        heavy = ("gevent", "eventlet", "redis", "amqp", "psutil", "millpond_pool_",
                 "millpond_broker_")
        print("IMPORTED", sorted(m for m in sys.modules if m.startswith(heavy)))
        sys.exit(code)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert "gevent" in proc.stdout  # listed...
    assert proc.stdout.splitlines()[-1] == "IMPORTED []"  # ...but not imported


@pytest.fixture
def broken_plugins(tmp_path: Path) -> Path:
    """Two third-party distributions: a pool whose dependency is missing, and a broker built for
    another core version, which must not be imported."""
    site = tmp_path / "site"
    for name, requires, entry in [
        ("brokenpool", "millpond>=0.1,<0.2", "[millpond.pools]\nbroken = brokenpool_impl:Pool\n"),
        ("futurebroker", "millpond>=9", "[millpond.brokers]\nfuture = futurebroker_impl:Broker\n"),
    ]:
        dist = site / f"{name}-0.3.dist-info"
        dist.mkdir(parents=True)
        (dist / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.3\nRequires-Dist: {requires}\n"
        )
        (dist / "entry_points.txt").write_text(entry)
    (site / "brokenpool_impl.py").write_text("import no_such_dependency_xyz\n")
    # refused from its metadata: imported, it would end the process
    (site / "futurebroker_impl.py").write_text("import os\nos._exit(3)\n")
    return site


def test_plugins_check_imports_each_and_reports_failures(broken_plugins: Path) -> None:
    env = {"PYTHONPATH": f"{broken_plugins}{os.pathsep}{ROOT}"}
    listed = millpond("plugins", env=env)
    assert listed.returncode == 0, listed.stderr  # listing imports nothing, so nothing fails
    row = next(line for line in listed.stdout.splitlines() if line.split()[:1] == ["future"])
    assert row.split()[1:] == ["futurebroker", "0.3", ">=9"]
    checked = millpond("plugins", "--check", env=env)
    assert checked.returncode == 1
    rows = {line.split()[0]: line for line in checked.stdout.splitlines() if line.startswith("  ")}
    assert rows["solo"].endswith(" ok")
    assert "FAILS TO LOAD" in rows["broken"]
    assert "no_such_dependency_xyz is not installed or cannot be imported" in rows["broken"]
    assert "needs millpond>=9, but millpond 0.1.0 is installed" in rows["future"]


def test_config_shows_values_and_sources(tmp_path: Path) -> None:
    (tmp_path / "millpond.toml").write_text('pool = "solo"\nconcurrency = 2\n')
    out = millpond(
        "config",
        "-b",
        "redis://:s3cret@localhost:6379/0",
        cwd=tmp_path,
        env={"MILLPOND_CONCURRENCY": "3", "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines()}
    assert "file millpond.toml" in rows["pool"]
    assert "env MILLPOND_CONCURRENCY" in rows["concurrency"] and " 3 " in rows["concurrency"]
    assert "flag" in rows["broker_url"] and "s3cret" not in out.stdout
    misspelt = millpond(
        "config", cwd=tmp_path, env={"MILLPOND_CONCURENCY": "3", "PYTHONPATH": str(ROOT)}
    )
    assert misspelt.returncode == 0, misspelt.stderr
    assert "warning: unknown setting 'concurency' (env MILLPOND_CONCURENCY)" in misspelt.stderr
    assert "did you mean 'concurrency'" in misspelt.stderr
