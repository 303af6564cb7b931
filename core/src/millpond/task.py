"""Tasks: a function registered under a name, with options checked when it is declared.

Options are validated at decoration time (a typo fails at import, not at 3 a.m. in production), and
`apply_async` refuses unknown keywords instead of dropping them.
"""

from __future__ import annotations

import contextvars
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, NoReturn

from millpond.exceptions import Retry

if TYPE_CHECKING:
    from millpond.app import Millpond
    from millpond.result import AsyncResult


@dataclass(slots=True, frozen=True)
class Request:
    """What a running task knows about its own message (`self.request` in a bound task)."""

    id: str
    task: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    retries: int = 0
    queue: str = ""
    root_id: str | None = None
    parent_id: str | None = None
    origin: str | None = None
    time_limit: float | None = None
    soft_time_limit: float | None = None
    delivery_count: int = 1


_current_request: contextvars.ContextVar[Request | None] = contextvars.ContextVar(
    "millpond_request", default=None
)


def current_request() -> Request | None:
    """The request of the task running in this context, if any."""
    return _current_request.get()


@dataclass(slots=True, frozen=True)
class TaskOptions:
    """Every option `@app.task` accepts; anything else is a TypeError at declaration."""

    name: str
    queue: str | None = None
    bind: bool = False
    acks_late: bool | None = None  # None: the acks_late setting decides
    max_retries: int | None = 3
    default_retry_delay: float = 180.0
    time_limit: float | None = None
    soft_time_limit: float | None = None
    autoretry_for: tuple[type[BaseException], ...] = ()
    retry_backoff: float | bool = True  # True: 1 s base; a number: that base
    retry_backoff_max: float = 600.0
    retry_jitter: bool = True
    ignore_result: bool | None = None
    expires: float | None = None  # seconds after sending
    reject_on_worker_lost: bool = True
    max_deliveries: int | None = None  # None: the max_deliveries setting decides
    priority: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


TASK_OPTIONS = frozenset(TaskOptions.__dataclass_fields__) - {"extra"}
SEND_OPTIONS = frozenset(
    {
        "queue",
        "countdown",
        "eta",
        "expires",
        "headers",
        "task_id",
        "time_limit",
        "soft_time_limit",
        "ignore_result",
        "priority",
        "retries",
    }
)


def _check_number(name: str, value: Any, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise TypeError(f"task option {name!r} must be a non-negative number, got {value!r}")


def make_options(fn: Callable[..., Any], options: Mapping[str, Any]) -> TaskOptions:
    unknown = set(options) - TASK_OPTIONS
    if unknown:
        raise TypeError(
            f"unknown task option(s) {', '.join(sorted(unknown))} on {fn.__qualname__}; "
            f"valid options: {', '.join(sorted(TASK_OPTIONS))}"
        )
    opts = dict(options)
    opts.setdefault("name", f"{fn.__module__}.{fn.__qualname__}")
    for key in ("time_limit", "soft_time_limit", "expires", "default_retry_delay"):
        _check_number(key, opts.get(key))
    autoretry = opts.get("autoretry_for", ())
    if isinstance(autoretry, type):
        autoretry = (autoretry,)
    if not all(isinstance(t, type) and issubclass(t, BaseException) for t in autoretry):
        raise TypeError("task option 'autoretry_for' must be a tuple of exception classes")
    opts["autoretry_for"] = tuple(autoretry)
    max_retries = opts.get("max_retries", 3)
    if max_retries is not None and (
        isinstance(max_retries, bool) or not isinstance(max_retries, int)
    ):
        raise TypeError("task option 'max_retries' must be an integer or None (unlimited)")
    return TaskOptions(**opts)


class Task:
    """A registered task. Calling it runs the function here; `delay` sends it to a worker."""

    def __init__(self, app: Millpond, fn: Callable[..., Any], options: TaskOptions) -> None:
        self.app = app
        self.fn = fn
        self.options = options
        self.name = options.name
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", options.name)
        self.__module__ = fn.__module__
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<task {self.name}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.options.bind:
            return self.fn(self, *args, **kwargs)
        return self.fn(*args, **kwargs)

    # -- sending ---------------------------------------------------------------------------------
    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        """Send the task with these arguments, with its default options."""
        return self.apply_async(args, kwargs)

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult:
        """Send the task; options: queue, countdown, eta, expires, headers, task_id, time_limit,
        soft_time_limit, ignore_result, priority."""
        unknown = set(options) - SEND_OPTIONS
        if unknown:
            raise TypeError(
                f"unknown option(s) {', '.join(sorted(unknown))} for {self.name}.apply_async; "
                f"valid options: {', '.join(sorted(SEND_OPTIONS))}"
            )
        opts = self.options
        options.setdefault("queue", opts.queue)
        options.setdefault("time_limit", opts.time_limit)
        options.setdefault("soft_time_limit", opts.soft_time_limit)
        options.setdefault("ignore_result", opts.ignore_result)
        options.setdefault("priority", opts.priority)
        if options.get("expires") is None and opts.expires is not None:
            options["expires"] = opts.expires
        return self.app.send_task(self.name, args or (), kwargs or {}, **options)

    # -- inside a running task -------------------------------------------------------------------
    @property
    def request(self) -> Request:
        req = _current_request.get()
        if req is None:
            raise RuntimeError(f"{self.name}.request is only available while the task runs")
        return req

    def retry(
        self,
        exc: BaseException | None = None,
        countdown: float | None = None,
        eta: datetime | float | None = None,
        max_retries: int | None = None,
    ) -> NoReturn:
        """Ask for this task to run again later; raises `Retry` (so `raise self.retry()` reads well).

        When the retry budget is spent, the original `exc` is raised instead (or
        `MaxRetriesExceededError` when there is none), and the task fails.
        """
        eta_ts = eta.timestamp() if isinstance(eta, datetime) else eta
        raise Retry(exc=exc, countdown=countdown, eta=eta_ts, max_retries=max_retries)

    def backoff(self, retries: int) -> float:
        """Seconds to wait before retry number `retries + 1` under `autoretry_for`."""
        opts = self.options
        if opts.retry_backoff is False:
            return opts.default_retry_delay
        base = 1.0 if opts.retry_backoff is True else float(opts.retry_backoff)
        delay: float = min(opts.retry_backoff_max, base * (2**retries))
        if opts.retry_jitter:
            delay = random.uniform(0, delay)  # full jitter spreads a thundering herd
        return delay
