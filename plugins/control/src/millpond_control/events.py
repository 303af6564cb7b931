"""Celery's monitoring events for millpond's jobs and workers: the dicts, their fields, their names.

What Flower, `celery events` and any `celery.events.EventReceiver` read is a JSON dict per event on
the `celeryev` exchange (topic on AMQP, fanout on Redis), routed by its type with `-` turned into
`.` (`task-succeeded` -> `task.succeeded`), or a JSON list of task events routed `task.multi` (how
Celery's own workers batch them). Every event has `type`, `timestamp`, and the sender's
`hostname`, `utcoffset`, `pid` and Lamport `clock`; the emitter fills in the last four when it
sends (`stamp`). The functions here build each event's dict once, in its final key order, so the
hot path does as little as it can; they never raise for odd values (an unrepresentable result
becomes a note, not an error).

Field by field they follow Celery 5's worker: `task-received` carries the producer's `argsrepr` /
`kwargsrepr` (Celery's `args` / `kwargs`), `eta` and `expires` as ISO 8601 text; `task-succeeded`
the result's repr (cut at 1024 characters) and `runtime` in seconds; `task-failed` and
`task-retried` the exception's repr and traceback text.
"""

from __future__ import annotations

import math
import os
import platform
import reprlib
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from millpond.states import TaskState

if TYPE_CHECKING:
    from millpond.contracts.pool import Job, Outcome

#: Celery's event exchange
EXCHANGE = "celeryev"
#: what a worker calls its software in `sw_ident` (Celery's workers say `py-celery`)
SW_IDENT = "millpond"
#: the longest result repr sent (Celery's `resultrepr_maxsize`)
RESULT_REPR_MAX = 1024

#: one event before it is sent: its final dict, in the order Celery's dispatcher builds it, with
#: the sender's fields (`hostname`, `utcoffset`, `pid`, `clock`) still None until `stamp`
Pending = dict[str, Any]

_repr = reprlib.Repr()
_repr.maxlevel = 6
_repr.maxlist = _repr.maxtuple = _repr.maxset = _repr.maxfrozenset = _repr.maxdeque = 100
_repr.maxdict = 50
_repr.maxstring = _repr.maxother = _repr.maxlong = RESULT_REPR_MAX


def routing_key(event_type: str) -> str:
    """The routing key of an event: its type with `-` as `.` (`worker-heartbeat` -> `worker.heartbeat`)."""
    return event_type.replace("-", ".")


def group_of(event_type: str) -> str:
    """The group an event belongs to (`task`, `worker`), as Celery names it."""
    return event_type.split("-", 1)[0]


def utcoffset() -> float:
    """This machine's offset to UTC in hours, as Celery computes it (seconds *west* of UTC, so
    positive in the Americas): receivers shift `timestamp` by the difference to their own."""
    if time.localtime().tm_isdst:
        return time.altzone / 3600
    return time.timezone / 3600


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded up to two places (Celery's `loadavg`)."""
    try:
        averages = os.getloadavg()
    except (AttributeError, OSError):  # Windows, or a sandbox without /proc/loadavg
        return [0.0, 0.0, 0.0]
    return [math.ceil(value * 100) / 100 for value in averages]


def software_info(version: str) -> dict[str, str]:
    """`sw_ident`, `sw_ver`, `sw_sys`: what Flower shows as the worker's software."""
    return {"sw_ident": SW_IDENT, "sw_ver": version, "sw_sys": platform.system()}


def stamp(event: Pending, hostname: str, offset: float, pid: int, clock: int) -> Pending:
    """Fill in the sender's fields, in place (the event is not used after it is sent)."""
    event["hostname"] = hostname
    event["utcoffset"] = offset
    event["pid"] = pid
    event["clock"] = clock
    return event


def _event(event_type: str, fields: dict[str, Any], timestamp: float | None = None) -> Pending:
    event: Pending = {"hostname": None, "utcoffset": None, "pid": None, "clock": None}
    event.update(fields)
    event["timestamp"] = time.time() if timestamp is None else timestamp
    event["type"] = event_type
    return event


# -- task events ------------------------------------------------------------------------------------


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat()


def short_repr(value: Any, limit: int = RESULT_REPR_MAX) -> str:
    """A repr that stays cheap for huge values and never raises (Celery's `saferepr`)."""
    try:
        text = _repr.repr(value)
    except Exception as exc:
        text = f"<unrepresentable {type(value).__name__}: {type(exc).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def exception_repr(outcome: Outcome) -> str:
    """The exception as Celery's events show it: `ValueError('boom')`."""
    name = outcome.exc_type or "Exception"
    args = ", ".join(short_repr(arg, 256) for arg in outcome.stored_args)
    return f"{name}({args})"


def received(job: Job) -> Pending:
    headers = job.headers
    return {
        "hostname": None,
        "utcoffset": None,
        "pid": None,
        "clock": None,
        "uuid": job.task_id,
        "name": job.task_name,
        "args": headers.get("argsrepr") or short_repr(job.args),
        "kwargs": headers.get("kwargsrepr") or short_repr(job.kwargs),
        "root_id": job.root_id,
        "parent_id": job.parent_id,
        "retries": job.retries,
        "eta": _iso(job.eta),
        "expires": _iso(job.expires),
        "timestamp": time.time(),
        "type": "task-received",
    }


def started(job: Job) -> Pending:
    return {
        "hostname": None,
        "utcoffset": None,
        "pid": None,
        "clock": None,
        "uuid": job.task_id,
        "timestamp": time.time(),
        "type": "task-started",
    }


def finished(job: Job, outcome: Outcome) -> Pending:
    """The event that ends a job: succeeded, failed, retried, rejected or revoked."""
    state = outcome.state
    uuid = job.task_id
    if state is TaskState.SUCCESS:
        return {
            "hostname": None,
            "utcoffset": None,
            "pid": None,
            "clock": None,
            "uuid": uuid,
            "result": short_repr(outcome.result),
            "runtime": outcome.runtime,
            "timestamp": time.time(),
            "type": "task-succeeded",
        }
    if state is TaskState.RETRY:
        return _event(
            "task-retried",
            {
                "uuid": uuid,
                "exception": exception_repr(outcome),
                "traceback": outcome.traceback or "",
            },
        )
    if state is TaskState.REJECTED:
        return _event("task-rejected", {"uuid": uuid, "requeue": outcome.requeue})
    if state is TaskState.REVOKED:
        now = time.time()
        expired = job.expires is not None and now >= job.expires
        return _event(
            "task-revoked",
            {
                "uuid": uuid,
                "terminated": bool(job.started) and not expired,
                "signum": None,
                "expired": expired,
            },
            now,
        )
    # FAILURE, and the pool's own endings: TIMEOUT (TimeLimitExceeded), LOST (WorkerLostError)
    fields: dict[str, Any] = {
        "uuid": uuid,
        "exception": exception_repr(outcome),
        "traceback": outcome.traceback or "",
    }
    if outcome.runtime:
        fields["runtime"] = outcome.runtime
    return _event("task-failed", fields)


# -- worker events ------------------------------------------------------------------------------------


def worker_event(
    event_type: str, *, freq: float, active: int, processed: int, software: dict[str, str]
) -> Pending:
    """`worker-online`, `worker-heartbeat` or `worker-offline` with what Celery's heart sends."""
    fields: dict[str, Any] = {
        "freq": freq,
        "active": active,
        "processed": processed,
        "loadavg": load_average(),
    }
    fields.update(software)
    return _event(event_type, fields)
