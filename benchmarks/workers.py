"""Worker subprocesses: the exact command lines compared, memory sampling, and stopping by PID.

Both frameworks get the same treatment: a clean environment (no MILLPOND_*, CELERY_* or OTEL_*
from the caller's shell, so nothing but the flags below differs), output to a file whose tail
explains a failure, the resident memory of the whole process tree sampled every 20 ms, and a stop
that sends SIGTERM (warm shutdown), then SIGKILL to every process of the tree still alive after a
grace period.
"""

from __future__ import annotations

import compileall
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from benchmarks.model import CELERY, DRAMATIQ, DRAMATIQ_POOLS, MILLPOND, Combo

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
_SCRUB = ("MILLPOND_", "CELERY_", "OTEL_", "BENCH_")
_MIB = 1024 * 1024


def _command(name: str) -> list[str]:
    """The console script next to this interpreter, else `python -m name` (same code either way)."""
    script = BIN / name
    return [str(script)] if script.exists() else [sys.executable, "-m", name]


def millpond_command(combo: Combo, queue: str) -> list[str]:
    return [
        *_command("millpond"),
        "worker",
        "-A",
        "benchmarks.tasks:app",
        "-P",
        combo.pool,
        "-c",
        str(combo.concurrency),
        "-Q",
        queue,
        "-l",
        "WARNING",
    ]


def celery_command(combo: Combo, queue: str) -> list[str]:
    # A unique node name: Celery's remote-control queue (`<node>.celery.pidbox`) is exclusive on
    # RabbitMQ, so two workers named celery@<host> at once (a previous run still shutting down,
    # anyone else's worker) make the second one exit with RESOURCE_LOCKED.
    return [
        *_command("celery"),
        "-A",
        "benchmarks.tasks:celery_app",
        "worker",
        "-P",
        combo.pool,
        "-c",
        str(combo.concurrency),
        "-Q",
        queue,
        "--without-mingle",
        "--without-gossip",
        "--without-heartbeat",
        "--prefetch-multiplier",
        "4",
        "-n",
        f"{queue}@%h",
        "-l",
        "WARNING",
    ]


def dramatiq_command(combo: Combo, queue: str) -> list[str]:
    """Dramatiq's own worker (processes x threads) in the configuration closest to the pool.

    solo is 1 process x 1 thread, threads N is 1 x N, prefork N is N x 1 and gevent N is
    `dramatiq-gevent` with 1 x N greenlets. Dramatiq always runs a supervising parent above its
    worker processes, so even "solo" is two processes; the memory figures count both.
    """
    if combo.pool not in DRAMATIQ_POOLS:
        raise ValueError(f"Dramatiq has no equivalent of the {combo.pool} pool")
    processes, threads = (
        (combo.concurrency, 1) if combo.pool == "prefork" else (1, combo.concurrency)
    )
    if combo.pool == "solo":
        processes = threads = 1
    return [
        *_command("dramatiq-gevent" if combo.pool == "gevent" else "dramatiq"),
        "benchmarks.dramatiq_tasks",
        "--queues",
        queue,
        "--processes",
        str(processes),
        "--threads",
        str(threads),
    ]


@functools.cache
def compile_sources() -> None:
    """Write the byte code of millpond's own packages once, before any worker starts.

    They are installed editable (the sources in the repository), which pip does not compile; with
    `PYTHONDONTWRITEBYTECODE` set in the caller's shell every worker start would compile them all
    again, about 0.1 s of CPU that no installed release pays (a wheel's install compiles it), while
    Celery's and Dramatiq's byte code in site-packages is cached. Reading cached byte code is not
    affected by that variable.
    """
    for src in [ROOT / "core" / "src", *sorted(ROOT.glob("plugins/*/src"))]:
        compileall.compile_dir(src, quiet=1)


def environment(
    framework: str, broker_url: str, side_url: str, home: Path, transport_options: str = "{}"
) -> dict[str, str]:
    """The worker's environment: the caller's minus framework settings, plus the run's own
    (`transport_options`: Celery's broker_transport_options as JSON)."""
    compile_sources()
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUB)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env["BENCH_SIDE_URL"] = side_url
    for name in ("BENCH_QUEUE_TYPE", "BENCH_MASTER_NAME"):  # the cluster benchmarks' options
        if os.environ.get(name):
            env[name] = os.environ[name]
    if os.environ.get("BENCH_QUEUE_TYPE") == "quorum" and framework == MILLPOND:
        env["MILLPOND_AMQP__QUEUE_TYPE"] = "quorum"
    if framework == MILLPOND:
        env["MILLPOND_BROKER_URL"] = broker_url
        env["MILLPOND_IGNORE_RESULT"] = "true"
        env["MILLPOND_HOME"] = str(home)  # a stray sqlite:// default file lands in the run dir
        # like Celery's --without-mingle below: a worker that starts alone waits mingle's quiet
        # window (0.25 s) for other workers' revokes before its first fetch
        env["MILLPOND_CONTROL__MINGLE"] = "false"
    elif framework == CELERY:
        env["BENCH_BROKER_URL"] = broker_url
        env["BENCH_TRANSPORT_OPTIONS"] = transport_options
    elif framework == DRAMATIQ:
        env["BENCH_BROKER_URL"] = broker_url
    else:
        raise ValueError(f"unknown framework {framework!r}")
    return env


class RssSampler(threading.Thread):
    """Peak memory of a process and all its descendants, sampled until stopped.

    RSS (summed over the tree, as PERFORMANCE.md reports it) every `interval`; PSS every fifth
    sample, because RSS counts pages a prefork parent shares with its children once per process
    and PSS splits them, which is the fairer figure for a process tree.
    """

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        super().__init__(name=f"rss-{pid}", daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.peak_pss = 0
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        tick = 0
        while not self._halt.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                return
            rss = pss = 0
            for proc in procs:
                try:
                    if tick % 5 == 0:
                        full = proc.memory_full_info()
                        rss += full.rss
                        pss += full.pss
                    else:
                        rss += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, rss)
            self.peak_pss = max(self.peak_pss, pss)
            tick += 1
            self._halt.wait(self.interval)

    def halt(self) -> tuple[float, float]:
        """Stop sampling; the peaks (RSS, PSS) in MiB."""
        self._halt.set()
        self.join(2)
        return self.peak / _MIB, self.peak_pss / _MIB


class WorkerProcess:
    """One worker subprocess (a session leader, so Ctrl-C in the harness's terminal skips it)."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.started_at = time.time()
        self.proc = subprocess.Popen(
            self.argv,
            cwd=ROOT,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.sampler = RssSampler(self.proc.pid)
        self.sampler.start()
        self.peak_rss_mib: float | None = None
        self.peak_pss_mib: float | None = None
        self._stopped: dict[str, Any] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_now(self) -> tuple[float, float, int]:
        """The tree's RSS and PSS in MiB right now, and how many processes it has."""
        rss = pss = 0
        tree = self._tree()
        for proc in tree:
            try:
                full = proc.memory_full_info()
            except psutil.Error:
                continue
            rss += full.rss
            pss += full.pss
        return rss / _MIB, pss / _MIB, len(tree)

    def cpu_seconds(self) -> float:
        """User + system CPU time used so far by the worker's whole process tree."""
        total = 0.0
        for proc in self._tree():
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
        return total

    def problem(self) -> str | None:
        """None while the worker runs, else how it ended."""
        code = self.proc.poll()
        if code is None:
            return None
        return f"the worker exited with code {code}"

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def stop(self, grace: float = 10.0) -> dict[str, Any]:
        """Warm stop (SIGTERM), then SIGKILL whatever is left; what happened, for the record.

        Idempotent: a second call returns the first one's outcome.
        """
        if self._stopped is not None:
            return self._stopped
        self.peak_rss_mib, self.peak_pss_mib = self.sampler.halt()
        outcome: dict[str, Any] = {"exit": None, "killed": False, "stop_s": None}
        tree = self._tree()
        outcome["cpu_s"] = round(_cpu_seconds(tree), 3)  # the worker's whole life until now
        began = time.monotonic()
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(grace)
                outcome["stop_s"] = round(time.monotonic() - began, 3)
            except subprocess.TimeoutExpired:
                pass
        # The parent may be gone while children (prefork) linger: kill those by PID too.
        leftovers = [p for p in tree if _alive(p)]
        for proc in leftovers:
            try:
                proc.kill()
            except psutil.Error:
                pass
        if leftovers:
            outcome["killed"] = True
            psutil.wait_procs(leftovers, timeout=5)
        if self.proc.poll() is None:
            self.proc.wait(5)
        outcome["exit"] = self.proc.returncode
        self._log.close()
        self._stopped = outcome
        return outcome


def _alive(proc: psutil.Process) -> bool:
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _cpu_seconds(tree: Sequence[psutil.Process]) -> float:
    """User + system CPU seconds of every process of the tree (reaped children included)."""
    total = 0.0
    for proc in tree:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total
