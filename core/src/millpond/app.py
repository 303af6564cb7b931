"""The application object: the task registry, the settings, and the producer side.

    app = Millpond("shop")

    @app.task
    def add(x, y):
        return x + y

    add.delay(2, 3).get(timeout=10)

The broker and the result backend are created lazily on first use, once per process (a forked child
gets its own), so importing an app module opens no connection and starts no thread.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, overload

from millpond import plugins, telemetry
from millpond.broker import Broker, ResultBackend
from millpond.protocol import encode_task
from millpond.result import AsyncResult
from millpond.settings import Settings, load_settings
from millpond.task import Task, current_request, make_options

#: the URL used when no broker is configured: the embedded, zero-server broker
DEFAULT_BROKER_URL = "sqlite://"


class Millpond:
    """A millpond application: where tasks are registered and from which they are sent."""

    def __init__(
        self,
        name: str = "millpond",
        *,
        broker_url: str | None = None,
        result_backend: str | None = None,
        settings: Settings | None = None,
        **config: Any,
    ) -> None:
        self.name = name
        self.tasks: dict[str, Task] = {}
        self._code_config: dict[str, Any] = dict(config)
        if broker_url is not None:
            self._code_config["broker_url"] = broker_url
        if result_backend is not None:
            self._code_config["result_backend"] = result_backend
        self._settings = settings
        self._lock = threading.RLock()
        self._broker: Broker | None = None
        self._backend: ResultBackend | None = None
        self._backend_resolved = False
        self._pid = os.getpid()
        self.origin = f"{os.getpid()}@{socket.gethostname()}"

    def __repr__(self) -> str:
        return f"<Millpond {self.name}: {len(self.tasks)} tasks>"

    # -- settings --------------------------------------------------------------------------------
    @property
    def settings(self) -> Settings:
        if self._settings is None:
            with self._lock:
                if self._settings is None:
                    self._settings = load_settings(code=self._code_config)
        return self._settings

    def configure(self, settings: Settings) -> None:
        """Use these settings (the worker passes its fully merged ones); drops open connections."""
        with self._lock:
            self._settings = settings
            self._reset()

    @property
    def code_config(self) -> Mapping[str, Any]:
        return self._code_config

    # -- registry --------------------------------------------------------------------------------
    @overload
    def task(self, fn: Callable[..., Any], /) -> Task: ...

    @overload
    def task(self, fn: None = None, /, **options: Any) -> Callable[[Callable[..., Any]], Task]: ...

    def task(
        self, fn: Callable[..., Any] | None = None, /, **options: Any
    ) -> Task | Callable[[Callable[..., Any]], Task]:
        """Register a function as a task; options are checked now (see TaskOptions)."""

        def register(func: Callable[..., Any]) -> Task:
            task = Task(self, func, make_options(func, options))
            existing = self.tasks.get(task.name)
            if existing is not None and existing.fn is not func:
                qualname = getattr(existing.fn, "__qualname__", existing.fn)
                raise ValueError(f"a task named {task.name!r} is already registered ({qualname})")
            self.tasks[task.name] = task
            return task

        if fn is not None:
            return register(fn)
        return register

    # -- connections (per process) ---------------------------------------------------------------
    def _reset(self) -> None:
        self._broker = None
        self._backend = None
        self._backend_resolved = False
        self._pid = os.getpid()

    def _check_pid(self) -> None:
        if self._pid != os.getpid():  # forked: the parent's connections are not ours
            self._reset()

    @property
    def broker_url(self) -> str:
        return self.settings.broker_url or DEFAULT_BROKER_URL

    @property
    def broker(self) -> Broker:
        self._check_pid()
        if self._broker is None:
            with self._lock:
                if self._broker is None:
                    self._broker = plugins.broker_for_url(self.broker_url, self.broker_options())
        return self._broker

    def broker_options(self) -> dict[str, Any]:
        """Options handed to the broker plugin: its own settings section (`[redis]`,
        `MILLPOND_REDIS__*`), which the plugin validates."""
        scheme = plugins.scheme_of(self.broker_url).split("+")[0]
        section = {"rediss": "redis", "amqps": "amqp", "pyamqp": "amqp"}.get(scheme, scheme)
        return dict(self.settings.sections.get(section, {}))

    @property
    def backend(self) -> ResultBackend | None:
        self._check_pid()
        if not self._backend_resolved:
            with self._lock:
                if not self._backend_resolved:
                    url = self.settings.result_backend
                    if url:
                        options = {"result_expires": self.settings.result_expires}
                        self._backend = plugins.backend_for_url(url, options)
                    else:
                        self._backend = self.broker.default_backend()
                    self._backend_resolved = True
        return self._backend

    def close(self) -> None:
        with self._lock:
            if self._broker is not None:
                self._broker.close()
            if self._backend is not None:
                self._backend.close()
            self._reset()

    # -- producing -------------------------------------------------------------------------------
    def send_task(
        self,
        name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        queue: str | None = None,
        countdown: float | None = None,
        eta: datetime | float | None = None,
        expires: datetime | float | None = None,
        headers: Mapping[str, Any] | None = None,
        task_id: str | None = None,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        ignore_result: bool | None = None,
        priority: int | None = None,
        retries: int = 0,
    ) -> AsyncResult:
        """Send a task by name (it need not be registered here); returns its result handle.

        `countdown` (seconds) or `eta` (datetime or epoch seconds) delay it, held by the broker;
        `expires` (datetime, epoch seconds, or seconds from now when below one year) drops it if a
        worker gets it too late.
        """
        now = time.time()
        eta_ts: float | None = None
        if countdown is not None:
            eta_ts = now + float(countdown)
        elif eta is not None:
            eta_ts = eta.timestamp() if isinstance(eta, datetime) else float(eta)
        expires_ts: float | None = None
        if expires is not None:
            if isinstance(expires, datetime):
                expires_ts = expires.timestamp()
            else:
                expires_ts = now + float(expires) if float(expires) < 31_536_000 else float(expires)
        parent = current_request()
        queue = queue or self.settings.default_queue
        if ignore_result is None:
            ignore_result = self.settings.ignore_result
        message = encode_task(
            name,
            args,
            kwargs,
            task_id=task_id,
            retries=retries,
            eta=eta_ts,
            expires=expires_ts,
            time_limit=time_limit,
            soft_time_limit=soft_time_limit,
            root_id=parent.root_id or parent.id if parent else None,
            parent_id=parent.id if parent else None,
            origin=self.origin,
            ignore_result=ignore_result,
            sent_at=now,
            headers=headers,
            priority=priority,
        )
        if self.settings.signing_key:
            from millpond.signing import sign

            sign(message, self.settings.signing_key)
        task_id = message.headers["id"]
        with telemetry.publish_span(
            queue, name, task_id, message.headers, system=self.broker.system, retries=retries
        ):
            self.broker.publish(queue, message, eta=eta_ts if eta_ts and eta_ts > now else None)
        return AsyncResult(task_id, self)

    def AsyncResult(self, task_id: str) -> AsyncResult:
        return AsyncResult(task_id, self)

    # -- running ---------------------------------------------------------------------------------
    def worker(self, **flags: Any) -> Any:
        """A `Worker` for this app, for running in-process (tests, embedding); see millpond.worker."""
        from millpond.worker import Worker

        return Worker(self, **flags)
