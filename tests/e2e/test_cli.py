"""The `millpond` command against real workers: early patching, send/result/purge/dlq, settings
given in code, exit codes (the commands on their own are tested in plugins/cli/tests)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import uuid
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from millpond.testing.harness import WorkerProcess, run_command, wait_until
from tests.e2e.harness import ROOT

pytestmark = pytest.mark.e2e


#: a one-shot command run from the repository root, output captured
millpond = partial(run_command, cwd=ROOT)


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
                          ("millpond", "millpond_cli", "structlog", "opentelemetry", "dynaconf", "stevedore", "fake_app"))
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
    worker = WorkerProcess(args, env, tmp_path, cwd=cwd)
    try:
        worker.wait_ready()
        before = json.loads(mark.read_text())["imported_before_patch"]
        assert set(before) <= {"millpond", "millpond_cli", "millpond_cli.bootstrap"}, before
        assert json.loads(Path(str(mark) + ".app").read_text()) == {"patched_before_app": True}
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0
    finally:
        worker.kill()


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


def test_purge(e2e_env: dict[str, str], producer: Any) -> None:
    # queued from this process (`send` has its own test above): only `purge` runs as a command
    for _ in range(3):
        producer.send_task("tests.e2e.app.add", (1, 1))
    refused = millpond("purge", env=e2e_env)
    assert refused.returncode == 2 and "--force" in refused.stderr
    done = millpond("purge", "--force", env=e2e_env)
    assert done.returncode == 0 and "3 messages purged" in done.stdout


def test_purge_with_an_empty_or_bad_queue_list_purges_nothing(
    e2e_env: dict[str, str], producer: Any
) -> None:
    """`-Q ""` (an unset variable in a script) is not "the configured queues", and a list with an
    empty name is refused before any queue is purged."""
    queue = e2e_env["MILLPOND_QUEUES"]
    for _ in range(2):
        producer.send_task("tests.e2e.app.add", (1, 1))
    for given in ("", f"{queue},,other", f"{queue}, "):
        out = millpond("purge", "-Q", given, "--force", env=e2e_env)
        assert out.returncode == 2, (given, out.stdout, out.stderr)
        assert "empty queue name" in out.stderr and "purged" not in out.stdout
    assert producer.broker.queue_length(queue) == 2


def test_worker_without_app_says_what_to_do(e2e_env: dict[str, str]) -> None:
    out = millpond("worker", "-P", "solo", env=e2e_env)
    assert out.returncode == 2
    assert "no app given: pass -A module:attribute (or set MILLPOND_APP)" in out.stderr


def test_solo_with_more_concurrency_is_refused_in_one_line(e2e_env: dict[str, str]) -> None:
    out = millpond("worker", "-A", "examples.shop:app", "-P", "solo", "-c", "4", env=e2e_env)
    assert out.returncode == 2, out.stderr
    assert "the solo pool runs one task at a time; concurrency must be 1, got 4" in out.stderr
    assert "Traceback" not in out.stderr


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
    from millpond.wire.protocol import encode_task

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


def test_dlq_limit_is_refused_where_it_would_not_hold(
    spawn_worker: Any, e2e_env: dict[str, str], producer: Any
) -> None:
    """`dlq purge --limit 1` deleted every dead letter; `--limit 0` listed 20."""
    from millpond.wire.protocol import encode_task

    queue = e2e_env["MILLPOND_QUEUES"]
    spawn_worker("-P", "solo").wait_ready()
    for _ in range(2):
        producer.broker.publish(queue, encode_task("no.such", [], {}))
    wait_until(lambda: len(producer.broker.dead_letters(queue)) == 2, 20, "two dead letters")
    for args, wanted in [
        (["purge", "--limit", "1", "--force"], "--limit applies to list and replay only"),
        (["list", "--limit", "0"], "--limit must be at least 1, got 0"),
        (["replay", "--limit", "-1"], "--limit must be at least 1, got -1"),
    ]:
        out = millpond("dlq", *args, env=e2e_env)
        assert out.returncode == 2 and wanted in out.stderr, (args, out.stdout, out.stderr)
    assert len(producer.broker.dead_letters(queue)) == 2


def test_signed_messages(
    spawn_worker: Any, e2e_env: dict[str, str], producer: Any, monkeypatch: Any
) -> None:
    from millpond.config.settings import load_settings
    from millpond.wire.protocol import DEATH_REASON, encode_task

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
    from millpond.wire.signing import sign

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


def test_two_distributions_claiming_one_pool_name_are_refused(
    tmp_path: Path, e2e_env: dict[str, str]
) -> None:
    site = tmp_path / "site"
    dist = site / "twinsolo-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: twinsolo\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[millpond.pools]\nsolo = twinsolo_impl:Pool\n")
    (site / "twinsolo_impl.py").write_text("from millpond_pool_solo import SoloPool as Pool\n")
    env = {**e2e_env, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}
    out = millpond("worker", "-A", "tests.e2e.app:app", "-P", "solo", env=env, cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert (
        "several installed distributions declare a pool named 'solo' "
        "(millpond-pool-solo, twinsolo); uninstall all but one"
    ) in out.stderr


# -- settings given in the app's code --------------------------------------------------------------
SHOP_APP = """
import os
from millpond import Millpond

app = Millpond(
    "shop",
    broker_url=os.environ["SHOP_BROKER"],
    queues=[os.environ["SHOP_QUEUE"]],
    default_queue=os.environ["SHOP_QUEUE"],
    shutdown_timeout=10,
    {extra}
)


@app.task(name="shop.add")
def add(x, y):
    return x + y


@app.task(name="shop.frozen")
def frozen():
    import gc

    return gc.get_freeze_count()
"""


def shop(tmp_path: Path, extra: str = "") -> dict[str, str]:
    """An app module in a temp dir whose `Millpond(...)` names its own broker and queue; the
    environment names neither (and MILLPOND_HOME points at an empty directory, so a worker that
    fell back to the embedded default broker would create its file there)."""
    (tmp_path / "shop_app.py").write_text(SHOP_APP.format(extra=extra))
    queue = f"shop-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MILLPOND_", "OTEL_"))}
    env.update(
        SHOP_BROKER=f"sqlite://{tmp_path / 'shop.sqlite3'}?lease_timeout=3&heartbeat_interval=0.5",
        SHOP_QUEUE=queue,
        MILLPOND_HOME=str(tmp_path / "home"),
        MILLPOND_LOG_FORMAT="json",
        PYTHONPATH=str(ROOT),
    )
    return env


def test_worker_and_send_use_the_broker_the_app_names_in_code(tmp_path: Path) -> None:
    env = shop(tmp_path)
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "millpond", "worker", "-A", "shop_app:app", "-P", "solo"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=out,
        )
    try:
        wait_until(
            lambda: worker.poll() is not None or "worker ready" in log.read_text(),
            30,
            "the worker to start",
        )
        assert worker.poll() is None, log.read_text()
        ready = next(
            json.loads(line) for line in log.read_text().splitlines() if "worker ready" in line
        )
        assert ready["queues"] == [env["SHOP_QUEUE"]]
        sent = subprocess.run(
            [sys.executable, "-m", "millpond", "send", "-A", "shop_app:app", "shop.add", "2", "3",
             "--wait", "--timeout", "20"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr + log.read_text()
        task_id, value = sent.stdout.split()
        assert json.loads(value) == 5
        # the result sits in the app's broker file, and the default broker was never created
        from millpond_broker_embedded.sqlite import SqliteResultBackend

        backend = SqliteResultBackend(env["SHOP_BROKER"])
        try:
            meta = backend.peek(task_id)
        finally:
            backend.close()
        assert meta is not None and meta.result == 5
        assert not (tmp_path / "home").exists()
        # start-up's objects are frozen out of the collector's sight before the worker runs
        frozen = subprocess.run(
            [sys.executable, "-m", "millpond", "send", "-A", "shop_app:app", "shop.frozen",
             "--wait", "--timeout", "20"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert frozen.returncode == 0, frozen.stderr
        assert int(frozen.stdout.split()[1]) > 10_000
        # a flag still beats the code: `send -b` publishes to another broker, which nobody serves
        other = f"sqlite://{tmp_path / 'other.sqlite3'}"
        flagged = subprocess.run(
            [sys.executable, "-m", "millpond", "send", "-A", "shop_app:app", "-b", other,
             "shop.add", "1", "1"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert flagged.returncode == 0, flagged.stderr
        from millpond_broker_embedded.sqlite import SqliteBroker

        broker = SqliteBroker(other)
        try:
            assert broker.queue_length(env["SHOP_QUEUE"]) == 1
        finally:
            broker.close()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0, log.read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)


def test_config_shows_settings_given_in_code(tmp_path: Path) -> None:
    env = shop(tmp_path, extra='sqlite={"busy_timeout": 7}, acks_late="no",')
    env["MILLPOND_SHUTDOWN_TIMEOUT"] = "12"  # the environment beats the code
    out = subprocess.run(
        [sys.executable, "-m", "millpond", "config", "-A", "shop_app:app"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines()}
    assert rows["app"].split()[1:3] == ["shop_app:app", "flag"]
    assert rows["default_queue"].split()[1:3] == [env["SHOP_QUEUE"], "code"]
    assert rows["acks_late"].split()[1:3] == ["False", "code"]
    assert rows["shutdown_timeout"].split()[1:4] == ["12.0", "env", "MILLPOND_SHUTDOWN_TIMEOUT"]
    assert rows["sqlite.busy_timeout"].split()[1:3] == ["7.0", "code"]
    assert rows["sqlite.lease_timeout"].split()[1:4] == ["3.0", "code", "(query)"]


def test_a_green_pool_chosen_only_in_code_is_refused_clearly(tmp_path: Path) -> None:
    env = shop(tmp_path, extra='pool="gevent",')
    out = subprocess.run(
        [sys.executable, "-m", "millpond", "worker", "-A", "shop_app:app"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2, out.stdout + out.stderr
    assert "the 'gevent' pool must monkey-patch the interpreter before the app is imported" in (
        out.stderr
    )
    assert "chosen in code (Millpond(..., pool='gevent'))" in out.stderr
    assert "-P gevent, MILLPOND_POOL=gevent" in out.stderr
    # chosen where the bootstrap can see it, the same app runs
    env["MILLPOND_POOL"] = "gevent"
    log = tmp_path / "green.log"
    with open(log, "wb") as fh:
        worker = subprocess.Popen(
            [sys.executable, "-m", "millpond", "worker", "-A", "shop_app:app"],
            cwd=tmp_path, env=env, stdout=fh, stderr=fh,
        )  # fmt: skip
    try:
        wait_until(
            lambda: worker.poll() is not None or "worker ready" in log.read_text(),
            30,
            "the gevent worker to start",
        )
        assert worker.poll() is None, log.read_text()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0, log.read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)


@pytest.mark.redis
def test_queue_stats_reports_what_redis_holds_for_scripts() -> None:
    """Ready, delayed and reserved counts of a Redis queue, as JSON, with the load for 4 slots;
    a second queue on the same line shows as its own object; a bad --slots is refused."""
    import time

    from millpond.config import plugins
    from millpond.wire.protocol import encode_task

    queue, other = f"qs-{uuid.uuid4().hex[:8]}", f"qs-{uuid.uuid4().hex[:8]}"
    url = "redis://127.0.0.1:6379/0"
    broker = plugins.broker_for_url(url, {"warn_without_persistence": False})
    try:
        for _ in range(6):
            broker.publish(queue, encode_task("stats.task", ()))
        broker.publish(queue, encode_task("stats.task", ()), eta=time.time() + 600)
        consumer = broker.consumer([queue], 2)
        held = consumer.fetch(2, 5.0)
        assert len(held) == 2
        env = {"MILLPOND_BROKER_URL": url}
        done = millpond("queue-stats", "-Q", f"{queue},{other}", "--json", "--slots", "4", env=env)
        assert done.returncode == 0, done.stderr
        first, second = (json.loads(line) for line in done.stdout.splitlines())
        assert first == {
            "queue": queue, "ready": 4, "delayed": 1, "reserved": 2, "consumers": 1, "load": 1.5,
        }  # fmt: skip
        assert (second["queue"], second["ready"], second["reserved"]) == (other, 0, 0)
        table = millpond("queue-stats", "-Q", queue, env=env)
        assert f"{queue}: ready 4, delayed 1, reserved 2, consumers 1" in table.stdout
        refused = millpond("queue-stats", "-Q", queue, "--slots", "0", env=env)
        assert refused.returncode != 0 and "--slots must be at least 1" in refused.stderr
        consumer.close()
    finally:
        broker.close()
        import redis

        client = redis.Redis.from_url(url)
        found = list(client.scan_iter(match=f"*{queue}*"))
        if found:
            client.delete(*found)
        client.close()


@pytest.mark.parametrize(
    ("args", "wanted"),
    [
        (
            ["worker", "--autoscale", "10,3"],
            "--autoscale is a Celery option millpond does not take",
        ),
        (["worker", "-D"], "-D is a Celery option millpond does not take: millpond worker runs"),
        (["worker", "--pidfile=/tmp/w.pid"], "--pidfile is a Celery option"),
        (["worker", "-f", "w.log"], "millpond logs to stderr: redirect it (2>>FILE)"),
        (["worker", "--purge"], "run `millpond purge -Q QUEUES --force` before"),
        (["worker", "-X", "slow"], "name the queues to consume with -Q"),
        (["worker", "--without-heartbeat"], "--heartbeat-interval SECONDS"),
        (["worker", "--uid", "app"], "systemd's User="),
        (["--workdir", "/srv", "worker"], "--workdir is a Celery option"),
        (["purge", "-X", "slow", "--force"], "name the queues to purge with -Q"),
        (["worker", "-P", "threads", "--max-tasks-per-child", "10"], "the 'threads' pool has none"),
        (["worker", "-P", "solo", "--max-memory-per-child", "1000"], "run it with -P prefork"),
    ],
)
def test_celery_worker_options_without_an_equivalent_are_refused_with_what_to_use(
    args: list[str], wanted: str, e2e_env: dict[str, str]
) -> None:
    """A Celery deploy script's options either work or stop the worker with what to use instead
    (argparse alone said only "unrecognized arguments")."""
    out = millpond(*args, env={**e2e_env, "MILLPOND_APP": "tests.e2e.app:app"})
    assert out.returncode == 2, out.stderr
    assert wanted in out.stderr and "Traceback" not in out.stderr


def test_celery_worker_options_with_an_equivalent_are_honoured(
    spawn_worker: Any, producer: Any
) -> None:
    """`-n w1@%h` names the worker as Celery would (a remote control `-d w1@host` reaches it); the
    other options map to millpond settings and the worker runs."""
    worker = spawn_worker(
        "-P", "threads", "-c", "2", "-n", "w1@%h", "-O", "fair", "--without-gossip",
        "--without-mingle", "--heartbeat-interval", "5", "--events", "-l", "info",
    )  # fmt: skip
    ready = worker.wait_line(lambda line: line.get("event") == "worker ready")
    assert ready["worker"] == f"w1@{socket.gethostname()}"
    assert producer.send_task("tests.e2e.app.add", (2, 3)).get(timeout=20) == 5


def test_celery_global_options_before_the_command(
    spawn_worker: Any, e2e_env: dict[str, str]
) -> None:
    """`millpond -A proj -b URL send ...`, Celery's order (`celery -A proj worker`)."""
    spawn_worker("-P", "solo").wait_ready()
    env = {k: v for k, v in e2e_env.items() if k != "MILLPOND_BROKER_URL"}
    url = e2e_env["MILLPOND_BROKER_URL"]
    sent = millpond(
        "-A", "tests.e2e.app:app", "-b", url, "send", "tests.e2e.app.add", "2", "3", "--wait",
        "--timeout", "20", env={**env, "MILLPOND_BROKER_URL": ""},
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.split()[1] == "5"


def test_celerys_dotted_app_spec_names_the_attribute(e2e_env: dict[str, str]) -> None:
    """`-A tests.e2e.app.app`, as Celery reads it (module tests.e2e.app, attribute app)."""
    out = millpond("send", "-A", "tests.e2e.app.app", "tests.e2e.app.add", "1", "2", env=e2e_env)
    assert out.returncode == 0, out.stderr
    missing = millpond("send", "-A", "tests.e2e.nope.app", "x", env=e2e_env)
    assert missing.returncode == 2 and "No module named 'tests.e2e.nope'" in missing.stderr


def test_celery_environment_variables_millpond_would_not_use_are_refused(
    e2e_env: dict[str, str], producer: Any
) -> None:
    """CELERY_BROKER_URL pointing elsewhere than millpond's broker_url: the deploy expects it to
    count, so the command stops instead of using another broker; one that agrees is fine."""
    queue = e2e_env["MILLPOND_QUEUES"]
    elsewhere = {**e2e_env, "CELERY_BROKER_URL": "redis://user:secret@celery-host:6379/0"}
    for args in (
        ["send", "tests.e2e.app.add", "1", "2"],
        ["worker", "-A", "tests.e2e.app:app"],
        ["inspect", "ping", "--timeout", "0.1"],  # a plugin's command
    ):
        out = millpond(*args, env=elsewhere)
        assert out.returncode == 2, out.stderr
        assert "CELERY_BROKER_URL is set (redis://user:***@celery-host:6379/0) but millpond" in (
            out.stderr
        )
        assert "set MILLPOND_BROKER_URL=" in out.stderr and "secret" not in out.stderr
    assert producer.broker.queue_length(queue) == 0
    backend = millpond(
        "send", "tests.e2e.app.add", "1", "2",
        env={**e2e_env, "CELERY_RESULT_BACKEND": "redis://celery-host:6379/1"},
    )  # fmt: skip
    assert backend.returncode == 2 and "MILLPOND_RESULT_BACKEND" in backend.stderr
    app = millpond("send", "tests.e2e.app.add", "1", env={**e2e_env, "CELERY_APP": "tests.e2e"})
    assert app.returncode == 2 and "set MILLPOND_APP" in app.stderr  # else: no task routes
    for var, value, wanted in [
        ("CELERY_WORKER_QUEUES", "emails", "use MILLPOND_QUEUES or -Q"),
        ("CELERY_WORKER_CONCURRENCY", "8", "use MILLPOND_CONCURRENCY or -c"),
        ("CELERY_WORKER_AUTOSCALE", "10,3", "scale the number of workers"),
    ]:
        out = millpond("worker", "-A", "tests.e2e.app:app", env={**e2e_env, var: value})
        assert out.returncode == 2 and f"{var} is set ({value})" in out.stderr, out.stderr
        assert wanted in out.stderr
    agrees = {**e2e_env, "CELERY_BROKER_URL": e2e_env["MILLPOND_BROKER_URL"]}
    assert millpond("send", "tests.e2e.app.add", "1", "2", env=agrees).returncode == 0
    assert producer.broker.queue_length(queue) == 1


def test_send_takes_celery_calls_options(spawn_worker: Any, e2e_env: dict[str, str]) -> None:
    """`celery call`'s --args/-k, --eta and --expires, as a script written for it passes them."""
    spawn_worker("-P", "solo").wait_ready()
    send = partial(millpond, "send", "tests.e2e.app.add", env=e2e_env)
    sent = send("--args", "[2, 40]", "--wait", "--timeout", "20")
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.split()[1] == "42"
    soon = (datetime.now(UTC) + timedelta(seconds=0.5)).replace(tzinfo=None).isoformat()
    later = send("-k", '{"x": 1, "y": 2}', "--eta", soon, "--wait", "--timeout", "20")
    assert later.returncode == 0 and later.stdout.split()[1] == "3", later.stderr
    expired = send("--args", "[1, 1]", "--expires", "2000-01-01T00:00:00", "--wait")
    assert expired.returncode == 1 and "expired" in expired.stderr.lower(), expired.stderr
    for args, wanted in [
        (["1", "--args", "[1]"], "positionally or as --args, not both"),
        (["--args", "{}"], "--args must be a JSON array"),
        (["--eta", "tomorrow"], "--eta 'tomorrow' is not an ISO 8601 time"),
        (["--routing-key", "x"], "millpond routes by queue: send with -Q QUEUE"),
    ]:
        bad = send(*args)
        assert bad.returncode == 2 and wanted in bad.stderr, (args, bad.stderr)
