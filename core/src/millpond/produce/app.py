"""The application object (`Millpond("shop")`): the task registry, the settings, and the producer
side, where every task message leaves the process (`publish`).

The broker and the result backend are created lazily on first use, once per process (a forked child
gets its own), so importing an app module opens no connection and starts no thread.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    Literal,
    ParamSpec,
    TypeVar,
    Unpack,
    cast,
    overload,
)

import structlog

from millpond.config import plugins
from millpond.config.settings import Settings, load_settings
from millpond.contracts.backend import ResultBackend
from millpond.contracts.broker import Broker, Outbound
from millpond.contracts.canvas import Canvas
from millpond.contracts.hooks import HookChain, Hooks, Publication, publishing_parent
from millpond.exceptions import PublishError
from millpond.produce.result import AsyncResult, GroupResult
from millpond.produce.task import (
    SEND_OPTIONS,
    BoundTaskDecorator,
    SendOptions,
    Task,
    TaskDecorator,
    TaskDecoratorOptions,
    current_request,
    make_options,
)
from millpond.wire.protocol import Message, encode_task, new_id
from millpond.wire.signing import sign

if TYPE_CHECKING:
    from millpond.contracts.clients import ControlClient
    from millpond_canvas import Signature


@dataclass(frozen=True, slots=True)
class PeriodicDeclaration:
    """A periodic task declared in code (`Millpond.add_periodic_task`), as it was declared.

    The core only records it: the schedule (seconds, a `timedelta`, a five-field crontab string
    or a schedule object) is interpreted and checked by the scheduler plugin (`millpond beat`,
    from millpond-beat), which fails at start-up naming the entry when it is not valid. `options`
    holds everything else given (queue, expires, timezone, catch_up, ... and Celery's options).
    """

    name: str
    schedule: Any
    task: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)


def _epoch(when: datetime | float | None) -> float | None:
    return when.timestamp() if isinstance(when, datetime) else None if when is None else float(when)


def _defaulted(
    sigs: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None,
    key: str,
    value: str | Callable[[str], str],
) -> list[Mapping[str, Any]] | None:
    """Signatures with `key` in their options (`value`, or `value` of the task's name) unless they
    name their own. Callbacks get the queue this producer would send them to, not the worker's
    own, and, with a backend that replies to the caller, this caller's `reply_to` (where Celery's
    `freeze` puts it), since the worker that sends them later routes their results by it."""
    listed = [sigs] if isinstance(sigs, Mapping) else list(sigs or ())
    out: list[Mapping[str, Any]] = []
    for sig in listed:
        options = sig.get("options") or {}
        if options.get(key):
            out.append(sig)
        else:
            given = value if isinstance(value, str) else value(sig["task"])
            out.append({**sig, "options": {**options, key: given}})
    return out or None


# the methods `Millpond.AsyncResult` and `Millpond.GroupResult` (Celery's names) hide the classes
# inside the class body
_AsyncResult = AsyncResult
_GroupResult = GroupResult

#: the URL used when no broker is configured: the embedded, zero-server broker
DEFAULT_BROKER_URL = "sqlite://"

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Pending:
    """A publish `publishing_together` holds until its block ends: the hooks' view and tokens."""

    publication: Publication
    tokens: Any
    outbound: Outbound


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
        #: periodic tasks declared in code, by entry name (run by `millpond beat`)
        self.periodic_tasks: dict[str, PeriodicDeclaration] = {}
        urls = {"broker_url": broker_url, "result_backend": result_backend}
        #: the settings given in code (`Millpond(...)` keywords), weighed in by `load_settings`
        self.code_config: Mapping[str, Any] = {
            **config,
            **{key: url for key, url in urls.items() if url is not None},
        }
        self._lock = threading.RLock()
        #: this process's broker, result backend and `app.control`, by name, made on first use
        self._conns: dict[str, Any] = {}
        #: the settings, the hook chain and the canvas, made on first use, kept across a fork
        self._kept: dict[str, Any] = {} if settings is None else {"settings": settings}
        self._warned: set[Hashable] = set()
        #: the publishes `publishing_together` is collecting in this context, if it is
        self._batch: ContextVar[list[_Pending] | None] = ContextVar(
            f"millpond-batch-{id(self)}", default=None
        )
        self._added_hooks: list[Hooks] = []
        self._pid = os.getpid()
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
            self._reset()

    # -- registry --------------------------------------------------------------------------------
    # The overloads give the type checker the function's parameters and return type (see
    # millpond.produce.task) and every option by name; the implementation takes `**options` and
    # checks them itself, for callers the type checker does not see.
    @overload
    def task(
        self,
        fn: Callable[P, R],
        /,
        *,
        bind: Literal[False] = False,
        **options: Unpack[TaskDecoratorOptions],
    ) -> Task[P, R]: ...

    @overload
    def task(
        self,
        fn: Callable[Concatenate[Task[P, Any], P], R],
        /,
        *,
        bind: Literal[True],
        **options: Unpack[TaskDecoratorOptions],
    ) -> Task[P, R]: ...

    @overload
    def task(
        self,
        fn: None = None,
        /,
        *,
        bind: Literal[False] = False,
        **options: Unpack[TaskDecoratorOptions],
    ) -> TaskDecorator: ...

    @overload
    def task(
        self, fn: None = None, /, *, bind: Literal[True], **options: Unpack[TaskDecoratorOptions]
    ) -> BoundTaskDecorator: ...

    @overload
    def task(
        self, fn: None = None, /, *, bind: bool, **options: Unpack[TaskDecoratorOptions]
    ) -> Callable[[Callable[..., Any]], Task[..., Any]]: ...

    def task(
        self, fn: Callable[..., Any] | None = None, /, **options: Any
    ) -> Task[..., Any] | Callable[[Callable[..., Any]], Task[..., Any]]:
        """Register a function as a task; options are checked now (see TaskOptions)."""

        def register(func: Callable[..., Any]) -> Task[..., Any]:
            task: Task[..., Any] = self.task_cls(self, func, make_options(func, options))
            existing = self.tasks.get(task.name)
            if existing is not None and existing.fn is not func:
                qualname = getattr(existing.fn, "__qualname__", existing.fn)
                raise ValueError(f"a task named {task.name!r} is already registered ({qualname})")
            self.tasks[task.name] = task
            return task

        if fn is not None:
            return register(fn)
        return register

    # -- periodic tasks --------------------------------------------------------------------------
    def add_periodic_task(
        self,
        schedule: Any,
        sig: Mapping[str, Any] | Task[..., Any] | str,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        name: str | None = None,
        **options: Any,
    ) -> PeriodicDeclaration:
        """Run `sig` on `schedule` under `millpond beat` (Celery's `add_periodic_task`).

        `schedule` is seconds, a `timedelta`, a five-field crontab string ("*/5 * * * *") or a
        schedule object from millpond_beat (`crontab(...)`, `every(...)`, `at(...)`). `sig` is a
        signature (`add.s(2, 3)`), a task, or a task name; `args`/`kwargs` override the
        signature's. `options` are the entry's: queue, expires, timezone, catch_up, and the
        signature's own options. `name` defaults to the call's repr, as Celery names it; a second
        declaration under one name replaces the first.
        """
        if not isinstance(sig, Mapping):
            sig = {"task": sig if isinstance(sig, str) else sig.name}
        task = str(sig["task"])
        args = tuple(sig.get("args") or () if args is None else args)
        kwargs = dict(sig.get("kwargs") or {} if kwargs is None else kwargs)
        if name is None:
            shown = [*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())]
            name = f"{task}({', '.join(shown)})"
        options = {**(sig.get("options") or {}), **options}
        declaration = PeriodicDeclaration(name, schedule, task, args, kwargs, options)
        self.periodic_tasks[name] = declaration
        return declaration

    def periodic_task(
        self, schedule: Any, *, name: str | None = None, **options: Any
    ) -> Callable[[Callable[P, R]], Task[P, R]]:
        """Register a function as a task and run it on `schedule` (no arguments):

            @app.periodic_task(crontab("0 7 * * mon-fri"), name="morning report")
            def report() -> None: ...

        Applied to a function it is registered as with `@app.task`; applied to a task it only
        adds the schedule. `options` are as in `add_periodic_task`.
        """

        def decorate(fn: Callable[P, R]) -> Task[P, R]:
            task: Task[P, R] = fn if isinstance(fn, Task) else self.task(fn)
            self.add_periodic_task(schedule, task.name, (), {}, name=name or task.name, **options)
            return task

        return decorate

    # -- hooks -------------------------------------------------------------------------------------
    @property
    def hooks(self) -> HookChain:
        """Every hooks implementation of this app: the installed ones the `hooks` setting names
        (all, by default), then the ones added with `add_hooks`. Made on first use."""
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

    def adopt_hooks(self, installed: Iterable[Hooks]) -> None:
        """Use hooks already made from the `hooks` setting, before the ones added with `add_hooks`.

        `millpond worker` makes the installed hooks before it imports the app (their
        `process_starting` sets up tracing the app module may build on); adopting them keeps one
        object per hook for the life of the process instead of a second set made on first use.
        """
        with self._lock:
            self._kept["hooks"] = HookChain([*installed, *self._added_hooks])

    def use_hooks(self, chain: HookChain) -> None:
        """Replace the hook chain (the worker hands back the one left after start-up)."""
        with self._lock:
            self._kept["hooks"] = chain

    # -- connections (per process) ---------------------------------------------------------------
    def _reset(self) -> None:
        self._conns = {}
        self._pid = os.getpid()

    def _lazy(self, key: str, make: Callable[[], T], *, kept: bool = False) -> T:
        """`key`, made once on first use (under the lock: threads may ask at once). A forked
        child makes its own connections (the parent's are not its) but keeps what is `kept`."""
        if not kept and self._pid != os.getpid():
            self._reset()
        made = self._kept if kept else self._conns
        if key not in made:
            with self._lock:
                if key not in made:
                    made[key] = make()
        return cast(T, made[key])

    @property
    def broker_url(self) -> str:
        return self.settings.broker_url or DEFAULT_BROKER_URL

    @property
    def broker(self) -> Broker:
        return self._lazy(
            "broker", lambda: plugins.broker_for_url(self.broker_url, self.broker_options())
        )

    def broker_options(self) -> dict[str, Any]:
        """Options handed to the broker plugin: the validated values of the settings section it
        publishes under its URL scheme (`[redis]`, `MILLPOND_REDIS__*`), with the URL's query
        parameters weighed in by where each was given."""
        scheme = plugins.scheme_of(self.broker_url)
        return self.settings.plugin_options(scheme, "broker_url")

    @property
    def backend(self) -> ResultBackend | None:
        return self._lazy("backend", self._make_backend)

    def _make_backend(self) -> ResultBackend | None:
        url = self.settings.result_backend
        if not url:
            return self.broker.default_backend()
        backend = plugins.backend_for_url(url, {"result_expires": self.settings.result_expires})
        if backend.replies_to_caller:  # rpc://: results travel over the broker
            backend.bind_broker(self.broker)
        return backend

    @property
    def control(self) -> ControlClient:
        """Remote control, as Celery's `app.control` (docs/control.md): made by the `control`
        entry point of `millpond.clients` (millpond-control, a dependency of millpond), typed
        as that package's `Control` (`millpond.contracts.clients.ControlClient`)."""
        made: ControlClient = self._lazy(
            "control", lambda: plugins.load(plugins.CLIENTS, "control")(self)
        )
        return made

    def close(self) -> None:
        with self._lock:
            conns = self._conns
            self._reset()
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
        """Send a task by name (it need not be registered here); returns its result handle.

        `countdown` (seconds) or `eta` (datetime or epoch seconds) delay it, held by the broker;
        `expires` (datetime, epoch seconds, or seconds from now when below one year) drops it if a
        worker gets it too late. `link` and `link_error` are signatures to send when it succeeds
        or fails (see `millpond_canvas`); `chain`, `chord`, `group_id`, `group_index`,
        `root_id` and `parent_id` are set by the canvas. `reply_to` is where the worker sends the
        result when the backend replies to the caller (rpc://); by default the backend's own
        reply queue for this process, and `""` asks for no reply. An unknown option is a type
        error and, for callers the type checker does not see, a TypeError naming the valid ones.
        """
        unknown = set(options) - SEND_OPTIONS
        if unknown:
            raise TypeError(
                f"unknown option(s) {', '.join(sorted(unknown))} sending {name}; "
                f"valid options: {', '.join(sorted(SEND_OPTIONS))}"
            )
        now = time.time()
        countdown, eta, expires = (
            options.get("countdown"),
            options.get("eta"),
            options.get("expires"),
        )
        eta_ts = now + float(countdown) if countdown is not None else _epoch(eta)
        expires_ts = _epoch(expires)
        if expires_ts is not None and not isinstance(expires, datetime) and expires_ts < 31_536_000:
            expires_ts += now  # seconds from now
        root_id, parent_id = options.get("root_id"), options.get("parent_id")
        parent = current_request()
        if parent is not None:
            root_id = root_id or parent.root_id or parent.id
            parent_id = parent_id or parent.id
        ignore_result = options.get("ignore_result")
        if ignore_result is None:
            ignore_result = self.settings.ignore_result
        task_id = options.get("task_id") or new_id()
        callbacks = _defaulted(options.get("link"), "queue", self.queue_for)
        errbacks = _defaulted(options.get("link_error"), "queue", self.queue_for)
        chain, chord = options.get("chain"), options.get("chord")
        reply_to = options.get("reply_to")
        if reply_to is None and not ignore_result:
            backend = self.backend
            if backend is not None and backend.replies_to_caller:
                reply_to = backend.reply_to(task_id)
        if reply_to:  # what the worker sends next for this task replies here too
            callbacks = _defaulted(callbacks, "reply_to", reply_to)
            errbacks = _defaulted(errbacks, "reply_to", reply_to)
            chain = _defaulted(chain, "reply_to", reply_to)
            chord = (_defaulted(chord, "reply_to", reply_to) or [chord])[0] if chord else chord
        message = encode_task(
            name,
            args,
            kwargs,
            task_id=task_id,
            retries=options.get("retries", 0),
            eta=eta_ts,
            expires=expires_ts,
            time_limit=options.get("time_limit"),
            soft_time_limit=options.get("soft_time_limit"),
            root_id=root_id,
            parent_id=parent_id,
            origin=self.origin,
            ignore_result=ignore_result,
            sent_at=now,
            headers=options.get("headers"),
            priority=options.get("priority"),
            callbacks=callbacks,
            errbacks=errbacks,
            chain=chain,
            chord=chord,
            group_id=options.get("group_id"),
            group_index=options.get("group_index"),
            reply_to=reply_to,
        )
        queue = options.get("queue") or self.settings.default_queue
        eta_ahead = eta_ts if eta_ts and eta_ts > now else None
        self.publish(queue, message, eta=eta_ahead, retries=options.get("retries", 0))
        result: AsyncResult[Any] = AsyncResult(message.headers["id"], self)
        if parent is not None:
            parent.children.append(result.as_tuple())
        return result

    def publish(
        self,
        queue: str,
        message: Message,
        *,
        eta: float | None = None,
        retries: int = 0,
        parent: Mapping[str, str] | None = None,
    ) -> None:
        """The one way a task message leaves a process: publish hooks, signing, the broker.

        `send_task` and the worker's retries both come here. `parent` is the propagation carrier
        of the run that asks (a retry's), when it is not the caller's current context.
        """
        publication = Publication(
            queue=queue,
            message=message,
            task_id=message.headers["id"],
            task_name=message.headers["task"],
            retries=retries,
            system=self.broker.system,
            parent=parent if parent is not None else publishing_parent(),
            eta=eta,
        )
        tokens = self.hooks.before_publish(publication)
        if self.settings.signing_key:
            sign(message, self.settings.signing_key)
        pending = _Pending(publication, tokens, Outbound(queue, message, eta))
        batch = self._batch.get()
        if batch is not None:
            batch.append(pending)
        else:
            self._hand_over([pending], lambda: self.broker.publish(queue, message, eta=eta))

    @contextmanager
    def publishing_together(self) -> Iterator[None]:
        """Hand every message published inside the block to the broker together when it ends.

        The block returns once the broker has them all, as separate publishes would; a broker
        whose confirms cost a round trip each (RabbitMQ) then waits once instead of once per
        message. Groups and chords send their tasks this way. Nested blocks join the outer one.
        """
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
                self._hand_over(
                    pending, lambda: self.broker.publish_many([p.outbound for p in pending])
                )

    def _hand_over(self, pending: list[_Pending], send: Callable[[], None]) -> None:
        """`send` the publishes to the broker, then tell the hooks how each went."""
        hooks = self.hooks
        try:
            send()
        except BaseException as exc:
            # a broker that says which messages it did not take has stored the others: those
            # are reported sent (their tasks will run), only the rest as failed
            not_sent = exc.not_sent if isinstance(exc, PublishError) else None
            for p in pending:
                failed = not_sent is None or p.publication.task_id in not_sent
                hooks.after_publish(p.publication, p.tokens, exc if failed else None)
            raise
        for p in pending:
            hooks.after_publish(p.publication, p.tokens, None)

    def AsyncResult(self, task_id: str) -> AsyncResult[Any]:
        """A handle on the task with this id (untyped: nothing says which task it was)."""
        return AsyncResult(task_id, self)

    def GroupResult(self, group_id: str, results: Sequence[_AsyncResult[Any]]) -> _GroupResult:
        return _GroupResult(group_id, results, self)

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
        """The app's canvas (`millpond.contracts.canvas`): the installed `millpond.canvas` plugin
        (millpond-canvas, which millpond depends on), built once; registers Celery's built-in
        canvas tasks in this app."""
        made: Canvas = self._lazy(
            "canvas", lambda: (plugins.canvas_class() or Canvas)(self), kept=True
        )
        return made

    def queue_for(self, name: str) -> str:
        """The queue this app sends a task to when the call names none: the task's own `queue`
        option if it is registered here, else the `default_queue` setting."""
        task = self.tasks.get(name)
        if task is not None and task.options.queue:
            return task.options.queue
        return self.settings.default_queue

    def warn_once(self, key: Hashable, message: str) -> None:
        """Log `message` as a warning the first time `key` is seen in this process."""
        if key in self._warned:
            return
        self._warned.add(key)
        structlog.get_logger("millpond").warning(message)
