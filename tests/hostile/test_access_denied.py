"""Wrong credentials and missing permissions fail at once, saying so, for worker and producer.

Redis WRONGPASS / NOAUTH / NOPERM and RabbitMQ ACCESS_REFUSED / NOT_ALLOWED cannot be cured by
waiting, so nothing retries them for `publish_retry_timeout` (set to 60 s here, so a retry would
show) or reports them as "did not answer ... check that Redis is running". Every case runs
against a private server: a `redis-server` with `requirepass` and ACL users, and the session's
private RabbitMQ node (`rabbit_node`) with users of its own; the shared servers are untouched.
The worker is a real `millpond worker` subprocess; the producer is an app in this process.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from millpond import Millpond
from millpond.exceptions import AccessDenied, PublishAccessDenied, PublishError
from millpond.testing.harness import WorkerProcess
from millpond.testing.servers import RabbitServer, RedisServer
from tests.e2e.harness import ROOT
from tests.faults.harness import APP, NOOP

pytestmark = [pytest.mark.e2e]

#: long enough that a retried refusal would be obvious against FAST
RETRY_FOR = 60.0
#: a refusal must surface well within this (start-up included)
FAST = 15.0
PASSWORD = f"right-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Case:
    url: str
    says: str  # what the message must say
    secret: str  # what it must never show
    #: refused before the worker is ready (False: the first fetch is refused, a moment later)
    before_ready: bool = True


@pytest.fixture(scope="module")
def redis_acl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-acl"), password=PASSWORD).start()
    client = redis.Redis(port=server.port, password=PASSWORD)
    # keys outside millpond's only / the commands of a monitoring user only
    client.execute_command("ACL", "SETUSER", "elsewhere", "on", ">elsewhere-pw", "~other:*", "&*")
    client.execute_command("ACL", "SETUSER", "elsewhere", "+@all")
    client.execute_command("ACL", "SETUSER", "watcher", "on", ">watcher-pw", "~*", "&*", "-@all")
    client.execute_command("ACL", "SETUSER", "watcher", "+ping", "+info", "+client", "+hello")
    # every key and command, but no pub/sub channel (Redis 7's default for new users)
    client.execute_command("ACL", "SETUSER", "deaf", "on", ">deaf-pw", "~*", "resetchannels")
    client.execute_command("ACL", "SETUSER", "deaf", "+@all")
    client.close()
    yield server
    server.stop()


def redis_cases(server: RedisServer) -> dict[str, Case]:
    at = f"127.0.0.1:{server.port}/0"
    return {
        "wrong password": Case(
            f"redis://:wrong-{PASSWORD}@{at}", "refused the credentials", f"wrong-{PASSWORD}"
        ),
        "no password": Case(f"redis://{at}", "requires a password", PASSWORD),
        "no key permission": Case(
            f"redis://elsewhere:elsewhere-pw@{at}",
            "refused it to ACL user 'elsewhere'",
            "elsewhere-pw",
        ),
        "no command permission": Case(
            f"redis://watcher:watcher-pw@{at}", "refused it to ACL user 'watcher'", "watcher-pw"
        ),
        "no channel permission": Case(
            f"redis://deaf:deaf-pw@{at}",
            "refused it to ACL user 'deaf'",
            "deaf-pw",
            before_ready=False,
        ),
    }


@dataclass(frozen=True)
class RabbitUsers:
    node: RabbitServer
    tag: str  # in the users' names: unique to this module's run


@pytest.fixture(scope="module")
def rabbit_users(rabbit_node: RabbitServer) -> RabbitUsers:
    tag = uuid.uuid4().hex[:6]
    rabbit_node.add_user(f"right-{tag}", "right-pw")
    rabbit_node.add_user(f"novhost-{tag}", "novhost-pw", permissions=None)
    rabbit_node.add_user(f"noconf-{tag}", "noconf-pw", permissions=("^$", ".*", ".*"))
    return RabbitUsers(rabbit_node, tag)


def rabbit_cases(users: RabbitUsers) -> dict[str, Case]:
    node, tag = users.node, users.tag
    return {
        "wrong password": Case(
            node.url(f"right-{tag}", "wrong-pw"), "refused the credentials", "wrong-pw"
        ),
        "vhost not allowed": Case(
            node.url(f"novhost-{tag}", "novhost-pw"), "does not allow virtual host", "novhost-pw"
        ),
        "no configure permission": Case(
            node.url(f"noconf-{tag}", "noconf-pw"), "configure, write and read", "noconf-pw"
        ),
    }


REDIS_CASES = [
    "wrong password",
    "no password",
    "no key permission",
    "no command permission",
    "no channel permission",
]
RABBIT_CASES = ["wrong password", "vhost not allowed", "no configure permission"]
ALL = [
    pytest.param("redis", name, marks=pytest.mark.redis, id=f"redis-{name}") for name in REDIS_CASES
]
ALL += [
    pytest.param("amqp", name, marks=pytest.mark.amqp, id=f"amqp-{name}") for name in RABBIT_CASES
]
#: a producer needs no pub/sub channel to publish (only a worker waits on the delay bell)
PRODUCING = [p for p in ALL if p.values[1] != "no channel permission"]


@pytest.fixture
def case_of(request: pytest.FixtureRequest) -> Callable[[str, str], Case]:
    def get(broker: str, name: str) -> Case:
        if broker == "redis":
            return redis_cases(request.getfixturevalue("redis_acl"))[name]
        return rabbit_cases(request.getfixturevalue("rabbit_users"))[name]

    return get


def options(broker: str) -> dict[str, dict[str, float]]:
    return {broker: {"publish_retry_timeout": RETRY_FOR}}


@pytest.mark.parametrize(("broker", "name"), ALL)
def test_worker_stops_at_once_and_says_why(
    broker: str, name: str, case_of: Callable[[str, str], Case], tmp_path: Path
) -> None:
    case = case_of(broker, name)
    queue = f"denied-{uuid.uuid4().hex[:8]}"
    env = {
        "MILLPOND_BROKER_URL": case.url,
        "MILLPOND_QUEUES": queue,
        "MILLPOND_IGNORE_RESULT": "true",
        f"MILLPOND_{broker.upper()}__PUBLISH_RETRY_TIMEOUT": str(RETRY_FOR),
        "FAULTS_DIR": str(tmp_path),
    }
    started = time.monotonic()
    worker = WorkerProcess(["-A", APP, "-P", "threads", "-c", "2"], env, tmp_path, cwd=ROOT)
    try:
        code = worker.proc.wait(FAST + 10)
    except Exception:
        worker.kill()
        pytest.fail(f"the worker was still running after {FAST + 10:g} s:\n{worker.text()[-3000:]}")
    took = time.monotonic() - started
    text = worker.text()
    assert code != 0, text
    assert took < FAST, f"the worker took {took:.1f} s to give up (retried?):\n{text[-3000:]}"
    assert "AccessDenied" in text and case.says in text, text[-3000:]
    assert "did not answer" not in text and "is the server up" not in text, text[-3000:]
    assert case.secret not in text, "the password leaked into the worker's output"
    if case.before_ready:
        assert "worker ready" not in text, "the worker said it was ready before it was refused"


@pytest.mark.parametrize(("broker", "name"), PRODUCING)
def test_producer_fails_at_once_and_says_why(
    broker: str, name: str, case_of: Callable[[str, str], Case]
) -> None:
    case = case_of(broker, name)
    queue = f"denied-{uuid.uuid4().hex[:8]}"
    app = Millpond("denied", broker_url=case.url, default_queue=queue, **options(broker))
    started = time.monotonic()
    try:
        with pytest.raises(PublishAccessDenied) as caught:
            app.send_task(NOOP, [])
    finally:
        app.close()
    took = time.monotonic() - started
    assert took < FAST / 3, f"publishing took {took:.1f} s to give up (retried?)"
    error = caught.value
    assert isinstance(error, AccessDenied) and isinstance(error, PublishError)
    assert case.says in str(error), str(error)
    assert "did not answer" not in str(error) and case.secret not in str(error)
