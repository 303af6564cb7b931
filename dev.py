#!/usr/bin/env python3
"""The two commands of the README, plus the small chores around them.

    python3 dev.py demo     a real worker on the embedded broker runs the example tasks
    python3 dev.py test     lint, type-check and the whole test suite
    python3 dev.py bench    the benchmarks (see benchmarks/README.md)
    python3 dev.py bench tracing   what tracing costs per task (benchmarks/tracing_overhead.py)
    python3 dev.py bench scaling   throughput and latency against concurrency (benchmarks/scaling.py)
    python3 dev.py bench --targets the issue-24 run: every target, then the scaling curve

It needs nothing but Python 3.11+: it creates `.venv` beside this file on first use and installs
every workspace package (editable, with its entry points) plus the pinned development tools from the
root `pyproject.toml`. It reinstalls only when a `pyproject.toml` changed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tomllib
import venv
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
STAMP = VENV / ".millpond-installed"

# Pool plugins that monkey-patch the interpreter get their own pytest process each (the root
# conftest.py keeps them out of every other session).
GREEN_SUITES = ["plugins/pool-gevent/tests", "plugins/pool-eventlet/tests"]


def members() -> list[Path]:
    return [ROOT / "core", *sorted(p.parent for p in (ROOT / "plugins").glob("*/pyproject.toml"))]


def fingerprint() -> str:
    digest = hashlib.sha256()
    for path in [ROOT / "pyproject.toml", *(m / "pyproject.toml" for m in members())]:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def ensure_env() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py may be started by an older python3
        sys.exit(f"millpond needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    if not PY.exists():
        print("dev.py: creating .venv", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    if STAMP.exists() and STAMP.read_text() == fingerprint():
        return
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["dependency-groups"]["dev"]
    args = [str(PY), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    for member in members():
        args += ["-e", str(member)]
    print(
        "dev.py: installing the workspace into .venv (first run takes a minute or two)", flush=True
    )
    subprocess.run([*args, *dev], check=True)
    STAMP.write_text(fingerprint())


def run(*cmd: str, env: dict[str, str] | None = None) -> int:
    return subprocess.call(cmd, cwd=ROOT, env=env)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(VENV)
    env.pop("PYTHONHOME", None)
    return env


def demo(extra: list[str]) -> int:
    return run(str(PY), "examples/demo.py", *extra, env=child_env())


def lint() -> int:
    env = child_env()
    failed = 0
    failed |= run(str(BIN / "ruff"), "check", ".", env=env)
    failed |= run(str(BIN / "ruff"), "format", "--check", ".", env=env)
    failed |= run(str(BIN / "mypy"), env=env)
    return failed


def count(junit: Path) -> tuple[int, int, int]:
    """(passed, failed, skipped) from a pytest JUnit report; a missing report counts as a failure."""
    if not junit.exists():
        return 0, 1, 0
    suites = ET.parse(junit).getroot()  # noqa: S314 - our own pytest's report
    total = failed = skipped = 0
    for suite in suites.iter("testsuite"):
        total += int(suite.get("tests", 0))
        failed += int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped += int(suite.get("skipped", 0))
    return total - failed - skipped, failed, skipped


def shards(plugin_tests: list[str]) -> list[list[str]]:
    """The main session's tests in two pytest processes that run side by side.

    The suite mostly waits (on worker subprocesses, leases, timeouts), so two sessions share two
    cores well. The first holds the fault suite and the brokers' own tests (their broadcasts go to
    exchanges with unique names); the second everything else, which holds every test that talks
    to the shared broker's control plane (the pidbox, the event stream: tests/interop, tests/e2e,
    tests/observability, plugins/control), so no two of those run at the same time."""
    brokers = [t for t in plugin_tests if t.startswith("plugins/broker-")]
    rest = [t for t in plugin_tests if t not in brokers]
    return [["tests/faults", *brokers], ["tests", "--ignore=tests/faults", "core/tests", *rest]]


def run_together(sessions: list[list[str]], reports: Path, first: int, env: dict[str, str]) -> int:
    """Run pytest `sessions` at once, each with its JUnit report `session-<n>.xml` (n counting
    from `first`): 0 when every one passed (or collected nothing), else 1. The first prints to
    the terminal as it goes; the others write a log each, printed whole once the first has
    ended, so no two outputs interleave."""
    status = 0
    procs: list[tuple[list[str], Path, subprocess.Popen[bytes]]] = []
    try:
        for n, session in enumerate(sessions, start=first):
            junit, log = reports / f"session-{n}.xml", reports / f"session-{n}.log"
            cmd = [str(PY), "-m", "pytest", f"--junitxml={junit}", *session]
            out = None if n == first else open(log, "wb")  # noqa: SIM115 - closed below
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=out)
            if out is not None:
                out.close()  # the child has its own copy of the descriptor
            procs.append((session, log, proc))
        for n, (session, log, proc) in enumerate(procs, start=first):
            code = proc.wait()
            if n != first:
                print(f"\n===== pytest {' '.join(session)} =====", flush=True)
                sys.stdout.write(log.read_text(errors="replace"))
            print(f"dev.py: pytest {' '.join(session)}: exit code {code}", flush=True)
            if code not in (0, 5):
                status = 1
    finally:
        for *_, proc in procs:  # Ctrl-C or a crash here: stop what is still running, by PID
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
    return status


def test(extra: list[str]) -> int:
    env = child_env()
    status = 0
    if not extra and os.environ.get("MILLPOND_SKIP_LINT") != "1":
        status |= lint()
    reports = ROOT / ".venv" / "test-reports"
    reports.mkdir(exist_ok=True)
    for old in [*reports.glob("*.xml"), *reports.glob("*.log")]:
        old.unlink()
    if extra:
        phases = [[extra]]
    else:
        # the workspace's cross-package tests, the core's own, and every plugin's but the green
        plugin_tests = [
            p.relative_to(ROOT).as_posix() for p in sorted(ROOT.glob("plugins/*/tests"))
        ]
        main = [t for t in plugin_tests if t not in GREEN_SUITES]
        # The green suites come after the main shards, not beside them: their throughput checks
        # (2,000 tasks within a bound) need the cores the shards would take. They do share the
        # machine with each other.
        phases = [shards(main), [[g] for g in GREEN_SUITES if (ROOT / g).is_dir()]]
    first = 0
    for sessions in phases:
        status |= run_together(sessions, reports, first, env)
        first += len(sessions)
    totals = [0, 0, 0]
    for junit in (reports / f"session-{n}.xml" for n in range(first)):
        for j, n in enumerate(count(junit)):
            totals[j] += n
    passed, failed, skipped = totals
    if status and not failed:
        failed = 1  # lint or a session that crashed before reporting
    print(f"millpond: {passed} passed, {failed} failed, {skipped} skipped")
    return 1 if status or failed else 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(__doc__)
        return 0
    command, extra = argv[0], argv[1:]
    ensure_env()
    if command == "demo":
        return demo(extra)
    if command == "test":
        return test(extra)
    if command == "lint":
        return lint()
    if command == "bench":
        if extra[:1] == ["tracing"]:
            return run(str(PY), "benchmarks/tracing_overhead.py", *extra[1:], env=child_env())
        if extra[:1] == ["scaling"]:
            return run(str(PY), "benchmarks/scaling.py", *extra[1:], env=child_env())
        return run(str(PY), "benchmarks/run.py", *extra, env=child_env())
    if command == "env":
        return 0
    print(f"dev.py: unknown command {command!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
