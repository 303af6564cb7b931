"""The application (`Millpond("shop")`): the task registry, the settings, and `publish`, where
every task message leaves the process. The broker and the result backend are made on first use,
once per process (a forked child makes its own): importing an app module opens no connection.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from typing import TYPE_CHECKING, Any, Concatenate, Literal, Unpack, cast, overload

from millpond.config import plugins
from millpond.config.settings import Settings, load_settings
from millpond.contracts.backend import ResultBackend
from millpond.contracts.broker import Broker, Outbound
from millpond.contracts.canvas import Canvas
from millpond.contracts.hooks import HookChain, Hooks, Publication
from millpond.exceptions import PublishError
from millpond.produce.result import AsyncResult
from millpond.produce.task import (
    SEND_OPTIONS,
    BoundTaskDecorator,
    P,
    R,
    SendOptions,
    T,
    Task,
    current_request,
    epoch,
    make_options,
    reject_unknown,
)
from millpond.produce.task import TaskDecoratorOptions as _Options
from millpond.wire.protocol import SENT_AT, encode_task, new_id
from millpond.wire.signing import sign

if TYPE_CHECKING:
    from millpond_canvas import GroupResult, Signature
    from millpond_control.client import Control


def _defaulted(
    sigs: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None,
    reply_to: str | None,
    queue_for: Callable[[str], str] | None = None,
) -> list[Mapping[str, Any]] | None:
    """Signatures given `reply_to` and `queue_for`'s queue unless they name their own: the worker
    sends them later, to the queue this producer would and replying here (rpc://, as `freeze`)."""
    out: list[Mapping[str, Any]] = []
    for sig in [sigs] if isinstance(sigs, Mapping) else sigs or ():
        options = sig.get("options") or {}
        given = {"queue": queue_for(sig["task"]) if queue_for else None, "reply_to": reply_to}
        missing = {key: value for key, value in given.items() if value and not options.get(key)}
        out.append({**sig, "options": {**options, **missing}} if missing else sig)
    return out or None


#: a publish on its way to the broker: the hooks' view of it, the chain that saw it begin (hooks
#: added meanwhile did not) and its tokens
_Pending = tuple[Publication, HookChain, Any]


class Millpond:
    """A millpond application: where tasks are registered and from which they are sent."""

    #: the class `@app.task` makes tasks of: an integration subclasses `Task` to add methods
    #: (millpond_django's `delay_on_commit`) and sets this on its app class
    task_cls: type[Task[..., Any]] = Task

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
        self.tasks: dict[str, Task[..., Any]] = {}
        #: the `add_periodic_task` calls made, as their arguments (read by `millpond beat`)
        self.periodic_tasks: list[dict[str, Any]] = []
        urls = {"broker_url": broker_url, "result_backend": result_backend}
        #: the settings given in code (`Millpond(...)` keywords), weighed in by `load_settings`
        self.code_config: Mapping[str, Any] = config | {
            k: v for k, v in urls.items() if v is not None
        }
        self._lock = threading.RLock()
        #: the broker, backend and `app.control` by pid: a forked child never uses its parent's
        self._conns: dict[int, dict[str, Any]] = {}
        #: the settings, the hook chain and the canvas, made on first use, kept across a fork
        self._kept: dict[str, Any] = {} if settings is None else {"settings": settings}
        #: the publishes `publishing_together` is collecting in this context, if it is
        self._batch = ContextVar[list[_Pending] | None](f"millpond-batch-{id(self)}", default=None)
        self._added_hooks: list[Hooks] = []
        self.origin = f"{os.getpid()}@{socket.gethostname()}"

    def __repr__(self) -> str:
        return f"<Millpond {self.name}: {len(self.tasks)} tasks>"

    # -- settings --------------------------------------------------------------------------------
    @property
    def settings(self) -> Settings:
        return self._lazy("settings", lambda: load_settings(code=self.code_config), kept=True)

    def configure(self, settings: Settings) -> None:
        """Use these settings (the worker passes its fully merged ones); drops open connections."""
        with self._lock:
            self._kept["settings"] = settings
            self._conns = {}

    # -- registry --------------------------------------------------------------------------------
    # The overloads give the type checker the function's parameters, return type and every option
    # by name; the implementation checks `**options` itself, for callers it does not see.
    @overload
    def task(
        self, fn: Callable[P, R], /, *, bind: Literal[False] = False, **options: Unpack[_Options]
    ) -> Task[P, R]: ...

    @overload
    def task(
        self, fn: Callable[Concatenate[Task[P, Any], P], R], /, *, bind: Literal[True],
        **options: Unpack[_Options],
    ) -> Task[P, R]: ...  # fmt: skip

    @overload
    def task(
        self, fn: None = None, /, *, bind: Literal[False] = False, **options: Unpack[_Options]
    ) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    @overload
    def task(
        self, fn: None = None, /, *, bind: Literal[True], **options: Unpack[_Options]
    ) -> BoundTaskDecorator: ...

    @overload
    def task(
        self, fn: None = None, /, *, bind: bool, **options: Unpack[_Options]
    ) -> Callable[[Callable[..., Any]], Task[..., Any]]: ...

    def task(
        self, fn: Callable[..., Any] | None = None, /, **options: Any
    ) -> Task[..., Any] | Callable[[Callable[..., Any]], Task[..., Any]]:
        """Register a function as a task; options are checked now (see TaskOptions)."""
        if fn is None:
            return lambda func: self.task(func, **options)
        task: Task[..., Any] = self.task_cls(self, fn, make_options(fn, options))
        if (existing := self.tasks.get(task.name)) is not None and existing.fn is not fn:
            qualname = getattr(existing.fn, "__qualname__", existing.fn)
            raise ValueError(f"a task named {task.name!r} is already registered ({qualname})")
        self.tasks[task.name] = task
        return task

    # -- periodic tasks --------------------------------------------------------------------------
    def add_periodic_task(
        self,
        schedule: Any,
        sig: Mapping[str, Any] | Task[..., Any] | str,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        name: str | None = None,
        **options: Any,
    ) -> None:
        """Run `sig` (a signature, a task or a task name) on `schedule` under `millpond beat`, as
        Celery's (docs/beat.md). Only recorded here: millpond-beat names and checks it at start."""
        call = {"sig": sig, "args": args, "kwargs": kwargs, "name": name, "options": options}
        self.periodic_tasks.append({"schedule": schedule, **call})

    def periodic_task(
        self, schedule: Any, *, name: str | None = None, **options: Any
    ) -> Callable[[Callable[P, R]], Task[P, R]]:
        """`@app.task` (unless given a task), also run on `schedule` with no arguments."""

        def decorate(fn: Callable[P, R]) -> Task[P, R]:
            task: Task[P, R] = fn if isinstance(fn, Task) else self.task(fn)
            self.add_periodic_task(schedule, task.name, (), {}, name=name or task.name, **options)
            return task

        return decorate

    # -- hooks -------------------------------------------------------------------------------------
    @property
    def hooks(self) -> HookChain:
        """The installed hooks the `hooks` setting names (default: all), then `add_hooks`' ones."""
        return self._lazy(
            "hooks",
            lambda: HookChain([*plugins.load_hooks(self.settings.hooks), *self._added_hooks]),
            kept=True,
        )

    def add_hooks(self, *hooks: Hooks) -> None:
        """Add hooks implementations of your own (a worker started later calls them too)."""
        with self._lock:
            self._added_hooks.extend(hooks)
            if "hooks" in self._kept:
                self._kept["hooks"] = self._kept["hooks"] + hooks

    def use_hooks(self, hooks: Iterable[Hooks]) -> None:
        """These hooks, already made, then the others added with `add_hooks`: `millpond worker`
        makes the installed ones before importing the app (their `process_starting` sets up the
        tracing it may build on), hands back those still on, and the process keeps one per hook."""
        made = tuple(hooks)
        with self._lock:
            own = [h for h in self._added_hooks if all(h is not m for m in made)]
            self._kept["hooks"] = HookChain([*made, *own])

    # -- connections (per process) ---------------------------------------------------------------
    def _lazy(self, key: str, make: Callable[[], T], *, kept: bool = False) -> T:
        """`key`, made once on first use, under the lock (threads may ask at once)."""
        made = self._kept if kept else self._conns.setdefault(os.getpid(), {})
        if key not in made:
            with self._lock:
                if key not in made:
                    made[key] = make()
        return cast(T, made[key])

    @property
    def broker_url(self) -> str:
        return self.settings.broker_url or "sqlite://"  # none set: the embedded, zero-server one

    @property
    def broker(self) -> Broker:
        return self._lazy("broker", self._make_broker)

    def _make_broker(self) -> Broker:
        # its options: the plugin's settings section (`[redis]`, `MILLPOND_REDIS__*`), validated,
        # with the URL's query parameters weighed in by where each was given
        options = self.settings.plugin_options(plugins.scheme_of(self.broker_url), "broker_url")
        return plugins.broker_for_url(self.broker_url, options)

    @property
    def backend(self) -> ResultBackend | None:
        return self._lazy("backend", self._make_backend)

    def _make_backend(self) -> ResultBackend | None:
        if not (url := self.settings.result_backend):
            return self.broker.default_backend()
        backend = plugins.backend_for_url(url, {"result_expires": self.settings.result_expires})
        if backend.replies_to_caller:  # rpc://: results travel over the broker
            backend.bind_broker(self.broker)
        return backend

    @property
    def control(self) -> Control:
        """Remote control, as Celery's `app.control` (docs/control.md): the `control` entry point
        of `millpond.clients` (millpond-control), whose `Control` the core names only for typing."""
        return cast(
            "Control", self._lazy("control", lambda: plugins.load(plugins.CLIENTS, "control")(self))
        )

    def close(self) -> None:
        with self._lock:  # not while a connection is being made, or it would be left open
            conns = self._conns.pop(os.getpid(), {})
        for key in ("control", "broker", "backend"):  # the control client uses the broker
            if conns.get(key) is not None:
                conns[key].close()

    # -- producing -------------------------------------------------------------------------------
    def send_task(
        self,
        name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        **options: Unpack[SendOptions],
    ) -> AsyncResult[Any]:
        """Send a task by name (registered here or not); an unknown option is a TypeError."""
        reject_unknown(options, SEND_OPTIONS, "option(s)", f"sending {name}")
        now = time.time()
        countdown, expires = options.get("countdown"), options.get("expires")
        eta = now + float(countdown) if countdown is not None else epoch(options.get("eta"))
        expires_at = epoch(expires)
        if expires_at is not None and not isinstance(expires, datetime) and expires_at < 31_536_000:
            expires_at += now  # below a year: seconds from now
        parent = current_request()
        root_id = options.get("root_id") or (parent.root_id or parent.id if parent else None)
        if (ignore_result := options.get("ignore_result")) is None:
            ignore_result = self.settings.ignore_result
        task_id = options.get("task_id") or new_id()
        reply_to = options.get("reply_to")
        if reply_to is None and not ignore_result and self.backend is not None:
            reply_to = self.backend.reply_to(task_id)  # only an rpc:// backend names one
        chord = _defaulted(options.get("chord"), reply_to)
        retries = options.get("retries", 0)
        message = encode_task(
            name,
            args,
            kwargs,
            task_id=task_id,
            eta=eta,
            expires=expires_at,
            time_limit=options.get("time_limit"),
            soft_time_limit=options.get("soft_time_limit"),
            headers={
                "group": options.get("group_id"),
                "group_index": options.get("group_index"),
                "retries": retries,
                "root_id": root_id or task_id,
                "parent_id": options.get("parent_id") or (parent.id if parent else None),
                "origin": self.origin,
                "ignore_result": ignore_result,
                SENT_AT: now,
                **(options.get("headers") or {}),
            },
            embed={
                "callbacks": _defaulted(options.get("link"), reply_to, self.queue_for),
                "errbacks": _defaulted(options.get("link_error"), reply_to, self.queue_for),
                "chain": _defaulted(options.get("chain"), reply_to),
                "chord": chord[0] if chord else None,
            },
            reply_to=reply_to,
            priority=options.get("priority"),
        )
        self.publish(
            Publication(
                queue=options.get("queue") or self.settings.default_queue,
                message=message,
                task_id=task_id,
                task_name=name,
                retries=retries,
                system=self.broker.system,
                eta=eta if eta and eta > now else None,
            )
        )
        result: AsyncResult[Any] = AsyncResult(task_id, self)
        if parent is not None:
            parent.children.append(result.as_tuple())
        return result

    def publish(self, publication: Publication) -> None:
        """The one way a task message leaves a process (from `send_task`, so the worker's retries
        too): publish hooks, signing, the broker."""
        hooks = self.hooks
        tokens = hooks.before_publish(publication)
        if self.settings.signing_key:
            sign(publication.message, self.settings.signing_key)
        if (batch := self._batch.get()) is not None:
            batch.append((publication, hooks, tokens))
            return
        queue, message, eta = publication.queue, publication.message, publication.eta
        self._hand_over(
            [(publication, hooks, tokens)], lambda: self.broker.publish(queue, message, eta=eta)
        )

    @contextmanager
    def publishing_together(self) -> Iterator[None]:
        """Hand every message published inside the block to the broker together when it ends: a
        broker whose confirms cost a round trip each (RabbitMQ) waits once, not once per message.
        Groups and chords send their tasks this way; nested blocks join the outer one."""
        if self._batch.get() is not None:
            yield
            return
        pending: list[_Pending] = []
        token = self._batch.set(pending)
        try:
            yield
        finally:
            self._batch.reset(token)
            if pending:
                outbound = [Outbound(p.queue, p.message, p.eta) for p, _, _ in pending]
                self._hand_over(pending, lambda: self.broker.publish_many(outbound))

    def _hand_over(self, pending: list[_Pending], send: Callable[[], None]) -> None:
        """`send` the publishes to the broker, then tell the hooks how each went."""
        try:
            send()
        except BaseException as exc:
            # only a PublishError's `not_sent` failed: the broker stored the others (they will run)
            not_sent = exc.not_sent if isinstance(exc, PublishError) else None
            for publication, hooks, tokens in pending:
                failed = not_sent is None or publication.task_id in not_sent
                hooks.after_publish(publication, tokens, exc if failed else None)
            raise
        for publication, hooks, tokens in pending:
            hooks.after_publish(publication, tokens, None)

    def GroupResult(self, group_id: str, results: Sequence[AsyncResult[Any]]) -> GroupResult:
        return cast("GroupResult", self.canvas.group_result(group_id, results))

    def AsyncResult(self, task_id: str) -> AsyncResult[Any]:
        """A handle on the task with this id (untyped: nothing says which task it was)."""
        return AsyncResult(task_id, self)

    def signature(
        self,
        name: str | Mapping[str, Any],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Signature[Any]:
        """A signature by task name (or from a signature dict), bound to this app."""
        if isinstance(name, Mapping):
            return cast("Signature[Any]", self.canvas.from_dict(name))
        return cast("Signature[Any]", self.canvas.signature(name, args, kwargs, options))

    @property
    def canvas(self) -> Canvas:
        """The app's canvas (`millpond.contracts.canvas`), built once from the installed
        `millpond.canvas` plugin (millpond-canvas); registers Celery's built-in canvas tasks."""
        return self._lazy("canvas", lambda: plugins.canvas_class()(self), kept=True)

    def queue_for(self, name: str) -> str:
        """The queue a call that names none sends the task to (its own, else the default)."""
        task = self.tasks.get(name)
        return task.options.queue if task and task.options.queue else self.settings.default_queue
