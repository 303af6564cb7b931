"""structlog set-up: JSON lines in production, readable lines on a terminal, context per task.

millpond logs through structlog's own writer on stderr. Every line logged while a task runs
carries `task_id`, `task_name` and `retries` (the `LogContextHooks` bind them in the task's own
context), and `trace_id`/`span_id` when a span is current: `add_trace_ids` takes the ids of
whatever span is current (the task's `process` span, or one the task opened itself), so a log line
leads straight to its span.

The standard `logging` module: records of millpond's own loggers (`millpond.*`, which the broker
plugins use) always go through the same processors and renderer, so a worker's output is one
format. When `millpond worker` owns the process and the root logger has no handlers, the root
logger gets the same handler too, so `logging.getLogger(__name__).info(...)` inside a task comes
out as one of millpond's lines with the task's ids; a root logger the application configured is
left alone, and `log_stdlib = false` never touches it.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from collections.abc import Callable, MutableMapping
from typing import TYPE_CHECKING, Any, TextIO

import structlog

from millpond.contracts.hooks import Hooks
from millpond.observe.trace_ids import current_ids, provider_installed

if TYPE_CHECKING:
    from millpond.contracts.pool import Job

LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}
HANDLER_NAME = "millpond"


def use_json(fmt: str, stream: TextIO) -> bool:
    """`json`, `console`, or `auto`: JSON unless the stream is a terminal."""
    if fmt == "json":
        return True
    if fmt == "console":
        return False
    isatty = getattr(stream, "isatty", None)
    return not (isatty and isatty())


def add_trace_ids(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> Any:
    """Put the current span's trace and span ids on the line, when a span is current."""
    ids = current_ids()
    if ids is not None:
        event["trace_id"], event["span_id"] = ids
    return event


def context_binder(*keys: str) -> Callable[..., None]:
    """A function binding values for `keys`, in order, into structlog's context-local context.

    Same effect as `structlog.contextvars.bind_contextvars(**dict(zip(keys, values)))`, a fifth
    of the cost: that looks each key's variable up on every call, and a task binds its ids every
    time it runs. structlog's variables are found once, through its public functions, and the
    result is checked the same way; should structlog keep its context differently one day, the
    binder falls back to `bind_contextvars`.
    """
    found = contextvars.Context().run(_structlog_variables, keys)
    if found is None:

        def bind_slowly(*values: Any) -> None:
            structlog.contextvars.bind_contextvars(**dict(zip(keys, values, strict=True)))

        return bind_slowly
    setters = [variable.set for variable in found]
    if len(setters) == 2:  # the trace ids, bound for every traced task
        set_a, set_b = setters

        def bind_two(a: Any, b: Any) -> None:
            set_a(a)
            set_b(b)

        return bind_two
    if len(setters) == 3:  # a task's id, name and retries, bound for every task
        set_a, set_b, set_c = setters

        def bind_three(a: Any, b: Any, c: Any) -> None:
            set_a(a)
            set_b(b)
            set_c(c)

        return bind_three

    def bind(*values: Any) -> None:
        for set_value, value in zip(setters, values, strict=True):
            set_value(value)

    return bind


def context_variables(*keys: str) -> tuple[contextvars.ContextVar[Any], ...] | None:
    """The context variables structlog keeps `keys` in (checked), or None should it change."""
    found = contextvars.Context().run(_structlog_variables, keys)
    return tuple(found) if found is not None else None


def _structlog_variables(keys: tuple[str, ...]) -> list[contextvars.ContextVar[Any]] | None:
    """The variables structlog keeps `keys` in, or None; run it in a scratch context."""
    probes = {key: object() for key in keys}
    structlog.contextvars.bind_contextvars(**probes)
    context = contextvars.copy_context()
    holding = {id(context[var]): var for var in context}
    variables = [holding.get(id(probes[key])) for key in keys]
    if any(var is None for var in variables):
        return None
    found = [var for var in variables if var is not None]
    checks = {key: object() for key in keys}
    for var, key in zip(found, keys, strict=True):
        var.set(checks[key])
    bound = structlog.contextvars.get_contextvars()
    if any(bound.get(key) is not checks[key] for key in keys):
        return None
    return found


class _NamedWriteLogger(structlog.WriteLogger):
    """structlog's fast writer, remembering the name it was asked for (`logger` in each line)."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name


class _NamedWriteLoggerFactory:
    def __init__(self, file: TextIO) -> None:
        self._file = file

    def __call__(self, *args: Any) -> _NamedWriteLogger:
        return _NamedWriteLogger(self._file, str(args[0]) if args else "")


def configure(
    level: str = "INFO", fmt: str = "auto", *, stdlib: bool = True, stream: TextIO | None = None
) -> None:
    """Configure structlog for this process (`millpond worker` calls it once at start-up).

    `stdlib`: also give the root logger millpond's handler, if it has no handlers yet.
    """
    stream = stream or sys.stderr
    as_json = use_json(fmt, stream)
    numeric = LEVELS.get(level.upper(), 20)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        add_trace_ids,
        structlog.stdlib.add_logger_name,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if as_json:
        shared.append(structlog.processors.dict_tracebacks)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=bool(getattr(stream, "isatty", lambda: False)())
        )
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_NamedWriteLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    root = logging.getLogger()
    untouched = not [h for h in root.handlers if h.get_name() != HANDLER_NAME]
    _route_stdlib(numeric, shared, renderer, stream, root=stdlib and untouched)


def _route_stdlib(
    level: int, shared: list[Any], renderer: Any, stream: TextIO, *, root: bool
) -> None:
    """Send standard `logging` records through the same processors: millpond's own loggers
    always, the root logger (everyone's) only when asked."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.set_name(HANDLER_NAME)
    ours = logging.getLogger("millpond")
    top = logging.getLogger()
    for logger in (ours, top):
        logger.handlers = [h for h in logger.handlers if h.get_name() != HANDLER_NAME]
    ours.setLevel(level)
    if root:
        top.addHandler(handler)
        top.setLevel(level)
        ours.propagate = True  # the root handler writes millpond's records too, once
    else:
        ours.addHandler(handler)
        ours.propagate = False  # the root logger (and whatever the app did to it) is untouched


def get_logger(name: str = "millpond") -> Any:
    return structlog.get_logger(name)


class LogContextHooks(Hooks):
    """Binds `task_id`, `task_name`, `retries` and, when a span is current, `trace_id` and
    `span_id` into the log context of every task body, so a logging set-up of the application's
    own that reads only the context has them too. Runs after the tracing hook (`order`)."""

    order = 20

    def __init__(self) -> None:
        self._bind = context_binder("task_id", "task_name", "retries")
        self._bind_ids = context_binder("trace_id", "span_id")

    def enter_task(self, job: Job) -> None:
        self._bind(job.task_id, job.task_name, job.retries)
        if not provider_installed():
            return  # no tracer provider: the task's fresh context holds no span
        ids = current_ids()
        if ids is not None:
            self._bind_ids(*ids)
