"""structlog set-up: JSON lines in production, readable lines on a terminal, context per task.

millpond logs through structlog's own writer on stderr and never touches the root logger unless the
`log_stdlib` setting asks for it. Every line logged while a task runs carries `task_id`, `task_name`
and `retries` (and `trace_id`/`span_id` when tracing), bound by the execution unit in the task's
own context.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}


def use_json(fmt: str, stream: TextIO) -> bool:
    if fmt == "json":
        return True
    if fmt == "console":
        return False
    isatty = getattr(stream, "isatty", None)
    return not (isatty and isatty())


def configure(level: str = "INFO", fmt: str = "auto", *, stdlib: bool = False,
              stream: TextIO | None = None) -> None:
    """Configure structlog for this process (the worker calls it once at start-up)."""
    stream = stream or sys.stderr
    as_json = use_json(fmt, stream)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if as_json:
        shared += [structlog.processors.dict_tracebacks]
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=bool(getattr(stream, "isatty", lambda: False)()))
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level.upper(), 20)),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
    if stdlib:
        _route_stdlib(level, shared, renderer, stream)


def _route_stdlib(level: str, shared: list[Any], renderer: Any, stream: TextIO) -> None:
    """Send the standard logging module's records through the same processors (opt-in)."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.set_name("millpond")
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if h.get_name() != "millpond"]
    root.addHandler(handler)
    root.setLevel(LEVELS.get(level.upper(), 20))


def get_logger(name: str = "millpond") -> Any:
    return structlog.get_logger(name)
