"""structlog set-up of the processes the CLI owns (`millpond worker`, `millpond beat`): JSON lines
in production, readable lines on a terminal; and the log context, the `logs` hooks.

`LogContextHooks` puts a task's `task_id`, `task_name`, `retries` and, under a span, `trace_id`
and `span_id` in structlog's context while it runs, for any set-up that merges contextvars
(this one, or the application's). It binds in the task's own fresh context, so nothing leaks to
the next task on a reused thread or greenlet. Every line this set-up writes also carries the ids
of whatever span is current when it is written (the task's `process` span, or one the task
opened itself), so a log line leads straight to its span.

The standard `logging` module: records of millpond's own loggers (`millpond.*`, which the broker
plugins use) always go through the same processors and renderer, so the output is one format.
When the root logger has no handlers, it gets the same handler too, so
`logging.getLogger(__name__).info(...)` inside a task comes out as one of millpond's lines with
the task's ids; a root logger the application configured is left alone, and `log_stdlib = false`
never touches it.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any, TextIO

import structlog
from opentelemetry import trace
from structlog.contextvars import bind_contextvars

from millpond.contracts.hooks import Hooks

if TYPE_CHECKING:
    from millpond.contracts.pool import Job

HANDLER_NAME = "millpond"


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) in hex of the current span, whoever traces, or None outside one."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


class LogContextHooks(Hooks):
    """Runs after the tracing hook (`order`), so the task's `process` span is current."""

    order = 20

    def enter_task(self, job: Job) -> None:
        bind_contextvars(task_id=job.task_id, task_name=job.task_name, retries=job.retries)
        ids = current_ids()
        if ids is not None:
            bind_contextvars(trace_id=ids[0], span_id=ids[1])


def use_json(fmt: str, stream: TextIO) -> bool:
    """`json`, `console`, or `auto`: JSON unless the stream is a terminal."""
    return fmt == "json" or (fmt != "console" and not stream.isatty())


def add_trace_ids(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> Any:
    ids = current_ids()
    if ids is not None:
        event["trace_id"], event["span_id"] = ids
    return event


class _NamedWriteLogger(structlog.WriteLogger):
    """structlog's fast writer, keeping the name it was asked for (`logger` in each line)."""

    def __init__(self, file: TextIO, name: object = "") -> None:
        super().__init__(file)
        self.name = str(name)


def configure(
    level: str = "INFO", fmt: str = "auto", *, stdlib: bool = True, stream: TextIO | None = None
) -> None:
    """Configure structlog and millpond's stdlib handler for this process (again replaces it).

    `stdlib`: give the root logger that handler too, if it has no handlers of its own.
    """
    stream = stream or sys.stderr
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        add_trace_ids,
        structlog.stdlib.add_logger_name,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if use_json(fmt, stream):
        shared.append(structlog.processors.dict_tracebacks)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=functools.partial(_NamedWriteLogger, stream),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    ours, root = logging.getLogger("millpond"), logging.getLogger()
    for logger in (ours, root):  # configuring again replaces millpond's handler, never stacks it
        logger.handlers = [h for h in logger.handlers if h.get_name() != HANDLER_NAME]
    ours.setLevel(numeric)
    if stdlib and not root.handlers:
        root.addHandler(handler)
        root.setLevel(numeric)
        ours.propagate = True  # the root handler writes millpond's records too, once
    else:
        ours.addHandler(handler)
        ours.propagate = False  # the root logger (and whatever the app did to it) is untouched
