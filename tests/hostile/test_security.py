"""Security: no code runs from message content, the size limit, message signing, TLS, and no
secret in any output (banner, every log line at DEBUG, `millpond config`).

All of it against real workers and real servers. The Redis plugin's own TLS test runs a private
`redis-server` with a TLS port
(plugins/broker-redis/tests/test_redis.py::test_tls_connection_with_a_private_ca); here a worker
reaches each broker through a TLS-terminating `Proxy`, which costs nothing to set up and exercises
the worker's `rediss://` and `amqps://` paths end to end.
"""

from __future__ import annotations

import pickle
import signal
import ssl
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from millpond import Millpond
from millpond.testing.harness import wait_until
from millpond.testing.proxy import Proxy
from millpond.testing.servers import RabbitServer, RedisServer, make_certs
from millpond.wire import signing
from millpond.wire.protocol import DEATH_REASON, PICKLE, Message, encode_task
from tests.e2e.harness import ROOT
from tests.faults.harness import APP, SINK, Rig, env_without_millpond
from tests.hostile.crafted import PickleBomb

pytestmark = [pytest.mark.e2e]

BROKERS = [
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("amqp", marks=pytest.mark.amqp),
]


def bomb(directory: Path) -> tuple[Message, Path]:
    marker = directory / f"pickle-{uuid.uuid4().hex[:6]}.marker"
    message = encode_task(SINK, [1], task_id=str(uuid.uuid4()))
    message.body = pickle.dumps(PickleBomb(marker))
    message.content_type = PICKLE
    return message, marker


def reason_of(rig: Rig, task_id: str) -> str:
    dead = wait_until(
        lambda: [m for m in rig.dead_letters() if m.task_id == task_id],
        20,
        f"message {task_id} to be dead-lettered",
    )
    return str(dead[0].headers[DEATH_REASON])


# -- code from message content ---------------------------------------------------------------------


@pytest.mark.redis
def test_a_pickle_payload_never_runs_unless_pickle_is_accepted_with_a_warning(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig("redis")
    worker = rig.spawn("threads", 2).wait_ready()
    message, marker = bomb(rig.directory)
    rig.publish_messages([message])
    assert "pickle is refused" in reason_of(rig, message.task_id or "")
    assert not marker.exists(), "unpickling a message ran code in the worker"
    assert not any("allows pickle" in str(line.get("event")) for line in worker.lines())
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    # the control: once pickle is allowed the same payload does run (so the test above proves
    # something), and the worker said at start-up what that means
    allowed = rig.spawn(
        "threads", 2, env={"MILLPOND_ACCEPT_CONTENT": f"application/json,{PICKLE}"}
    ).wait_ready()
    warning = [line for line in allowed.lines() if "allows pickle" in str(line.get("event"))]
    assert warning and warning[0]["level"] == "warning", allowed.text()
    print(f"start-up warning: {warning[0]['event']}")
    message, marker = bomb(rig.directory)
    rig.publish_messages([message])
    wait_until(marker.exists, 20, "the pickle payload to run once pickle is accepted")
    # what it unpickled is no task message: dead-lettered all the same
    assert "protocol v2" in reason_of(rig, message.task_id or "")
    allowed.signal(signal.SIGTERM)
    assert allowed.wait(30) == 0


@pytest.mark.redis
def test_the_default_size_limit_refuses_a_message_over_10_mib(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig("redis")
    worker = rig.spawn("threads", 2).wait_ready()
    huge = encode_task(SINK, ["x" * (10 * 1024 * 1024)], task_id=str(uuid.uuid4()))
    rig.publish_messages([huge])
    after = rig.publish(5, SINK, (1,))
    assert "over the 10485760-byte limit (setting max_message_size)" in reason_of(
        rig, huge.task_id or ""
    )
    rig.ledger.wait_for(after, 20, alive=rig.alive(worker))
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0


# -- signing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("broker", BROKERS)
def test_signing_refuses_unsigned_tampered_and_foreign_messages(
    make_rig: Callable[..., Rig], broker: str
) -> None:
    key = f"signing-{uuid.uuid4().hex}"
    # pickle accepted too: the signature is checked before the body is parsed, so an unsigned
    # pickle is refused without being loaded
    rig = make_rig(
        broker, MILLPOND_SIGNING_KEY=key, MILLPOND_ACCEPT_CONTENT=f"application/json,{PICKLE}"
    )
    worker = rig.spawn("threads", 2).wait_ready()
    producer = Millpond(
        "signed-producer", broker_url=rig.broker_url, default_queue=rig.queue, signing_key=key
    )
    try:
        signed = [producer.send_task(SINK, [i]).id for i in range(5)]

        def spoiled(how: str) -> Message:
            message = encode_task(SINK, [1], task_id=str(uuid.uuid4()))
            if how == "unsigned":
                return message
            signing.sign(message, "someone-elses-key" if how == "foreign key" else key)
            if how == "body altered":
                message.body = message.body.replace(b"[1]", b"[2]")
            elif how == "task header altered":
                message.headers["task"] = "tests.faults.app.suicide"
            elif how == "retries altered":
                message.headers["retries"] = 0 if message.headers["retries"] else 7
            elif how == "argsrepr altered":
                message.headers["argsrepr"] = "('something else',)"
            elif how == "reply_to altered":
                message.properties["reply_to"] = "someone-elses-queue"
            return message

        cases = {
            how: spoiled(how)
            for how in (
                "unsigned",
                "body altered",
                "task header altered",
                "retries altered",
                "argsrepr altered",
                "reply_to altered",
                "foreign key",
            )
        }
        pickled, marker = bomb(rig.directory)
        cases["unsigned pickle"] = pickled
        rig.publish_messages(cases.values())
        signed += [producer.send_task(SINK, [i]).id for i in range(5)]
        rig.ledger.wait_for(signed, 30, alive=rig.alive(worker))
        for how, message in cases.items():
            reason = reason_of(rig, message.task_id or "")
            print(f"  {how:20} -> {reason}")
            expected = "is not signed" if how.startswith("unsigned") else "signature does not match"
            assert expected in reason, (how, reason)
        assert not marker.exists(), "an unsigned pickle was loaded"
        assert rig.ledger.counts()["tests.faults.app.suicide"] == 0
        report = rig.ledger.report(f"signed tasks on {broker}", signed)
        assert not report.missing
        rig.assert_no_duplicates(report)
    finally:
        producer.close()
    assert key not in worker.text()
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0


# -- TLS -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def tls_proxy(certs: tuple[Path, Path, Path], request: pytest.FixtureRequest) -> Iterator[Proxy]:
    _, cert, key = certs
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    port = 6379 if request.param == "redis" else 5672
    with Proxy(("127.0.0.1", port), tls=context) as proxy:
        yield proxy


@pytest.mark.parametrize("tls_proxy", BROKERS, indirect=True)
def test_a_worker_over_tls_runs_tasks_and_refuses_an_untrusted_server(
    make_rig: Callable[..., Rig], tls_proxy: Proxy, certs: tuple[Path, Path, Path]
) -> None:
    ca = certs[0]
    port = tls_proxy.port
    if tls_proxy.upstream[1] == 6379:
        rig = make_rig("redis")
        secure = f"rediss://localhost:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
        trusting = {"MILLPOND_BROKER_URL": secure}
        untrusting = {"MILLPOND_BROKER_URL": f"rediss://localhost:{port}/0"}
    else:
        rig = make_rig("amqp")
        secure = f"amqps://guest:guest@localhost:{port}//"
        trusting = {"MILLPOND_BROKER_URL": secure, "MILLPOND_AMQP__SSL_CA_CERTS": str(ca)}
        untrusting = {"MILLPOND_BROKER_URL": secure}
    worker = rig.spawn("threads", 2, env=trusting).wait_ready()
    ids = rig.publish(50, SINK, (1,))
    rig.ledger.wait_for(ids, 30, alive=rig.alive(worker))
    assert tls_proxy.accepted > 0 and tls_proxy.received > 0, "the worker did not go through TLS"
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    # a server whose certificate no trusted CA signed: the worker does not start, and says why
    refused = rig.spawn(
        "threads",
        2,
        env={
            **untrusting,
            "MILLPOND_REDIS__PUBLISH_RETRY_TIMEOUT": "1",
            "MILLPOND_AMQP__PUBLISH_RETRY_TIMEOUT": "1",
        },
    )
    code = refused.wait(60)
    text = refused.text()
    print(f"untrusted server: exit {code}: {text.strip().splitlines()[-1][:300]}")
    assert code in (1, 2), text[-3000:]
    assert "certificate verify failed" in text or "CERTIFICATE_VERIFY_FAILED" in text, text[-3000:]


# -- secrets in output -----------------------------------------------------------------------------


class Captured:
    """A worker started the way a user starts one (banner on), stdout and stderr to one file."""

    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "millpond", "worker", "-A", APP, "-P", "threads", *args],
                cwd=ROOT,
                env={**env_without_millpond(), **env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self) -> Captured:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.text()}")
            return "worker ready" in self.text()

        wait_until(ready, 30, "the worker to be ready")
        return self

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def config_output(env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "millpond", "config"],
        cwd=ROOT,
        env={**env_without_millpond(), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return out.stdout + out.stderr


def assert_no_secret(where: str, text: str, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret not in text, f"a secret appeared in {where}:\n" + "\n".join(
            line for line in text.splitlines() if secret in line
        )


@pytest.mark.redis
@pytest.mark.slow
def test_no_secret_in_banner_logs_or_config_with_redis(
    make_rig: Callable[..., Rig], tmp_path: Path
) -> None:
    password = f"redis-pw-{uuid.uuid4().hex}"
    sentinel_password = f"sentinel-pw-{uuid.uuid4().hex}"
    key = f"signing-{uuid.uuid4().hex}"
    server = RedisServer(tmp_path / "redis", password=password).start()
    try:
        url = f"redis://:{password}@127.0.0.1:{server.port}/0"
        rig = make_rig("redis", url=url)
        backend = f"redis://default:{password}@127.0.0.1:{server.port}/1"
        env = {
            **rig.env,
            "MILLPOND_RESULT_BACKEND": backend,
            "MILLPOND_IGNORE_RESULT": "false",
            "MILLPOND_SIGNING_KEY": key,
            "MILLPOND_REDIS__SENTINEL_PASSWORD": sentinel_password,
            "MILLPOND_LOG_LEVEL": "DEBUG",
            "MILLPOND_LOG_FORMAT": "json",
        }
        secrets = [password, key, sentinel_password]
        worker = Captured(env, tmp_path / "worker.log").wait_ready()
        producer = Millpond(
            "p", broker_url=url, result_backend=backend, default_queue=rig.queue, signing_key=key
        )
        try:
            assert producer.send_task(SINK, [1]).get(timeout=20) is None
            server.kill()  # connection errors name the server: masked
            wait_until(lambda: "failed" in worker.text(), 20, "the worker to log the outage")
            server.start()
            assert producer.send_task(SINK, [2]).get(timeout=30) is None
        finally:
            producer.close()
        assert worker.stop() == 0
        text = worker.text()
        assert "***" in text and "broker:" in text, "no banner, or nothing masked in it"
        assert_no_secret("the worker's output (JSON logs at DEBUG)", text, secrets)
        console = Captured({**env, "MILLPOND_LOG_FORMAT": "console"}, tmp_path / "console.log")
        console.wait_ready()
        assert console.stop() == 0
        assert_no_secret("the worker's output (console logs)", console.text(), secrets)
        shown = config_output(env)
        assert "signing_key" in shown and "***" in shown
        assert_no_secret("`millpond config`", shown, secrets)
        sentinel_url = (
            f"redis+sentinel://:{password}@127.0.0.1:1/0?master_name=m"
            f"&sentinel_password={sentinel_password}"
        )
        assert_no_secret(
            "`millpond config`", config_output({"MILLPOND_BROKER_URL": sentinel_url}), secrets
        )
    finally:
        server.stop()


@pytest.fixture
def rabbit_user(rabbit_node: RabbitServer) -> tuple[str, str]:
    """A user with a password nothing else uses, on the session's private RabbitMQ node (users
    are never added to the shared server)."""
    user, password = f"millpond-test-{uuid.uuid4().hex[:8]}", f"amqp-pw-{uuid.uuid4().hex}"
    rabbit_node.add_user(user, password)
    return user, password


@pytest.mark.amqp
@pytest.mark.slow
def test_no_secret_in_banner_logs_or_config_with_rabbitmq(
    rabbit_node: RabbitServer,
    make_rig: Callable[..., Rig],
    tmp_path: Path,
    rabbit_user: tuple[str, str],
) -> None:
    user, password = rabbit_user
    key = f"signing-{uuid.uuid4().hex}"
    with Proxy(("127.0.0.1", rabbit_node.port)) as proxy:
        rig = make_rig("amqp", url=rabbit_node.url())
        url = f"amqp://{user}:{password}@127.0.0.1:{proxy.port}//"
        env = {**rig.env, "MILLPOND_BROKER_URL": url, "MILLPOND_LOG_LEVEL": "DEBUG"}
        env["MILLPOND_SIGNING_KEY"] = key
        worker = Captured(env, tmp_path / "worker.log").wait_ready()
        producer = Millpond("p", broker_url=url, default_queue=rig.queue, signing_key=key)
        try:
            first = [producer.send_task(SINK, [1]).id]
            rig.ledger.wait_for(first, 20)
            proxy.reset()  # reconnection messages name the server: masked
            wait_until(lambda: "reconnected" in worker.text(), 30, "the worker to reconnect")
            second = [producer.send_task(SINK, [2]).id]
            rig.ledger.wait_for(second, 20)
        finally:
            producer.close()
        assert worker.stop() == 0
    text = worker.text()
    assert f"{user}:***@" in text, "the banner or the logs do not show the masked URL"
    assert_no_secret("the worker's output", text, [password, key])
    assert_no_secret("`millpond config`", config_output(env), [password, key])
