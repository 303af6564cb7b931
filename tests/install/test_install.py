"""Install only what you need: clean venvs built from wheels prove what each install gives.

Slow (venvs and pip): about a minute on a warm package cache. The Redis test needs the local
Redis server; every queue name is unique.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import textwrap
import uuid
import zipfile
from pathlib import Path

import pytest

from tests.install.venvs import Venv, build_wheels, wait_for

pytestmark = pytest.mark.slow

REDIS_URL = "redis://127.0.0.1:6379/0"
NOT_WANTED = (
    "gevent",
    "eventlet",
    "amqp",
    "kombu",
    "celery",
    "millpond_pool_gevent",
    "millpond_pool_eventlet",
    "millpond_pool_prefork",
    "millpond_pool_solo",
    "millpond_pool_asyncio",
    "millpond_broker_amqp",
)


def test_every_wheel_marks_its_package_typed(wheelhouse: dict[str, Path]) -> None:
    """py.typed in the wheel, not only in the source tree: without it a user's mypy ignores
    millpond's types (core/tests/test_typing.py checks the source trees)."""
    for dist, wheel in wheelhouse.items():
        with zipfile.ZipFile(wheel) as archive:
            package = dist.replace("-", "_")
            assert f"{package}/py.typed" in archive.namelist(), f"{wheel.name} has no py.typed"


# -- millpond + threads + redis ------------------------------------------------------------------
def test_threads_and_redis_install_nothing_else(threads_redis_venv: Venv) -> None:
    assert threads_redis_venv.missing(*NOT_WANTED) == list(NOT_WANTED)
    assert (
        threads_redis_venv.missing(
            "millpond", "millpond_pool_threads", "millpond_broker_redis", "redis"
        )
        == []
    )


@pytest.mark.redis
@pytest.mark.e2e
def test_installed_worker_runs_tasks_on_redis(
    threads_redis_venv: Venv, app_dir: Path, tmp_path: Path
) -> None:
    queue = f"inst-{uuid.uuid4().hex[:10]}"
    env = {
        "MILLPOND_BROKER_URL": REDIS_URL,
        "MILLPOND_QUEUES": queue,
        "MILLPOND_DEFAULT_QUEUE": queue,
        "MILLPOND_LOG_FORMAT": "json",
    }
    run_installed_worker(threads_redis_venv, app_dir, env, tmp_path / "worker.log")


@pytest.mark.e2e
def test_installed_worker_runs_tasks_on_the_default_sqlite_broker(
    threads_redis_venv: Venv, app_dir: Path, tmp_path: Path
) -> None:
    """No broker configured: `sqlite://` ($MILLPOND_HOME/broker.sqlite3), from
    millpond-broker-embedded, which `pip install millpond` brings as a dependency."""
    home = tmp_path / "home"
    env = {"MILLPOND_HOME": str(home), "MILLPOND_LOG_FORMAT": "json"}
    run_installed_worker(threads_redis_venv, app_dir, env, tmp_path / "worker.log")
    assert (home / "broker.sqlite3").exists()


def run_installed_worker(venv: Venv, app_dir: Path, env: dict[str, str], log: Path) -> None:
    """A threads worker from `venv` runs two tasks sent with `millpond send`, then stops warm."""
    worker = venv.popen(
        "millpond",
        "worker",
        "-A",
        "instapp:app",
        "-P",
        "threads",
        "-c",
        "2",
        "--no-banner",
        cwd=app_dir,
        env=env,
        log=log,
    )
    try:
        wait_for(
            lambda: worker.poll() is not None or '"worker ready"' in log.read_text(),
            30,
            "the installed worker to start",
        )
        assert worker.poll() is None, log.read_text()
        sent = venv.run(
            "millpond",
            "send",
            "inst.add",
            "2",
            "3",
            "--wait",
            "--timeout",
            "20",
            cwd=app_dir,
            env=env,
        )
        assert sent.returncode == 0, sent.stderr
        assert sent.stdout.splitlines()[-1] == "5"
        where = venv.run("millpond", "send", "inst.where", "--wait", cwd=app_dir, env=env)
        assert where.returncode == 0, where.stderr
        assert json.loads(where.stdout.splitlines()[-1]) != "MainThread"  # a pool thread ran it
        # the canvas comes with `pip install millpond` (millpond-canvas, a dependency)
        chained = venv.run(
            "python",
            "-c",
            "from millpond import chain; from instapp import add; "
            "print(chain(add.s(2, 3), add.s(4))().get(timeout=20))",
            cwd=app_dir,
            env=env,
        )
        assert chained.returncode == 0, chained.stderr
        assert chained.stdout.splitlines()[-1] == "9"
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0, log.read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
        worker.log_handle.close()
    ready = [json.loads(line) for line in log.read_text().splitlines() if '"worker ready"' in line]
    assert ready[0]["pool"] == "threads"


def test_a_pool_that_is_not_installed_says_what_to_install(
    threads_redis_venv: Venv, app_dir: Path
) -> None:
    proc = threads_redis_venv.run(
        "millpond",
        "worker",
        "-A",
        "instapp:app",
        "--pool",
        "gevent",
        cwd=app_dir,
        env={"MILLPOND_BROKER_URL": REDIS_URL},
    )
    assert proc.returncode == 2, proc
    assert "no pool named 'gevent' is installed (installed: threads)" in proc.stderr
    assert "pip install millpond-pool-gevent" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- millpond alone ------------------------------------------------------------------------------
def test_core_alone_brings_the_embedded_brokers_and_nothing_else(core_venv: Venv) -> None:
    """The embedded brokers, the control plane, the canvas, tracing, rate limits, the health
    probes and the command line are the core's dependencies, nothing else."""
    assert (
        core_venv.missing(
            "millpond",
            "millpond_broker_embedded",
            "millpond_control",
            "millpond_canvas",
            "millpond_tracing",
            "millpond_ratelimit",
            "millpond_health",
            "millpond_cli",
        )
        == []
    )
    assert core_venv.missing(*NOT_WANTED, "redis", "millpond_pool_threads") == [
        *NOT_WANTED,
        "redis",
        "millpond_pool_threads",
    ]


def _wheel_text(wheel: Path, suffix: str) -> str:
    with zipfile.ZipFile(wheel) as archive:
        name = next((n for n in archive.namelist() if n.endswith(suffix)), None)
        return archive.read(name).decode() if name else ""


def test_the_command_is_millpond_cli_s_and_comes_with_the_core(
    wheelhouse: dict[str, Path], core_venv: Venv, app_dir: Path
) -> None:
    """`pip install millpond` gives the `millpond` command: millpond-cli declares the script (with
    the scaffold's templates in its wheel), the core depends on it and ships no command line, and
    `python -m millpond` runs the same script."""
    core_names = zipfile.ZipFile(wheelhouse["millpond"]).namelist()
    assert not [n for n in core_names if n.startswith(("millpond/cli/", "millpond/templates/"))]
    assert "console_scripts" not in _wheel_text(
        wheelhouse["millpond"], ".dist-info/entry_points.txt"
    )
    core_metadata = _wheel_text(wheelhouse["millpond"], ".dist-info/METADATA")
    requires = [line for line in core_metadata.splitlines() if line.startswith("Requires-Dist")]
    assert any(line.startswith("Requires-Dist: millpond-cli") for line in requires), requires
    scripts = _wheel_text(wheelhouse["millpond-cli"], ".dist-info/entry_points.txt")
    assert "millpond = millpond_cli.bootstrap:main" in scripts, scripts
    cli_names = zipfile.ZipFile(wheelhouse["millpond-cli"]).namelist()
    assert "millpond_cli/templates/pool/pyproject.toml.tmpl" in cli_names, cli_names
    script = core_venv.run("millpond", "--version", cwd=app_dir)
    module = core_venv.run("python", "-m", "millpond", "--version", cwd=app_dir)
    assert script.returncode == module.returncode == 0, script.stderr + module.stderr
    assert script.stdout == module.stdout == "millpond 0.1.0\n"


def test_core_alone_lists_no_pool(core_venv: Venv, app_dir: Path) -> None:
    proc = core_venv.run("millpond", "plugins", cwd=app_dir)
    assert proc.returncode == 0, proc.stderr
    pools = proc.stdout.split("brokers:")[0]
    assert "none installed" in pools
    assert "pip install millpond-pool-threads" in pools
    brokers = [line.split() for line in proc.stdout.split("brokers:")[1].splitlines()]
    # the embedded brokers come with the core, as its dependency
    assert ["sqlite", "millpond-broker-embedded"] in [row[:2] for row in brokers], proc.stdout
    # so does the control plane: remote control, the events hooks, `millpond inspect`
    commands = [line.split() for line in proc.stdout.split("commands:")[1].splitlines()]
    assert ["inspect", "millpond-control"] in [row[:2] for row in commands], proc.stdout
    # and the canvas: chains, groups, chords
    canvas = [line.split() for line in proc.stdout.split("canvas:")[1].splitlines()]
    assert ["canvas", "millpond-canvas", "0.1.0", ">=0.1,<0.2"] in canvas, proc.stdout
    # and tracing: the `tracing` hooks on the OpenTelemetry SDK
    hooks = [line.split() for line in proc.stdout.split("hooks:")[1].splitlines()]
    assert ["tracing", "millpond-tracing", "0.1.0", ">=0.1,<0.2"] in hooks, proc.stdout
    # and the health probes, a hooks plugin with its own [health] section
    assert ["health", "millpond-health", "0.1.0", ">=0.1,<0.2"] in hooks, proc.stdout
    # and rate limits, a worker component
    components = [line.split() for line in proc.stdout.split("worker components:")[1].splitlines()]
    assert ["ratelimit", "millpond-ratelimit"] in [row[:2] for row in components], proc.stdout


def test_core_alone_worker_says_which_package_to_install(core_venv: Venv, app_dir: Path) -> None:
    proc = core_venv.run("millpond", "worker", "-A", "instapp:app", cwd=app_dir)
    assert proc.returncode == 2, proc
    assert "no pool named 'threads' is installed (installed: none)" in proc.stderr
    assert "pip install millpond-pool-threads" in proc.stderr
    assert "Traceback" not in proc.stderr


FUTURE_PYPROJECT = """
[build-system]
requires = ["hatchling>=1.18"]
build-backend = "hatchling.build"

[project]
name = "millpond-pool-future"
version = "3.0.0"
requires-python = ">=3.11"
dependencies = ["millpond>=9,<10"]

[project.entry-points."millpond.pools"]
future = "millpond_pool_future:FuturePool"

[tool.hatch.build.targets.wheel]
packages = ["src/millpond_pool_future"]
"""


def test_a_plugin_built_for_another_core_is_refused_at_load_time(
    core_venv: Venv, app_dir: Path, tmp_path: Path
) -> None:
    """A plugin whose metadata needs millpond 9 (installed without its dependencies, as a broken
    upgrade would leave it) is listed with that range, fails `plugins --check`, and the worker
    names both versions."""
    source = tmp_path / "future"
    (source / "src" / "millpond_pool_future").mkdir(parents=True)
    (source / "pyproject.toml").write_text(FUTURE_PYPROJECT)
    (source / "src" / "millpond_pool_future" / "__init__.py").write_text(
        textwrap.dedent("""
        from millpond.contracts.pool import BasePool

        class FuturePool(BasePool):
            name = "future"
    """)
    )
    wheel = build_wheels([source], tmp_path / "wheel")["millpond-pool-future"]
    target = tmp_path / "site"  # beside the venv, not in it: the shared venv stays clean
    installed = core_venv.run(
        "python",
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--target",
        str(target),
        str(wheel),
        cwd=tmp_path,
    )
    assert installed.returncode == 0, installed.stderr
    env = {"PYTHONPATH": str(target)}
    listing = core_venv.run("millpond", "plugins", cwd=app_dir, env=env)
    assert listing.returncode == 0, listing.stderr  # listing imports nothing
    line = next(x for x in listing.stdout.splitlines() if x.strip().startswith("future"))
    assert line.split() == ["future", "millpond-pool-future", "3.0.0", ">=9,<10"]
    checked = core_venv.run("millpond", "plugins", "--check", cwd=app_dir, env=env)
    assert checked.returncode == 1, checked
    line = next(x for x in checked.stdout.splitlines() if x.strip().startswith("future"))
    assert "FAILS TO LOAD" in line
    assert "needs millpond>=9,<10, but millpond 0.1.0 is installed" in line
    worker = core_venv.run(
        "millpond", "worker", "-A", "instapp:app", "--pool", "future", cwd=app_dir, env=env
    )
    assert worker.returncode == 2, worker
    assert (
        "pool 'future' from millpond-pool-future 3.0.0 needs millpond>=9,<10, but millpond "
        "0.1.0 is installed; upgrade one of them so they match"
    ) in worker.stderr


# -- third-party style: the asyncio pool and a scaffolded pool, beside the core alone ------------
def test_extra_pulls_the_plugin_and_nothing_else(thirdparty_venv: Venv) -> None:
    assert thirdparty_venv.missing("millpond_pool_asyncio", "millpond_pool_ripple") == []
    assert thirdparty_venv.missing("millpond_pool_threads", "gevent", "redis", "kombu") == [
        "millpond_pool_threads",
        "gevent",
        "redis",
        "kombu",
    ]


def test_plugins_are_discovered_through_their_entry_points(
    thirdparty_venv: Venv, app_dir: Path
) -> None:
    proc = thirdparty_venv.run("millpond", "plugins", "--check", cwd=app_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pools = proc.stdout.split("brokers:")[0].split("pools:")[1]
    rows = {line.split()[0]: line.split() for line in pools.splitlines() if line.strip()}
    assert set(rows) == {"asyncio", "ripple"}, proc.stdout
    assert rows["asyncio"] == ["asyncio", "millpond-pool-asyncio", "0.1.0", ">=0.1,<0.2", "ok"]
    assert rows["ripple"][1:3] == ["millpond-pool-ripple", "0.1.0"]
    assert rows["ripple"][-1] == "ok"


KIT_MODULE = textwrap.dedent("""
    import pytest

    from millpond.testing.pool_kit import PoolContract


    class TestInstalledAsyncioPool(PoolContract):
        @pytest.fixture
        def pool_name(self):
            return "asyncio"


    def test_millpond_brings_its_fixtures(memory_app, start_worker):
        # memory_app and start_worker come from millpond's pytest11 plugin: no conftest.py

        @memory_app.task(name="third.add")
        async def add(x, y):
            return x + y

        running = start_worker(memory_app, pool="asyncio", concurrency=2)
        assert add.delay(2, 3).get(timeout=10) == 5
        assert running.stop() == 0
""")


def assert_kit_passed(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = re.search(r"(\d+) passed", proc.stdout)
    assert summary, proc.stdout[-2000:]
    assert int(summary.group(1)) >= 15, f"too few kit tests ran: {proc.stdout[-2000:]}"
    assert "failed" not in proc.stdout


def _pytest(venv: Venv, target: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return venv.run(
        "python", "-m", "pytest", str(target), "-q", "-p", "no:cacheprovider", cwd=cwd, timeout=240
    )


def test_installed_asyncio_pool_passes_the_kit(thirdparty_venv: Venv, tmp_path: Path) -> None:
    (tmp_path / "test_kit.py").write_text(KIT_MODULE)
    proc = _pytest(thirdparty_venv, tmp_path / "test_kit.py", tmp_path)
    assert_kit_passed(proc)


def test_scaffolded_pool_passes_the_kit_as_generated(
    thirdparty_venv: Venv, scaffolded: Path
) -> None:
    proc = _pytest(thirdparty_venv, scaffolded / "tests", scaffolded)
    assert_kit_passed(proc)


TRACED_CHECK = textwrap.dedent('''
    """A traced task in an installed core: SDK spans through the hooks found by entry point."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from millpond import Millpond
    from millpond.consume.execute import Executor
    from millpond.contracts.pool import Job

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    app = Millpond("pure", broker_url="memory://pure")

    @app.task(name="pure.add")
    def add(x, y):
        with trace.get_tracer("pure").start_as_current_span("adding"):
            return x + y

    execution = Executor(app)
    job = Job("task-1", "pure.add", (2, 3), {}, queue="q")
    execution.job_started(job)
    outcome = execution.run(job)
    execution.job_finished(job, outcome)
    names = sorted(s.name for s in exporter.get_finished_spans())
    assert outcome.result == 5 and names == ["adding", "process q"], names
    print("traced ok")
''')


def test_the_core_is_pure_python_and_traces_with_the_sdk(
    wheelhouse: dict[str, Path], core_venv: Venv, tmp_path: Path
) -> None:
    """No compiled code in the core's wheel, and no OpenTelemetry SDK in the core's own
    requirements; tracing is the SDK's, through millpond-tracing's hooks."""
    with zipfile.ZipFile(wheelhouse["millpond"]) as wheel:
        names = wheel.namelist()
    assert not [n for n in names if n.endswith((".so", ".pyd", ".c"))], names
    assert any(n.endswith("millpond/py.typed") for n in names)
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    with zipfile.ZipFile(wheelhouse["millpond"]) as wheel:
        requires = [
            line
            for line in wheel.read(metadata).decode().splitlines()
            if line.startswith("Requires-Dist")
        ]
    assert not [r for r in requires if "opentelemetry-sdk" in r or "exporter" in r], requires
    assert any("millpond-tracing" in r for r in requires), requires
    script = tmp_path / "traced_check.py"
    script.write_text(TRACED_CHECK)
    done = core_venv.run("python", str(script), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "traced ok" in done.stdout
