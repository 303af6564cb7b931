"""Tasks: functions registered under a name, options checked at declaration (a typo fails at
import, not at 3 a.m. in production; `apply_async` refuses unknown keywords). `Task[P, R]` keeps
the function's parameters (a `ParamSpec`) and return type, so `add.delay("a", [1])` fails mypy.
"""

from __future__ import annotations

import contextvars
import functools
import math
import random
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    Generic,
    NoReturn,
    ParamSpec,
    Protocol,
    TypedDict,
    TypeVar,
    Unpack,
    cast,
    overload,
)

from millpond.exceptions import ConfigurationError, MaxRetriesExceededError, Retry
from millpond.wire.protocol import Job

if TYPE_CHECKING:
    from millpond.produce.app import Millpond
    from millpond.produce.result import AsyncResult
    from millpond_canvas import Signature, chunks, xmap, xstarmap

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
T = TypeVar("T")


def epoch(when: datetime | float | None) -> float | None:
    """Epoch seconds of an eta or expiry given as a datetime or a number (None stays None)."""
    return when.timestamp() if isinstance(when, datetime) else None if when is None else float(when)


@dataclass(slots=True)
class _JobField(Generic[T]):
    """A field of the request's job, read under Celery's name and typed for the checker."""

    name: str

    def __get__(self, request: Request, owner: object = None) -> T:
        return cast(T, getattr(request.job, self.name))


@dataclass(slots=True, frozen=True)
class Request:
    """What a running task knows about its own message (`self.request` in a bound task): its
    job, read in place rather than copied field by field for every task that runs."""

    job: Job
    #: results of the tasks sent from inside this one (filled as it sends them)
    children: list[Any] = field(default_factory=list)

    id = _JobField[str]("task_id")
    task = _JobField[str]("task_name")
    args = _JobField[tuple[Any, ...]]("args")
    kwargs = _JobField[dict[str, Any]]("kwargs")
    retries = _JobField[int]("retries")
    queue = _JobField[str]("queue")
    root_id = _JobField[str | None]("root_id")
    parent_id = _JobField[str | None]("parent_id")
    origin = _JobField[str | None]("origin")
    time_limit = _JobField[float | None]("time_limit")
    soft_time_limit = _JobField[float | None]("soft_time_limit")
    delivery_count = _JobField[int]("delivery_count")
    group = _JobField[str | None]("group_id")
    group_index = _JobField[int | None]("group_index")

    #: the canvas fields of the message (signature dicts), None where it has none
    callbacks = property(lambda self: (self.job.embed or {}).get("callbacks"))
    errbacks = property(lambda self: (self.job.embed or {}).get("errbacks"))
    chain = property(lambda self: (self.job.embed or {}).get("chain"))
    chord = property(lambda self: (self.job.embed or {}).get("chord"))


_current_request = contextvars.ContextVar[Request | None]("millpond_request", default=None)

#: the request of the task running in this context, if any
current_request = _current_request.get


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
    rate_limit: str | float | None = None  # Celery's: "10/s", "10/m", "10/h" or N per second
    rate_limit_scope: str | None = None  # "worker" or "global"; None: the setting of that name


class TaskDecoratorOptions(TypedDict, total=False):
    """The keywords of `@app.task(...)` for the type checker (`TaskOptions` at run time; a test
    keeps the two equal). `bind` changes the function's signature, so the overloads take it."""

    name: str
    queue: str | None
    acks_late: bool | None
    max_retries: int | None
    default_retry_delay: float
    time_limit: float | None
    soft_time_limit: float | None
    autoretry_for: type[BaseException] | tuple[type[BaseException], ...]
    retry_backoff: float | bool
    retry_backoff_max: float
    retry_jitter: bool
    ignore_result: bool | None
    expires: float | None
    reject_on_worker_lost: bool
    max_deliveries: int | None
    priority: int | None
    rate_limit: str | float | None
    rate_limit_scope: str | None


class SendOptions(TypedDict, total=False):
    """The options of `apply_async` and `send_task`: a TypedDict, so an option left out stays out
    (only then does the task's default apply; an explicit `None` overrides it, but for `expires`).
    `countdown` (seconds) or `eta` (datetime, epoch seconds) delay the task in the broker;
    `expires` (datetime, epoch seconds, or seconds from now below a year) drops it if a worker
    gets it too late. `link`/`link_error`: signatures sent on success or failure; the canvas sets
    the rest. `reply_to`: where an rpc:// backend replies (default: this process's; `""`: none)."""

    queue: str | None
    countdown: float | None
    eta: datetime | float | None
    expires: datetime | float | None
    headers: Mapping[str, Any] | None
    task_id: str | None
    time_limit: float | None
    soft_time_limit: float | None
    ignore_result: bool | None
    priority: int | None
    retries: int
    link: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None
    link_error: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None
    chain: Sequence[Mapping[str, Any]] | None
    chord: Mapping[str, Any] | None
    group_id: str | None
    group_index: int | None
    root_id: str | None
    parent_id: str | None
    reply_to: str | None


TASK_OPTIONS = frozenset(TaskOptions.__dataclass_fields__)
SEND_OPTIONS = frozenset(SendOptions.__annotations__)


def reject_unknown(given: Iterable[str], valid: frozenset[str], what: str, where: str) -> None:
    if unknown := sorted(set(given) - valid):
        raise TypeError(
            f"unknown {what} {', '.join(unknown)} {where}; valid options: {', '.join(sorted(valid))}"
        )


#: where a task's limit is kept: in each worker (Celery's meaning) or one bucket for the fleet
RATE_LIMIT_SCOPES = ("worker", "global")
#: seconds per unit of a Celery rate string
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


class InvalidRateLimit(ConfigurationError, ValueError):
    """A rate limit that is not Celery's `N`, `N/s`, `N/m` or `N/h`."""


def parse_rate(value: str | float | None) -> float | None:
    """Tokens per second for Celery's `rate_limit` (`"10/m"` -> 0.1667), None for no limit (`None`,
    `""`, `0`). Checked when a task is declared or a limit is changed, so a typo fails at import or
    in the control command's reply, not in the worker loop."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidRateLimit(
            f"rate limit {value!r} is not a rate: use 'N/s', 'N/m', 'N/h' or a number per second"
        )
    amount, _, unit = str(value).partition("/")  # a number: per second
    unit = unit.strip().lower() or "s"
    if unit not in _UNITS:
        raise InvalidRateLimit(
            f"rate limit {value!r} has the unit {unit!r}: use s, m or h ('10/m')"
        )
    try:
        per_second = float(amount) / _UNITS[unit]
    except ValueError:
        raise InvalidRateLimit(
            f"rate limit {value!r} does not start with a number: use 'N/s', 'N/m' or 'N/h'"
        ) from None
    if not math.isfinite(per_second):
        raise InvalidRateLimit(f"rate limit {value!r} is not a finite number")
    if per_second < 0:
        raise InvalidRateLimit(f"rate limit {value!r} is negative; use 0 or None for no limit")
    return per_second or None


def make_options(fn: Callable[..., Any], options: Mapping[str, Any]) -> TaskOptions:
    reject_unknown(options, TASK_OPTIONS, "task option(s)", f"on {fn.__qualname__}")
    opts = {"name": f"{fn.__module__}.{fn.__qualname__}", **options}
    for key in ("time_limit", "soft_time_limit", "expires", "default_retry_delay"):
        value = opts.get(key)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if value is not None and not (number and 0 <= value < math.inf):
            raise TypeError(f"task option {key!r} must be a finite number >= 0, got {value!r}")
    autoretry = opts.get("autoretry_for", ())
    opts["autoretry_for"] = (autoretry,) if isinstance(autoretry, type) else tuple(autoretry)
    if not all(isinstance(t, type) and issubclass(t, BaseException) for t in opts["autoretry_for"]):
        raise TypeError("task option 'autoretry_for' must be a tuple of exception classes")
    try:
        parse_rate(opts.get("rate_limit"))
    except InvalidRateLimit as exc:
        raise TypeError(f"task option 'rate_limit' of {fn.__qualname__}: {exc}") from None
    if (scope := opts.get("rate_limit_scope")) not in (None, *RATE_LIMIT_SCOPES):
        raise TypeError(
            f"task option 'rate_limit_scope' must be one of {', '.join(RATE_LIMIT_SCOPES)} "
            f"or None (the rate_limit_scope setting), got {scope!r}"
        )
    cap = opts.get("max_deliveries")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise TypeError(
            "task option 'max_deliveries' must be an integer >= 1 or None (the setting), "
            f"got {cap!r}"
        )
    max_retries = opts.get("max_retries")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int | None):
        raise TypeError("task option 'max_retries' must be an integer or None (unlimited)")
    return TaskOptions(**opts)


_Args = Sequence[Any] | None
_Kwargs = Mapping[str, Any] | None


class Task(Generic[P, R_co]):
    """A registered task: calling it runs the function here, `delay` sends it to a worker. `P` is
    the function's parameters (without the task itself for `bind=True`), `R` what calling it
    returns; covariant, so a `Task[[int], bool]` passes where a `Task[[int], object]` is wanted."""

    def __init__(self, app: Millpond, fn: Callable[..., R_co], options: TaskOptions) -> None:
        functools.update_wrapper(self, fn)  # its name, docstring, module, `__wrapped__`
        self.app = app
        self.fn = fn
        self.options = options
        self.name = options.name

    def __repr__(self) -> str:
        return f"<task {self.name}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co:
        return self.fn(self, *args, **kwargs) if self.options.bind else self.fn(*args, **kwargs)

    # -- sending ---------------------------------------------------------------------------------
    # The overloads differ only in the result: an async def task's `R` is a coroutine, the worker
    # stores its awaited value (mypy takes the first overload that matches). Only `delay` checks
    # the arguments against `P`: a ParamSpec exists only as a function's `*args`/`**kwargs`.
    @overload
    def delay(
        self: Task[P, Coroutine[Any, Any, T]], *args: P.args, **kwargs: P.kwargs
    ) -> AsyncResult[T]: ...

    @overload
    def delay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult[R_co]: ...

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult[Any]:
        """Send the task with these arguments, with its default options."""
        return self.apply_async(args, kwargs)

    @overload
    def apply_async(
        self: Task[P, Coroutine[Any, Any, T]], args: _Args = None, kwargs: _Kwargs = None,
        **options: Unpack[SendOptions],
    ) -> AsyncResult[T]: ...  # fmt: skip

    @overload
    def apply_async(
        self, args: _Args = None, kwargs: _Kwargs = None, **options: Unpack[SendOptions]
    ) -> AsyncResult[R_co]: ...

    def apply_async(
        self, args: _Args = None, kwargs: _Kwargs = None, **options: Unpack[SendOptions]
    ) -> AsyncResult[Any]:
        """Send the task (`SendOptions`); the task's own options apply where the call has none."""
        opts = self.options
        sent: SendOptions = {
            "queue": opts.queue,
            "time_limit": opts.time_limit,
            "soft_time_limit": opts.soft_time_limit,
            "ignore_result": opts.ignore_result,
            "priority": opts.priority,
            **options,
        }
        if sent.get("expires") is None and opts.expires is not None:
            sent["expires"] = opts.expires
        return self.app.send_task(self.name, args or (), kwargs or {}, **sent)

    # -- canvas ----------------------------------------------------------------------------------
    # Made by the app's canvas plugin (millpond.contracts.canvas). A signature is sent later, often
    # with a result prepended to its arguments, so they cannot be checked against `P`.
    def s(self, *args: Any, **kwargs: Any) -> Signature[R_co]:
        """A signature of this task with these (partial) arguments: `add.s(2) | add.s(3)`."""
        return cast("Signature[R_co]", self.app.canvas.signature(self, args, kwargs))

    def si(self, *args: Any, **kwargs: Any) -> Signature[R_co]:
        """An immutable signature: a parent's result is not prepended to its arguments."""
        sig = self.app.canvas.signature(self, args, kwargs, immutable=True)
        return cast("Signature[R_co]", sig)

    def signature(
        self, args: Sequence[Any] = (), kwargs: _Kwargs = None, **options: Unpack[SendOptions]
    ) -> Signature[R_co]:
        """A signature with options: `add.signature((2, 2), countdown=10)`."""
        return cast("Signature[R_co]", self.app.canvas.signature(self, args, kwargs, dict(options)))

    def map(self, it: Iterable[Any]) -> xmap:
        """One task message that calls this task on each item (`celery.map`)."""
        return cast("xmap", self.app.canvas.map(self, it, star=False))

    def starmap(self, it: Iterable[Sequence[Any]]) -> xstarmap:
        """One task message that calls this task with each item's arguments (`celery.starmap`)."""
        return cast("xstarmap", self.app.canvas.map(self, it, star=True))

    def chunks(self, it: Iterable[Sequence[Any]], n: int) -> chunks:
        """The items in chunks of `n`, one `celery.starmap` task per chunk, as a group."""
        return cast("chunks", self.app.canvas.chunks(self, it, n))

    # -- inside a running task -------------------------------------------------------------------
    @property
    def request(self) -> Request:
        if (req := _current_request.get()) is None:
            raise RuntimeError(f"{self.name}.request is only available while the task runs")
        return req

    def retry(
        self,
        exc: BaseException | None = None,
        countdown: float | None = None,
        eta: datetime | float | None = None,
        max_retries: int | None = None,
    ) -> NoReturn:
        """Run this task again later: raises `Retry` (so `raise self.retry()` reads well); past its
        budget, `exc` (or `MaxRetriesExceededError`), as Celery's: the task may catch it, or fail."""
        limit = self.options.max_retries if max_retries is None else max_retries
        if (req := _current_request.get()) and limit is not None and req.retries >= limit:
            raise exc or MaxRetriesExceededError(f"{self.name}[{req.id}] spent its {limit} retries")
        raise Retry(exc=exc, countdown=countdown, eta=epoch(eta), max_retries=max_retries)

    def backoff(self, retries: int) -> float:
        """Seconds to wait before retry number `retries + 1` under `autoretry_for`."""
        opts = self.options
        if opts.retry_backoff is False:
            return opts.default_retry_delay
        delay: float = min(opts.retry_backoff_max, float(opts.retry_backoff) * 2**retries)
        return random.uniform(0, delay) if opts.retry_jitter else delay  # full jitter: no herd


class BoundTaskDecorator(Protocol):
    """What `@app.task(bind=True, ...)` returns: the first parameter is matched as `Task[P, Any]`
    (as `Task[P, R]`, a `self: Task[Any, Any]` annotation would give mypy `R`). A Protocol, not a
    `Callable`: untyped options give an untyped decorator (a strict error), not an unbound task."""

    def __call__(self, fn: Callable[Concatenate[Task[P, Any], P], R], /) -> Task[P, R]: ...
