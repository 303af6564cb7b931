"""structlog set-up: JSON lines in production, readable lines on a terminal, context per task.

millpond logs through structlog's own writer on stderr. Every line logged while a task runs
carries `task_id`, `task_name` and `retries`, and `trace_id`/`span_id` when tracing: the execution
unit binds them in the task's own context, and `add_trace_ids` takes the ids of whatever span is
current (a span the task opened itself included), so a log line leads straight to its span.

The standard `logging` module: records of millpond's own loggers (`millpond.*`, which the broker
plugins use) always go through the same processors and renderer, so a worker's output is one
format. The root logger is left alone unless the `log_stdlib` setting asks for it; then the root
logger gets the same handler, and user code logging with `logging.getLogger(__name__)` inside a
task gets the task's context and the trace ids too.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from millpond import telemetry

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
    """Put the current span's trace and span ids on the line (only when tracing: one flag read)."""
    if telemetry.TRACING:
        ids = telemetry.current_ids()
        if ids is not None:
            event["trace_id"], event["span_id"] = ids
    return event


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
    level: str = "INFO", fmt: str = "auto", *, stdlib: bool = False, stream: TextIO | None = None
) -> None:
    """Configure structlog for this process (the worker calls it once at start-up)."""
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
    _route_stdlib(numeric, shared, renderer, stream, root=stdlib)


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
