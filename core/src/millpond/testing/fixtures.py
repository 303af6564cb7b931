"""millpond's pytest plugin: the fixtures every millpond test suite needs, a plugin's included.

It is registered through the `pytest11` entry point of the `millpond` distribution, so any pytest
session in an environment where millpond is installed has these fixtures without a conftest.py:

* `memory_app`: an app on a private `memory://` broker with a unique queue, closed afterwards;
* `start_worker(app, **flags)`: a real `Worker` for `app` running in a background thread, ready
  when the call returns (flags are settings: `pool="threads"`, `concurrency=4`...); every worker
  still running at the end of the test is stopped cold;
* `span_exporter`: an in-memory span exporter on this process's SDK tracer provider (session);
* `unique(prefix)`: a unique name for a queue or a task, also importable for module-level use;
* `rabbit_node`: a private RabbitMQ node (`millpond.testing.servers.RabbitServer`) shared by the
  session, for tests that add users, vhosts or permissions (never the shared server's);
* `own_rabbit_node`: a private RabbitMQ node for one test, which may stop and restart it.

And the fixtures for a project's own tests (docs/testing.md):

* `millpond_app`: the project's app (`millpond_app = "pkg.module:app"` in the pytest ini, or
  `--millpond-app`), or a fresh one when none is named, pointed for this test at the broker under
  test (`--millpond-broker URL`, ini `millpond_broker_url`; default a private `memory://`) and at
  a queue of its own, which is purged afterwards; the app's own settings come back after the test;
* `millpond_worker`: a real worker for `millpond_app` in a background thread, ready when the
  fixture returns, stopped afterwards; its pool is `--millpond-pool` / ini `millpond_pool`
  (default threads), or per test `@pytest.mark.millpond_worker(pool="solo", concurrency=1)`;
* `millpond_drain`: `millpond_drain(timeout=10)` waits until the test's queue has no ready message
  and the worker holds none (so every task sent so far has finished), or fails saying what is left;
* `millpond_eager`: `millpond_app` with a worker, where `delay()` / `apply_async()` (and canvas)
  return only once everything sent has run: results are ready, retries done, side effects visible.
  Tasks run on the real worker, so they behave as in production (unlike Celery's eager mode).

pytest imports this module at start-up, before any conftest.py: it imports nothing but pytest and
the standard library there, so a suite whose conftest.py monkey-patches the interpreter (gevent,
eventlet) still patches before millpond, structlog or OpenTelemetry are imported.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from millpond.produce.app import Millpond
    from millpond.testing.servers import RabbitServer

__all__ = [
    "RunningWorker",
    "memory_app",
    "millpond_app",
    "millpond_drain",
    "millpond_eager",
    "millpond_worker",
    "own_rabbit_node",
    "rabbit_node",
    "span_exporter",
    "start_worker",
    "unique",
]


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class RunningWorker:
    """A real Worker running `run()` in a background thread, stopped by the fixture."""

    def __init__(self, app: Millpond, **flags: Any) -> None:
        from millpond.config.settings import load_settings
        from millpond.consume.worker import Worker

        # what `millpond_app` pointed the app at for this test, then the flags given here
        flags = {**getattr(app, "_millpond_test_settings", {}), **flags}
        settings = load_settings(flags, env={}, code=app.code_config)
        self.worker = Worker(app, settings=settings)
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="test-worker", daemon=True)

    def _run(self) -> None:
        try:
            self.exit_code = self.worker.run()
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def start(self) -> RunningWorker:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.worker.ready.wait(0.01):
            if self.error is not None:
                raise self.error
            if time.monotonic() > deadline:
                raise AssertionError("worker did not become ready within 15 s")
        return self

    def stop(self, cold: bool = False, timeout: float = 30) -> int | None:
        self.worker.stop(cold=cold)
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError(f"worker did not stop within {timeout} s")
        if self.error is not None:
            raise self.error
        return self.exit_code


@pytest.fixture
def memory_app() -> Iterator[Millpond]:
    """An app on a private memory:// broker with a unique queue."""
    from millpond.produce.app import Millpond

    name = unique("mem")
    app = Millpond("test", broker_url=f"memory://{name}", default_queue=name, queues=[name])
    yield app
    app.close()


@pytest.fixture
def start_worker() -> Iterator[Callable[..., RunningWorker]]:
    """`start_worker(app, **flags)`: a started RunningWorker; stopped cold at teardown if alive."""
    started: list[RunningWorker] = []

    def start(app: Millpond, **flags: Any) -> RunningWorker:
        running = RunningWorker(app, **flags).start()
        started.append(running)
        return running

    yield start
    for running in started:
        if running.thread.is_alive():
            running.stop(cold=True)


@pytest.fixture(scope="session")
def span_exporter() -> Any:
    """An in-memory span exporter attached to this process's (single) SDK tracer provider."""
    from millpond.testing.otel import memory_exporter

    return memory_exporter()


# -- fixtures for a project's own tests -------------------------------------------------------------

_MARK = "millpond_worker"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("millpond")
    group.addoption("--millpond-app", default=None, help="the app under test, as module:attribute")
    group.addoption(
        "--millpond-broker", default=None, help="broker URL for millpond_app (default memory://)"
    )
    group.addoption("--millpond-pool", default=None, help="pool of millpond_worker (threads)")
    parser.addini("millpond_app", "the app under test, as module:attribute", default="")
    parser.addini("millpond_broker_url", "broker URL for millpond_app", default="")
    parser.addini("millpond_pool", "pool of the millpond_worker fixture", default="")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{_MARK}(pool=..., concurrency=..., **settings): how the millpond_worker fixture runs",
    )


def _option(config: pytest.Config, flag: str, ini: str) -> str:
    given = config.getoption(flag)
    return str(given) if given else str(config.getini(ini) or "")


def _load_app(path: str) -> Millpond:
    import importlib

    from millpond.produce.app import Millpond

    module_name, _, attribute = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in (attribute or "app").split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise pytest.UsageError(
            f"millpond_app = {path!r} cannot be loaded ({exc}); name it as module:attribute, "
            "e.g. shop.tasks:app"
        ) from exc
    if not isinstance(target, Millpond):
        raise pytest.UsageError(f"millpond_app = {path!r} is a {type(target).__name__}, not an app")
    return target


@pytest.fixture
def millpond_app(request: pytest.FixtureRequest) -> Iterator[Millpond]:
    """The app under test, on the broker under test and a queue of this test's own."""
    from millpond.config.settings import load_settings
    from millpond.contracts.broker import dead_letter_queue
    from millpond.produce.app import Millpond

    config = request.config
    name = unique("mp-test")
    url = _option(config, "--millpond-broker", "millpond_broker_url") or "memory://"
    if url.rstrip("/") == "memory:":
        url = f"memory://{name}"
    path = _option(config, "--millpond-app", "millpond_app")
    app = _load_app(path) if path else Millpond("test")
    overrides: dict[str, Any] = {"broker_url": url, "default_queue": name, "queues": [name]}
    previous = app.settings if path else None
    app.configure(load_settings(overrides, env={}, code=app.code_config))
    app._millpond_test_settings = overrides  # type: ignore[attr-defined]
    try:
        yield app
    finally:
        try:
            app.broker.purge(name)
            app.broker.purge(dead_letter_queue(name))
        except Exception:
            pass
        del app._millpond_test_settings  # type: ignore[attr-defined]
        if previous is not None:
            app.configure(previous)
        else:
            app.close()


@pytest.fixture
def millpond_worker(
    request: pytest.FixtureRequest, millpond_app: Millpond
) -> Iterator[RunningWorker]:
    """A real worker for `millpond_app`, running in a background thread until the test ends."""
    flags: dict[str, Any] = {}
    pool = _option(request.config, "--millpond-pool", "millpond_pool")
    if pool:
        flags["pool"] = pool
    marker = request.node.get_closest_marker(_MARK)
    if marker is not None:
        flags.update(marker.kwargs)
    flags.setdefault("pool", "threads")
    running = RunningWorker(millpond_app, **flags).start()
    try:
        yield running
    finally:
        if running.thread.is_alive():
            running.stop()


def _drain(app: Millpond, running: RunningWorker, timeout: float) -> None:
    """Wait until the app's queues hold no ready message and the worker holds none.

    Seen idle, the worker is woken and the check repeated after its loop has turned once more:
    a delivery that its fetch had just returned, not yet counted as held, is counted by then.
    """
    worker = running.worker
    queues = list(app.settings.queues) or [app.settings.default_queue]
    deadline = time.monotonic() + timeout
    idle_since: float | None = None
    while True:
        if running.error is not None:
            raise running.error
        waiting = {q: app.broker.queue_length(q) for q in queues}
        held = worker.acks.held if worker.acks is not None else 0
        if any(waiting.values()) or held or worker.buffer:
            idle_since = None
        elif idle_since is None:
            idle_since = time.monotonic()
            worker.inbox.waker.wake()
        elif worker.last_turn > idle_since:
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"millpond_drain: after {timeout:g} s, {sum(waiting.values())} message(s) still "
                f"wait in {waiting} and the worker holds {held} (running or not yet started)"
            )
        time.sleep(0.002)


@pytest.fixture
def millpond_drain(millpond_app: Millpond, millpond_worker: RunningWorker) -> Callable[..., None]:
    """`millpond_drain(timeout=10)`: wait until every task sent so far has finished."""

    def drain(timeout: float = 10.0) -> None:
        _drain(millpond_app, millpond_worker, timeout)

    return drain


@pytest.fixture
def millpond_eager(millpond_app: Millpond, millpond_worker: RunningWorker) -> Iterator[Millpond]:
    """`millpond_app` whose publishes return once everything sent has run on the worker.

    A task's own `.delay()` (run by the worker) does not wait: the outer call waits for it too.
    """
    from millpond.produce.task import current_request

    broker = millpond_app.broker
    publish, publish_many = broker.publish, broker.publish_many

    def settle() -> None:
        if current_request() is None and threading.current_thread() is not millpond_worker.thread:
            _drain(millpond_app, millpond_worker, 30.0)

    def eager_publish(*args: Any, **kwargs: Any) -> None:
        publish(*args, **kwargs)
        settle()

    def eager_publish_many(*args: Any, **kwargs: Any) -> None:
        publish_many(*args, **kwargs)
        settle()

    broker.publish = eager_publish  # type: ignore[method-assign]
    broker.publish_many = eager_publish_many  # type: ignore[method-assign]
    try:
        yield millpond_app
    finally:
        broker.publish, broker.publish_many = publish, publish_many  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def rabbit_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitServer]:
    """A private RabbitMQ node for the whole session (it takes seconds to start): tests add their
    own uniquely named users and vhosts to it and must not stop it (use `own_rabbit_node`)."""
    from millpond.testing.servers import RabbitServer

    node = RabbitServer(tmp_path_factory.mktemp("rabbit-node")).start()
    yield node
    node.stop()


@pytest.fixture
def own_rabbit_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitServer]:
    """A private RabbitMQ node for one test, which may stop it (`app_stopped()`) or reconfigure it."""
    from millpond.testing.servers import RabbitServer

    node = RabbitServer(tmp_path_factory.mktemp("own-rabbit-node")).start()
    yield node
    node.stop()
