"""Install only what you need: clean venvs built from wheels prove what each install gives.

Slow (venvs and pip): about a minute on a warm package cache. The Redis test needs the local
Redis server; every queue name is unique.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import textwrap
import uuid
import zipfile
from pathlib import Path

import pytest

from tests.install.venvs import ROOT, Venv, build_wheels, wait_for

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
    log = tmp_path / "worker.log"
    worker = threads_redis_venv.popen(
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
        sent = threads_redis_venv.run(
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
        where = threads_redis_venv.run(
            "millpond", "send", "inst.where", "--wait", cwd=app_dir, env=env
        )
        assert where.returncode == 0, where.stderr
        assert json.loads(where.stdout.splitlines()[-1]) != "MainThread"  # a pool thread ran it
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
def test_core_alone_lists_no_pool(core_venv: Venv, app_dir: Path) -> None:
    proc = core_venv.run("millpond", "plugins", cwd=app_dir)
    assert proc.returncode == 0, proc.stderr
    pools = proc.stdout.split("brokers:")[0]
    assert "none installed" in pools
    assert "pip install millpond-pool-threads" in pools
    assert "sqlite" in proc.stdout  # the embedded brokers ship with the core


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
    upgrade would leave it) is listed as failing, and the worker names both versions."""
    source = tmp_path / "future"
    (source / "src" / "millpond_pool_future").mkdir(parents=True)
    (source / "pyproject.toml").write_text(FUTURE_PYPROJECT)
    (source / "src" / "millpond_pool_future" / "__init__.py").write_text(
        textwrap.dedent("""
        from millpond.pool import BasePool

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
    assert listing.returncode == 0, listing.stderr
    line = next(x for x in listing.stdout.splitlines() if x.strip().startswith("future"))
    assert "FAILS TO LOAD" in line
    assert "needs millpond<10,>=9, but millpond 0.1.0 is installed" in line
    worker = core_venv.run(
        "millpond", "worker", "-A", "instapp:app", "--pool", "future", cwd=app_dir, env=env
    )
    assert worker.returncode == 2, worker
    assert (
        "pool 'future' from millpond-pool-future 3.0.0 needs millpond<10,>=9, but millpond "
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
    proc = thirdparty_venv.run("millpond", "plugins", cwd=app_dir)
    assert proc.returncode == 0, proc.stderr
    pools = proc.stdout.split("brokers:")[0]
    rows = {line.split()[0]: line for line in pools.splitlines()[1:]}
    assert set(rows) == {"asyncio", "ripple"}, proc.stdout
    assert "millpond-pool-asyncio 0.1.0" in rows["asyncio"]
    assert rows["asyncio"].endswith("ok")
    assert "millpond-pool-ripple 0.1.0" in rows["ripple"]
    assert rows["ripple"].endswith("ok")


KIT_MODULE = textwrap.dedent("""
    import pytest

    from millpond.testing.pool_kit import PoolContract


    class TestInstalledAsyncioPool(PoolContract):
        @pytest.fixture
        def pool_name(self):
            return "asyncio"
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


PURE_PYTHON_CHECK = textwrap.dedent('''
    """A traced task through the span recorder, in a millpond built without its C part."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from millpond import Millpond, execution, span_recorder, telemetry
    from millpond.pool import Job

    assert not span_recorder.NATIVE and span_recorder.native_module() is None
    sent = []
    recorder = span_recorder.SpanRecorder(
        lambda body, timeout: sent.append(body) or True, {"service.name": "pure"}, "1",
        sampler=lambda parent, trace_hex: True,
    )
    telemetry.use_recorder(recorder)
    telemetry.TRACING = True
    app = Millpond("pure", broker_url="memory://pure")

    @app.task(name="pure.add")
    def add(x, y):
        return x + y

    execution.set_worker_app(app)
    job = Job("task-1", "pure.add", (2, 3), {}, queue="q")
    telemetry.start_process_span(job, "solo")
    outcome = execution.run_job(job)
    telemetry.end_process_span(job, outcome)
    recorder.shutdown()
    names = []
    for body in sent:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        names += [s.name for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert outcome.result == 5 and sorted(names) == ["process q", "run pure.add"], names
    print("pure python ok")
''')


def test_without_a_c_compiler_the_core_installs_and_traces_in_pure_python(
    tmp_path_factory: pytest.TempPathFactory, wheelhouse: dict[str, Path], tmp_path: Path
) -> None:
    """`optional=True`: a failed compile leaves a wheel without `_spancore`, and nothing else."""
    out = tmp_path_factory.mktemp("no-compiler")
    source = out / "core"  # the sources alone, as in an sdist: no build/ output to reuse
    shutil.copytree(
        ROOT / "core", source, ignore=shutil.ignore_patterns("build", "*.so", "*.egg-info")
    )
    wheels = build_wheels([source], out / "wheels", env={"CC": "false", "LDSHARED": "false"})
    with zipfile.ZipFile(wheels["millpond"]) as wheel:
        assert not [name for name in wheel.namelist() if "_spancore" in name and ".so" in name]
    venv = Venv.create(
        tmp_path_factory.mktemp("venvs") / "pure",
        [str(wheels["millpond"])],
        wheelhouse["millpond"].parent,
    )
    script = tmp_path / "pure_check.py"
    script.write_text(PURE_PYTHON_CHECK)
    done = venv.run("python", str(script), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pure python ok" in done.stdout
