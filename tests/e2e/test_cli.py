"""The `millpond` command: early patching, send/result/purge/plugins/config, exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from millpond._bootstrap import pool_from_argv
from tests.e2e.harness import ROOT, WorkerProcess, wait_until

pytestmark = pytest.mark.e2e


def millpond(
    *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "millpond", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


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


@pytest.fixture
def fake_plugin(tmp_path: Path) -> Path:
    """A third-party distribution on PYTHONPATH with a pool and an early patch.

    The patch records which modules were already imported when it ran; the app module records
    whether the patch had run before the app was imported.
    """
    site = tmp_path / "site"
    dist = site / "fakepool-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fakepool\nVersion: 0.1\nRequires-Dist: millpond>=0.1,<0.2\n"
    )
    (dist / "entry_points.txt").write_text(
        "[millpond.pools]\nfake = fakepool_impl:FakePool\n\n[millpond.patches]\nfake = fakepool_patch:patch\n"
    )
    (site / "fakepool_patch.py").write_text(
        textwrap.dedent("""
        import json, os, sys
        def patch():
            seen = sorted(m for m in sys.modules if m.split(".")[0] in
                          ("millpond", "structlog", "opentelemetry", "dynaconf", "stevedore", "fake_app"))
            with open(os.environ["MARK"], "w") as fh:
                json.dump({"imported_before_patch": seen}, fh)
            os.environ["FAKE_PATCHED"] = "1"
    """)
    )
    (site / "fakepool_impl.py").write_text(
        "from millpond_pool_solo import SoloPool\nclass FakePool(SoloPool):\n    name = 'fake'\n"
    )
    (site / "fake_app.py").write_text(
        textwrap.dedent("""
        import json, os
        from millpond import Millpond
        with open(os.environ["MARK"] + ".app", "w") as fh:
            json.dump({"patched_before_app": os.environ.get("FAKE_PATCHED") == "1"}, fh)
        app = Millpond("fake")
        @app.task
        def hello():
            return "hi"
    """)
    )
    return site


@pytest.mark.parametrize("how", ["flag", "env", "file"])
def test_early_patch_runs_before_anything_is_imported(
    how: str, fake_plugin: Path, tmp_path: Path, e2e_env: dict[str, str]
) -> None:
    mark = tmp_path / "mark.json"
    env = {**e2e_env, "PYTHONPATH": f"{fake_plugin}{os.pathsep}{ROOT}", "MARK": str(mark)}
    args = ["-A", "fake_app:app"]
    cwd = tmp_path
    if how == "flag":
        args += ["-P", "fake"]
    elif how == "env":
        env["MILLPOND_POOL"] = "fake"
    else:
        (tmp_path / "millpond.toml").write_text('pool = "fake"\n')
    worker = WorkerProcess(args, env, tmp_path / "worker.log", cwd=cwd)
    try:
        worker.wait_ready()
        before = json.loads(mark.read_text())["imported_before_patch"]
        assert set(before) <= {"millpond", "millpond._bootstrap"}, before
        assert json.loads(Path(str(mark) + ".app").read_text()) == {"patched_before_app": True}
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0
    finally:
        worker.stop()


def test_send_wait_and_result(spawn_worker: Any, e2e_env: dict[str, str]) -> None:
    spawn_worker("-P", "solo").wait_ready()
    sent = millpond(
        "send", "tests.e2e.app.add", "2", "40", "--wait", "--timeout", "20", env=e2e_env
    )
    assert sent.returncode == 0, sent.stderr
    task_id, value = sent.stdout.split()
    assert json.loads(value) == 42
    shown = millpond("result", task_id, env=e2e_env)
    assert shown.returncode == 0
    assert json.loads(shown.stdout)["status"] == "SUCCESS"
    failed = millpond("send", "tests.e2e.app.fail", '"nope"', "--wait", env=e2e_env)
    assert failed.returncode == 1
    assert "ValueError: nope" in failed.stderr
    bad = millpond("send", "tests.e2e.app.add", "--kwargs", "[1]", env=e2e_env)
    assert bad.returncode == 2 and "--kwargs must be a JSON object" in bad.stderr


def test_purge(e2e_env: dict[str, str]) -> None:
    for _ in range(3):
        assert millpond("send", "tests.e2e.app.add", "1", "1", env=e2e_env).returncode == 0
    refused = millpond("purge", env=e2e_env)
    assert refused.returncode == 2 and "--force" in refused.stderr
    done = millpond("purge", "--force", env=e2e_env)
    assert done.returncode == 0 and "3 messages purged" in done.stdout


def test_plugins_lists_distribution_version_and_status() -> None:
    out = millpond("plugins")
    assert out.returncode == 0
    assert "pools:" in out.stdout and "brokers:" in out.stdout
    assert "solo" in out.stdout and "millpond-pool-solo 0.1.0" in out.stdout
    assert "sqlite" in out.stdout


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


def test_worker_without_app_says_what_to_do(e2e_env: dict[str, str]) -> None:
    out = millpond("worker", "-P", "solo", env=e2e_env)
    assert out.returncode == 2
    assert "no app given: pass -A module:attribute (or set MILLPOND_APP)" in out.stderr


def test_worker_twelve_factor_env_only(e2e_env: dict[str, str], tmp_path: Path) -> None:
    env = {
        **e2e_env,
        "MILLPOND_APP": "tests.e2e.app:app",
        "MILLPOND_POOL": "solo",
        "MILLPOND_LOG_FORMAT": "json",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "millpond", "worker"],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        sent = millpond("send", "tests.e2e.app.add", "1", "2", "--wait", "--timeout", "20", env=env)
        assert sent.returncode == 0 and sent.stdout.split()[1] == "3"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert b"tests.e2e.app.add" in out  # the banner lists the registered tasks


def test_dlq_list_replay_purge(spawn_worker: Any, e2e_env: dict[str, str], producer: Any) -> None:
    from millpond.protocol import encode_task

    queue = e2e_env["MILLPOND_QUEUES"]
    worker = spawn_worker("-P", "solo").wait_ready()
    producer.broker.publish(queue, encode_task("tests.e2e.app.add", [1], {}))  # wrong arguments
    wait_until(lambda: producer.broker.dead_letters(queue), 20, "a dead letter")
    listed = millpond("dlq", "list", env=e2e_env)
    assert listed.returncode == 0
    entry = json.loads(listed.stdout.splitlines()[1])
    assert entry["task"] == "tests.e2e.app.add" and "wrong arguments" in entry["reason"]
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    replayed = millpond("dlq", "replay", env=e2e_env)
    assert "1 messages moved back" in replayed.stdout
    assert producer.broker.queue_length(queue) == 1
    assert millpond("purge", "--force", env=e2e_env).returncode == 0
    producer.broker.publish(queue, encode_task("no.such", [], {}))
    spawn_worker("-P", "solo").wait_ready()
    wait_until(lambda: producer.broker.dead_letters(queue), 20, "a dead letter")
    assert millpond("dlq", "purge", env=e2e_env).returncode == 2
    purged = millpond("dlq", "purge", "--force", env=e2e_env)
    assert "1 messages purged" in purged.stdout


def test_signed_messages(
    spawn_worker: Any, e2e_env: dict[str, str], producer: Any, monkeypatch: Any
) -> None:
    from millpond.protocol import DEATH_REASON, encode_task
    from millpond.settings import load_settings

    queue = e2e_env["MILLPOND_QUEUES"]
    key = {"MILLPOND_SIGNING_KEY": "1234567"}  # numeric: must stay text
    spawn_worker("-P", "solo", env=key).wait_ready()
    monkeypatch.setenv("MILLPOND_SIGNING_KEY", "1234567")
    producer.configure(load_settings())
    from tests.e2e.app import add

    assert add.delay(1, 2).get(timeout=20) == 3  # signed by the producer, verified by the worker
    forged = encode_task(add.name, [1, 2], {})
    producer.broker.publish(queue, forged)  # unsigned
    tampered = encode_task(add.name, [1, 2], {})
    from millpond.signing import sign

    sign(tampered, "1234567")
    tampered.body = tampered.body.replace(b"[1,2]", b"[9,9]")
    producer.broker.publish(queue, tampered)
    dead = wait_until(
        lambda: (
            len(producer.broker.dead_letters(queue)) == 2 and producer.broker.dead_letters(queue)
        ),
        20,
        "two dead letters",
    )
    reasons = [m.headers[DEATH_REASON] for m in dead]
    assert any("signature does not match" in r for r in reasons), reasons
    assert any("not signed" in r for r in reasons), reasons
