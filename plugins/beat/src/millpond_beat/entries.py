"""Entries: what to publish and when, built and checked from code and from settings.

An entry comes from `app.add_periodic_task(...)` / `@app.periodic_task(...)` (code) or from the
`[beat] schedule` table (settings, in Celery's `beat_schedule` shape); a settings entry replaces a
code entry of the same name. Everything is checked when the scheduler starts (and when the
settings file changes): a bad crontab, an unknown task, a bad time zone or an option millpond would
not honour fails with the entry's name, instead of surfacing at 3 a.m. as a tick that never came.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta, tzinfo
from typing import TYPE_CHECKING, Any

from millpond.exceptions import ConfigurationError
from millpond_beat.schedules import Schedule, ScheduleError, at, parse, zone
from millpond_beat.settings import CATCH_UP

if TYPE_CHECKING:
    from millpond.produce.app import Millpond

#: options of a tick's message that `Millpond.send_task` takes as they are
SEND_OPTIONS = frozenset(
    {"queue", "priority", "time_limit", "soft_time_limit", "ignore_result", "headers", "countdown"}
)
#: Celery options that mean nothing on millpond's wire, with what to do instead
_OPTION_HINTS = {
    "eta": "a tick's time is its schedule: use countdown for a fixed delay after it",
    "link": "chain the work inside the task, or schedule a task that starts a canvas",
    "link_error": "handle failures inside the task",
}
#: Celery's routing options, read as the queue they route to (see `_route`)
_ROUTING = frozenset({"routing_key", "exchange"})
#: the keys an entry (code or settings) may have
_ENTRY_KEYS = frozenset(
    {
        "task",
        "schedule",
        "args",
        "kwargs",
        "options",
        "queue",
        "expires",
        "timezone",
        "catch_up",
        "enabled",
        "relative",
        "at",
    }
)


@dataclass(frozen=True, slots=True)
class Entry:
    """One periodic entry, checked: the scheduler publishes `task(*args, **kwargs)` at each tick."""

    name: str
    task: str
    schedule: Schedule
    tz: tzinfo
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    #: seconds after a tick is sent after which a worker drops the message (Celery's `expires`)
    expires: float | None = None
    catch_up: str = "run_once"
    #: send_task options: queue, priority, time limits, headers, ...
    options: Mapping[str, Any] = field(default_factory=dict)
    #: "code" or "settings"
    source: str = "code"

    @property
    def zone_name(self) -> str:
        return str(getattr(self.tz, "key", None) or self.tz)

    def next_after(self, t: float) -> float | None:
        return self.schedule.next_after(t, self.tz)

    def fingerprint(self) -> str:
        """Changes when anything that decides the ticks or the message changes."""
        text = json.dumps(
            [
                self.task,
                self.schedule.describe(),
                self.zone_name,
                list(self.args),
                dict(self.kwargs),
                self.expires,
                self.catch_up,
                dict(self.options),
            ],
            sort_keys=True,
            default=repr,
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def declared(app: Millpond) -> dict[str, dict[str, Any]]:
    """The entries declared in code (`app.add_periodic_task`), by name, in the settings' shape.

    `sig` is a signature (`add.s(2, 3)`), a task or a task name; the call's `args`/`kwargs` are
    partial arguments, as Celery's `sig.clone(args, kwargs)` takes them: the args go before the
    signature's, the kwargs are merged over its, and an immutable signature (`add.si(...)`)
    keeps its own. An entry's name defaults to the call's repr, as Celery names it; a second
    declaration under one name replaces the first.
    """
    entries: dict[str, dict[str, Any]] = {}
    for call in app.periodic_tasks:
        sig, args, kwargs, name = call["sig"], call["args"], call["kwargs"], call["name"]
        if not isinstance(sig, Mapping):
            sig = {"task": sig if isinstance(sig, str) else sig.name}
        task = str(sig["task"])
        own_args, own_kwargs = tuple(sig.get("args") or ()), dict(sig.get("kwargs") or {})
        if sig.get("immutable"):
            args, kwargs = own_args, own_kwargs
        else:
            args, kwargs = (*(args or ()), *own_args), {**own_kwargs, **(kwargs or {})}
        if name is None:
            shown = [*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())]
            name = f"{task}({', '.join(shown)})"
        spec = {"task": task, "schedule": call["schedule"], "args": args, "kwargs": kwargs}
        entries[name] = {**spec, **(sig.get("options") or {}), **call["options"]}
    return entries


def build(
    app: Millpond,
    table: Mapping[str, Any],
    *,
    timezone: str = "UTC",
    catch_up: str = "run_once",
    check_tasks: bool = True,
    extra: Mapping[str, Any] | None = None,
    extra_label: str = "source",
) -> dict[str, Entry]:
    """Every entry of the app (code), of the settings' `schedule` table and of `extra` (a
    schedule source's table, its entries named `extra_label` in errors), checked; raises a
    ConfigurationError naming the first entry that is wrong and what is wrong with it."""
    try:
        default_tz = zone(timezone)
    except ScheduleError as exc:
        raise ConfigurationError(f"setting 'beat.timezone': {exc}") from None
    raw: dict[str, tuple[dict[str, Any], str]] = {}
    for name, spec in declared(app).items():
        raw[name] = (spec, "code")
    for name, spec in table.items():
        if not isinstance(spec, Mapping):
            raise ConfigurationError(
                f"beat schedule entry {name!r} is not a table: give task = ..., schedule = ..."
            )
        raw[str(name)] = (dict(spec), "settings")
    for name, spec in (extra or {}).items():
        if str(name) in raw:
            raise ConfigurationError(
                f"beat schedule entry {name!r} ({extra_label}) has the name of an entry in "
                f"{raw[str(name)][1]}; rename one of them"
            )
        if not isinstance(spec, Mapping):
            raise ConfigurationError(f"beat schedule entry {name!r} ({extra_label}) is not a table")
        raw[str(name)] = (dict(spec), extra_label)
    entries: dict[str, Entry] = {}
    for name, (spec, source) in raw.items():
        if name.startswith("@") or not name.strip():
            raise ConfigurationError(
                f"beat schedule entry {name!r} ({source}): an entry name must not be empty or "
                "start with '@'"
            )
        try:
            entry = _entry(name, spec, source, default_tz, catch_up)
        except (ScheduleError, ValueError, TypeError) as exc:
            raise ConfigurationError(f"beat schedule entry {name!r} ({source}): {exc}") from None
        if entry is None:
            continue
        if check_tasks and entry.task not in app.tasks:
            raise ConfigurationError(
                f"beat schedule entry {name!r} ({source}) names the task {entry.task!r}, which "
                f"the app {app.name!r} does not register; fix the name, import the module that "
                "defines it, or set beat.check_tasks = false if only other code defines it"
            )
        entries[name] = entry
    return entries


def check_entry(name: str, spec: Mapping[str, Any], timezone: str = "UTC") -> None:
    """Raise a ValueError saying what is wrong with one entry in Celery's beat_schedule shape
    (what an admin form checks before it saves a row beat would refuse)."""
    try:
        _entry(name, dict(spec), "check", zone(timezone), "run_once")
    except (ScheduleError, ValueError, TypeError) as exc:
        raise ValueError(str(exc)) from None


def _entry(
    name: str, spec: dict[str, Any], source: str, default_tz: tzinfo, default_catch_up: str
) -> Entry | None:
    spec = {str(k).lower(): v for k, v in spec.items()}
    unknown = sorted(set(spec) - _ENTRY_KEYS - SEND_OPTIONS - set(_OPTION_HINTS) - _ROUTING)
    if unknown:
        raise ValueError(
            f"unknown key {unknown[0]!r}; an entry has {', '.join(sorted(_ENTRY_KEYS))}"
        )
    if not _flag(spec.get("enabled", True), "enabled"):
        return None
    task = spec.get("task")
    if not isinstance(task, str) or not task:
        raise ValueError("no task: give task = 'module.task_name'")
    if spec.get("relative"):
        raise ValueError(
            "relative = true is not supported: intervals tick at whole multiples of their period "
            "so that every replica agrees on each tick; remove it"
        )
    if "at" in spec and "schedule" in spec:
        raise ValueError("give either schedule or at, not both")
    if "at" in spec:
        schedule: Schedule = parse({"at": spec["at"]})
    elif "schedule" in spec:
        schedule = parse(spec["schedule"])
    else:
        raise ValueError("no schedule: give schedule = seconds, a crontab string, or at = TIME")
    options = dict(spec.get("options") or {})
    if not isinstance(spec.get("options") or {}, Mapping):
        raise ValueError("options must be a table")
    tz = zone(spec.get("timezone", options.pop("timezone", None)) or default_tz)
    if isinstance(schedule, at) and not isinstance(schedule.when, int | float):
        schedule = at(schedule.instant(tz))
    args = spec.get("args") or ()
    if isinstance(args, str | bytes) or not isinstance(args, list | tuple):
        raise ValueError(f"args must be a list, got {args!r}")
    kwargs = spec.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"kwargs must be a table, got {kwargs!r}")
    for key in ("expires", *SEND_OPTIONS):  # given beside the entry's own keys, in code
        if key in spec:
            options[key] = spec[key]
    expires = options.pop("expires", None)
    if isinstance(expires, timedelta):
        expires = expires.total_seconds()
    if expires is not None and (
        isinstance(expires, bool) or not isinstance(expires, int | float) or expires <= 0
    ):
        raise ValueError(f"expires must be a number of seconds, got {expires!r}")
    for key in (*_OPTION_HINTS, *_ROUTING):
        if key in spec:
            options[key] = spec[key]
    _route(name, options)
    for key in list(options):
        if key in _OPTION_HINTS:
            raise ValueError(f"option {key!r} is not supported: {_OPTION_HINTS[key]}")
        if key not in SEND_OPTIONS:
            raise ValueError(
                f"unknown option {key!r}; a tick's options are {', '.join(sorted(SEND_OPTIONS))}"
            )
        _check_option(key, options[key])
    try:
        json.dumps([list(args), dict(kwargs), options.get("headers") or {}])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"args, kwargs and headers must be JSON values ({exc})") from None
    catch_up = str(spec.get("catch_up", default_catch_up)).lower()
    if catch_up not in CATCH_UP:
        raise ValueError(f"catch_up must be one of {', '.join(CATCH_UP)}, got {catch_up!r}")
    return Entry(
        name=name,
        task=task,
        schedule=schedule,
        tz=tz,
        args=tuple(args),
        kwargs=dict(kwargs),
        expires=float(expires) if expires is not None else None,
        catch_up=catch_up,
        options=options,
        source=source,
    )


def _check_option(key: str, value: Any) -> None:
    """An option's value, checked when the entry is built: a bad one would otherwise fail only
    when a tick is sent (a bad `headers`, failing the whole round, held up later entries)."""
    if value is None:
        return  # Celery's "not given": the task's or app's default
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if key == "headers" and not isinstance(value, Mapping):
        raise ValueError(f"headers must be a table of header names to values, got {value!r}")
    if key == "queue" and not isinstance(value, str):  # "" is the task's own, as before
        raise ValueError(f"queue must be a queue name, got {value!r}")
    if key == "priority" and not (isinstance(value, int) and number and 0 <= value <= 255):
        raise ValueError(f"priority must be a whole number from 0 to 255, got {value!r}")
    if key in ("countdown", "time_limit", "soft_time_limit") and not (
        number and math.isfinite(value) and value >= 0
    ):
        raise ValueError(f"{key} must be a number of seconds, 0 or more, got {value!r}")
    if key == "ignore_result" and not isinstance(value, bool):
        raise ValueError(f"ignore_result must be true or false, got {value!r}")


def _route(name: str, options: dict[str, Any]) -> None:
    """Celery's routing options, as Celery's default direct exchange reads them: a routing key
    names the queue; an exchange is dropped. Both are said in the log, never dropped silently."""
    import structlog

    log = structlog.get_logger("millpond.beat")
    routing_key = options.pop("routing_key", None)
    exchange = options.pop("exchange", None)
    if routing_key is not None and "queue" not in options:
        options["queue"] = str(routing_key)
        log.warning("beat entry's routing_key is read as its queue name (millpond publishes to "
                    "queues)", entry=name, queue=str(routing_key))  # fmt: skip
    elif routing_key is not None:
        log.warning("beat entry's routing_key is ignored: it names a queue", entry=name)
    if exchange is not None:
        log.warning("beat entry's exchange is ignored: millpond publishes to queues (give queue)",
                    entry=name, exchange=str(exchange))  # fmt: skip


def _flag(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
        return value.lower() in ("true", "yes", "on")
    raise ValueError(f"{key} must be true or false, got {value!r}")
