"""The built-in inspect and control commands, answered in the shapes Celery's workers answer.

Flower and `celery inspect` read these replies as they read a Celery worker's, so the shapes are
Celery's: `ping` -> `{"ok": "pong"}`, `stats` with `total`, `pid`, `uptime`, `rusage`, `broker`,
`prefetch_count` and `pool` (`max-concurrency`, `processes`, ...), a request as `{id, name, args,
kwargs, type, hostname, time_start, acknowledged, delivery_info, worker_pid}`. Where millpond
differs it says so in the reply: `scheduled` is empty because delays wait in the broker, never in
a worker's memory; commands a pool cannot carry out answer `{"error": ...}` naming the pool.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import resource
import signal as signal_module
import sys
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from millpond import __version__
from millpond.contracts.backend import ResultMeta
from millpond.contracts.broker import mask_url
from millpond.contracts.pool import Job
from millpond.produce.result import error_info
from millpond.states import TaskState
from millpond_control.events import short_repr
from millpond_control.registry import ControlContext, command, nok, ok, plane
from millpond_control.revoked import Revoked

if TYPE_CHECKING:
    from millpond.consume.worker import Worker

log = logging.getLogger("millpond.control")

#: what `conf` never shows, whatever the key's case, at any depth (Celery's HIDDEN_SETTINGS)
_SECRET_WORDS = ("pass", "secret", "key", "token", "signature")


#: what `registered` lists of each task when not told (Celery's DEFAULT_TASK_INFO_ITEMS)
_TASK_INFO_ITEMS = ("exchange", "routing_key", "rate_limit")


def _ids(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Iterable):
        return [str(v) for v in value]
    return [str(value)]


def _reserved(worker: Worker) -> list[Job]:
    """Jobs waiting for a pool slot or a holder's release (Celery's reserved); any thread."""
    return [job for holder in worker.holders for job in holder.held()] + list(worker.buffer)


def job_info(ctx: ControlContext, job: Job, *, started: bool, safe: bool = False) -> dict[str, Any]:
    """A job as Celery's `Request.info(safe)` shows a request: with `safe` (what Flower asks
    for), the producer's argsrepr/kwargsrepr instead of the arguments, which keeps the secrets a
    producer masked there off the dashboards."""
    time_start = None
    if started and job.started:
        time_start = time.time() - (time.monotonic() - job.started)
    args: Any = list(job.args)
    kwargs: Any = dict(job.kwargs)
    if safe:
        args = job.headers.get("argsrepr") or short_repr(job.args)
        kwargs = job.headers.get("kwargsrepr") or short_repr(job.kwargs)
    return {
        "id": job.task_id,
        "name": job.task_name,
        "args": args,
        "kwargs": kwargs,
        "type": job.task_name,
        "hostname": ctx.hostname,
        "time_start": time_start,
        "acknowledged": job.delivery is None,
        "delivery_info": {
            "exchange": "",
            "routing_key": job.queue,
            "priority": 0,
            "redelivered": job.delivery_count > 1,
        },
        "worker_pid": None,
    }


# -- inspect ---------------------------------------------------------------------------------------


@command(kind="inspect")
def ping(ctx: ControlContext, **_: Any) -> Any:
    """Ping the worker."""
    return ok("pong")


@command(kind="inspect")
def clock(ctx: ControlContext, **_: Any) -> Any:
    """The worker's logical clock."""
    node = plane(ctx.worker).node
    return {"clock": node.clock.value if node is not None else 0}


@command(kind="inspect")
def stats(ctx: ControlContext, **_: Any) -> Any:
    """Statistics of the worker (the shape Flower's worker page reads)."""
    worker = ctx.worker
    usage = resource.getrusage(resource.RUSAGE_SELF)
    pool = worker.pool
    soft = worker.settings.soft_time_limit
    hard = worker.settings.time_limit
    node = plane(worker).node
    return {
        "total": dict(worker.totals),
        "pid": os.getpid(),
        "clock": str(node.clock.value if node is not None else 0),
        "uptime": round(time.time() - worker.started_at),
        "pool": {
            "implementation": f"millpond pool {worker.settings.pool}",
            "max-concurrency": pool.concurrency if pool is not None else worker.concurrency,
            "processes": pool.processes() if pool is not None else [],
            "max-tasks-per-child": None,
            "put-guarded-by-semaphore": False,
            "timeouts": [soft or 0, hard or 0],
        },
        "broker": _broker_info(ctx),
        "prefetch_count": worker.prefetch,
        "rusage": {
            "utime": usage.ru_utime,
            "stime": usage.ru_stime,
            "maxrss": usage.ru_maxrss,
            "ixrss": usage.ru_ixrss,
            "idrss": usage.ru_idrss,
            "isrss": usage.ru_isrss,
            "minflt": usage.ru_minflt,
            "majflt": usage.ru_majflt,
            "nswap": usage.ru_nswap,
            "inblock": usage.ru_inblock,
            "oublock": usage.ru_oublock,
            "msgsnd": usage.ru_msgsnd,
            "msgrcv": usage.ru_msgrcv,
            "nsignals": usage.ru_nsignals,
            "nvcsw": usage.ru_nvcsw,
            "nivcsw": usage.ru_nivcsw,
        },
        "sw_ident": "millpond",
        "sw_ver": __version__,
        "sw_sys": platform.system(),
    }


def _broker_info(ctx: ControlContext) -> dict[str, Any]:
    url = ctx.worker.app.broker_url or ""
    parts = urlsplit(url)
    return {
        "hostname": parts.hostname or "",
        "userid": parts.username,
        "virtual_host": parts.path.lstrip("/") or "/",
        "port": parts.port,
        "insist": False,
        "ssl": parts.scheme in ("rediss", "amqps"),
        "transport": ctx.worker.app.broker.system,
        "connect_timeout": None,
        "transport_options": {},
        "login_method": None,
        "uri_prefix": None,
        "heartbeat": None,
        "failover_strategy": None,
        "alternates": [],
        "url": mask_url(url),
    }


@command(kind="inspect")
def active(ctx: ControlContext, safe: bool = False, **_: Any) -> Any:
    """Tasks running now (with safe: their argsrepr/kwargsrepr, as Celery answers)."""
    pool = ctx.worker.pool
    jobs = pool.active_jobs() if pool is not None else []
    return [job_info(ctx, job, started=True, safe=bool(safe)) for job in jobs]


@command(kind="inspect")
def reserved(ctx: ControlContext, **_: Any) -> Any:
    """Tasks received and waiting for a free slot in the pool (prefetched)."""
    return [job_info(ctx, job, started=False) for job in _reserved(ctx.worker)]


@command(kind="inspect")
def scheduled(ctx: ControlContext, **_: Any) -> Any:
    """Tasks with an eta held by this worker: always none, delays wait in the broker."""
    return []


@command(kind="inspect")
def revoked(ctx: ControlContext, **_: Any) -> Any:
    """Ids of revoked tasks, all of them (a reply over reply_max_bytes is an error saying so)."""
    return plane(ctx.worker).revoked.ids()


@command(kind="inspect", variadic="taskinfoitems")
def registered(
    ctx: ControlContext, taskinfoitems: Any = None, builtins: bool = False, **_: Any
) -> Any:
    """Tasks registered in the worker's app, with the fields asked for (Celery's default:
    exchange, routing_key and rate_limit, where set)."""
    items = [i for i in _ids(taskinfoitems) or _TASK_INFO_ITEMS if not i.startswith("_")]
    out = []
    for name, task in sorted(ctx.worker.app.tasks.items()):
        if not builtins and name.startswith("celery."):
            continue
        fields = []
        for item in items:
            value = getattr(task.options, item, None)
            if value is None:
                value = getattr(task, item, None)
            if value is not None and not callable(value):
                fields.append(f"{item}={value}")
        out.append(f"{name} [{' '.join(fields)}]" if fields else name)
    return out


@command(kind="inspect")
def active_queues(ctx: ControlContext, **_: Any) -> Any:
    """The queues this worker consumes, as Celery describes a kombu Queue."""
    return [
        {
            "name": queue,
            "exchange": {
                "name": queue,
                "type": "direct",
                "arguments": None,
                "durable": True,
                "passive": False,
                "auto_delete": False,
                "delivery_mode": None,
                "no_declare": False,
            },
            "routing_key": queue,
            "queue_arguments": None,
            "binding_arguments": None,
            "consumer_arguments": None,
            "durable": True,
            "exclusive": False,
            "auto_delete": False,
            "no_ack": False,
            "alias": None,
            "bindings": [],
            "no_declare": None,
            "expires": None,
            "message_ttl": None,
            "max_length": None,
            "max_length_bytes": None,
            "max_priority": None,
        }
        for queue in ctx.worker.queues
    ]


@command(kind="inspect", args=(("with_defaults", bool),))
def conf(ctx: ControlContext, with_defaults: bool = False, **_: Any) -> Any:
    """The worker's settings, secrets masked."""
    settings = ctx.worker.settings
    out: dict[str, Any] = {}
    for name in settings.__dataclass_fields__:
        if name in ("sections", "sources", "warnings"):
            continue
        if not with_defaults and settings.sources.get(name, "default") == "default":
            continue
        out[name] = _shown(name, getattr(settings, name))
    for section, values in settings.sections.items():
        for key, value in values.items():
            full = f"{section}.{key}"
            if with_defaults or settings.sources.get(full, "default") != "default":
                out[full] = _shown(key, value)
    return out


def _shown(name: str, value: Any) -> Any:
    if value is None:
        return None
    if any(word in name.lower() for word in _SECRET_WORDS):
        return "********"
    if name.lower().endswith("url") or name == "result_backend":
        return mask_url(str(value))
    if isinstance(value, Mapping):  # kwargs for a client: {"password": ...} inside
        return {str(k): _shown(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_shown(name, item) for item in value]
    if isinstance(value, str | int | float | bool):
        return value
    return repr(value)


@command(kind="inspect", variadic="ids")
def query_task(ctx: ControlContext, ids: Any = None, **_: Any) -> Any:
    """Where these tasks are in this worker: active, reserved (not there: not listed)."""
    wanted = set(_ids(ids))
    out: dict[str, Any] = {}
    pool = ctx.worker.pool
    for job in pool.active_jobs() if pool is not None else []:
        if job.task_id in wanted:
            out[job.task_id] = ["active", job_info(ctx, job, started=True)]
    for job in _reserved(ctx.worker):
        if job.task_id in wanted and job.task_id not in out:
            out[job.task_id] = ["reserved", job_info(ctx, job, started=False)]
    return out


@command(kind="inspect")
def report(ctx: ControlContext, **_: Any) -> Any:
    """A report of the software and settings, for bug reports."""
    worker = ctx.worker
    lines = [
        f"software -> millpond:{__version__} python:{sys.version.split()[0]} "
        f"({platform.python_implementation()})",
        f"platform -> system:{platform.system()} arch:{platform.machine()}",
        f"pool -> {worker.settings.pool} (concurrency {worker.concurrency})",
        f"broker -> {mask_url(worker.app.broker_url)}",
        f"results -> {mask_url(worker.settings.result_backend) or '(kept by the broker)'}",
        f"queues -> {', '.join(worker.queues)}",
    ]
    return ok("\n".join(lines))


@command(kind="inspect", safe=True)
def hello(ctx: ControlContext, from_node: str = "", revoked: Any = None, **_: Any) -> Any:
    """Sync with a starting worker: merge its revoked ids, answer ours (size-capped)."""
    if from_node == ctx.hostname:
        return None
    if isinstance(revoked, dict):
        revoked = list(revoked)
    if isinstance(revoked, list):
        plane(ctx.worker).revoked.merge(revoked)
    node = plane(ctx.worker).node
    return {
        "revoked": plane(ctx.worker).revoked.ids(plane(ctx.worker).settings.hello_revokes_max),
        "clock": node.clock.forward() if node is not None else 0,
    }


# -- control ---------------------------------------------------------------------------------------


def _signum(name: Any) -> int:
    if name is None or name == "":
        return int(signal_module.SIGTERM)
    if isinstance(name, int):
        return name
    text = str(name).upper()
    if text.isdigit():
        return int(text)
    if not text.startswith("SIG"):
        text = "SIG" + text
    found = getattr(signal_module, text, None)
    if not isinstance(found, signal_module.Signals):
        raise ValueError(f"unknown signal {name!r}")
    return int(found)


def _mark_revoked(ctx: ControlContext, task_ids: list[str], running: set[str]) -> None:
    """Store REVOKED (Celery's meta) for tasks not running here whose state is not final, so
    a caller waiting on the result learns at once; as Celery's workers do."""
    backend = ctx.worker.app.backend
    if backend is None or backend.replies_to_caller:
        return
    for task_id in task_ids:
        if task_id in running:
            continue
        try:
            meta = backend.peek(task_id)
            if meta is not None and meta.status not in (
                TaskState.PENDING,
                TaskState.RECEIVED,
                TaskState.RETRY,
                TaskState.REJECTED,
            ):
                continue
            backend.store(
                ResultMeta(
                    task_id=task_id,
                    status=TaskState.REVOKED,
                    result=error_info("TaskRevokedError", "celery.exceptions", ["revoked"]),
                    date_done=datetime.now(UTC).isoformat(),
                    name=meta.name if meta is not None else None,
                )
            )
        except Exception as exc:
            log.warning("could not mark task %s as revoked in the result backend: %s", task_id, exc)


def _terminate(ctx: ControlContext, task_ids: Iterable[str], signal: Any) -> Any:
    worker = ctx.worker
    pool = worker.pool
    running = {job.task_id for job in pool.active_jobs()} if pool is not None else set()
    hit = [t for t in task_ids if t in running]
    if not hit:
        return ok("terminate: tasks unknown")
    if pool is None or not pool.capabilities.terminate_job:
        return nok(
            f"cannot terminate: the {worker.settings.pool} pool cannot stop a running task (the "
            f"prefork pool can); {', '.join(hit)} flagged as revoked, but will run to the end"
        )
    signum = _signum(signal)
    for task_id in hit:
        log.info("terminating task %s (signal %d)", task_id, signum)
        pool.terminate_job(task_id, signum)
    return ok(f"terminate: {', '.join(hit)}")


@command(kind="control", variadic="task_id")
def revoke(
    ctx: ControlContext, task_id: Any = None, terminate: bool = False, signal: Any = None, **_: Any
) -> Any:
    """Revoke tasks by id: never run them; with terminate, also stop them if running."""
    ids = _ids(task_id)
    plane(ctx.worker).revoked.add(ids)
    pool = ctx.worker.pool
    running = {job.task_id for job in pool.active_jobs()} if pool is not None else set()
    _mark_revoked(ctx, ids, running)
    ctx.worker.inbox.waker.wake()  # the loop looks at its buffer again
    log.info("tasks flagged as revoked: %s", ", ".join(ids))
    if terminate:
        return _terminate(ctx, ids, signal)
    return ok(f"tasks {set(ids)} flagged as revoked")


@command(kind="control", variadic="headers")
def revoke_by_stamped_headers(
    ctx: ControlContext, headers: Any = None, terminate: bool = False, signal: Any = None, **_: Any
) -> Any:
    """Revoke every task whose stamped header has one of these values."""
    if isinstance(headers, list):
        headers = dict(h.split("=", 1) for h in headers if isinstance(h, str) and "=" in h)
    if not isinstance(headers, dict) or not headers:
        return nok("headers must be a mapping of stamp name to value(s), e.g. {'mystamp': 'x'}")
    plane(ctx.worker).revoked.add_stamps(headers)
    ctx.worker.inbox.waker.wake()  # the loop looks at its buffer again
    if not terminate:
        return ok(f"headers {headers} flagged as revoked, but not terminated")
    # only the running tasks with these headers, as Celery: a stamp revoked earlier without
    # terminate leaves its tasks running
    asked = Revoked(1, plane(ctx.worker).revoked.expires)
    asked.add_stamps(headers)
    pool = ctx.worker.pool
    hit = [
        job.task_id
        for job in (pool.active_jobs() if pool is not None else [])
        if asked.matches("", job.headers)
    ]
    if not hit:
        return ok(f"headers {headers} were not terminated")
    return _terminate(ctx, hit, signal)


@command(kind="control", variadic="task_id", args=(("signal", str),))
def terminate(ctx: ControlContext, signal: Any = None, task_id: Any = None, **_: Any) -> Any:
    """Terminate running tasks with a signal (where the pool can)."""
    return revoke(ctx, task_id=task_id, terminate=True, signal=signal)


@command(kind="control", args=(("task_name", str), ("soft", float), ("hard", float)))
def time_limit(
    ctx: ControlContext,
    task_name: str | None = None,
    hard: float | None = None,
    soft: float | None = None,
    **_: Any,
) -> Any:
    """Change a task's time limits (for the tasks received from now on)."""
    task = ctx.worker.app.tasks.get(task_name or "")
    if task is None:
        return nok("unknown task")
    caps = ctx.worker.pool_cls.capabilities
    if (hard and not caps.hard_time_limit) or (soft and not caps.soft_time_limit):
        return nok(
            f"the {ctx.worker.settings.pool} pool cannot enforce time limits (prefork enforces "
            "both; asyncio and threads enforce soft limits)"
            if not (caps.hard_time_limit or caps.soft_time_limit)
            else f"the {ctx.worker.settings.pool} pool cannot enforce a "
            f"{'hard' if hard and not caps.hard_time_limit else 'soft'} time limit"
        )
    task.options = dataclasses.replace(task.options, time_limit=hard, soft_time_limit=soft)
    log.info("new time limits for %s: soft=%s hard=%s", task_name, soft, hard)
    return ok("time limits set successfully")


@command(kind="control")
def shutdown(ctx: ControlContext, msg: str = "Got shutdown from remote", **_: Any) -> Any:
    """Warm shutdown: finish running tasks, then exit."""
    log.warning("%s: warm shutdown", msg)
    ctx.worker.stop()
    return ok("shutting down")


def _resize(ctx: ControlContext, delta: int) -> Any:
    worker = ctx.worker
    pool = worker.pool
    if pool is None or not pool.capabilities.resize:
        return nok(
            f"the {worker.settings.pool} pool cannot change its size at run time (prefork can); "
            "restart the worker with another --concurrency"
        )
    size = pool.concurrency + delta
    if size < 1:
        return nok(f"cannot shrink below 1 process (now {pool.concurrency})")
    pool.resize(size)
    worker.concurrency = size  # the prefetch count follows
    return ok("pool will grow" if delta > 0 else "pool will shrink")


@command(kind="control", args=(("n", int),))
def pool_grow(ctx: ControlContext, n: int = 1, **_: Any) -> Any:
    """Add N processes to the pool."""
    return _resize(ctx, int(n))


@command(kind="control", args=(("n", int),))
def pool_shrink(ctx: ControlContext, n: int = 1, **_: Any) -> Any:
    """Remove N processes from the pool."""
    return _resize(ctx, -int(n))


@command(kind="control", args=(("max", int), ("min", int)))
def autoscale(ctx: ControlContext, max: Any = None, min: Any = None, **_: Any) -> Any:
    """Set the pool size to max (millpond has no autoscaler: the size is fixed at max)."""
    worker = ctx.worker
    pool = worker.pool
    if max is None:
        return nok("autoscale needs max")
    target = int(max)
    if pool is None or not pool.capabilities.resize:
        return nok(f"the {worker.settings.pool} pool cannot change its size at run time")
    if target < 1:
        return nok("max must be at least 1")
    pool.resize(target)
    worker.concurrency = target
    low = int(min) if min is not None else target
    return ok(f"autoscale now max={target} min={low} (millpond keeps a fixed size: max)")


@command(
    kind="control",
    args=(("queue", str), ("exchange", str), ("exchange_type", str), ("routing_key", str)),
)
def add_consumer(
    ctx: ControlContext,
    queue: str = "",
    exchange: str | None = None,
    exchange_type: str | None = None,
    routing_key: str | None = None,
    **options: Any,
) -> Any:
    """Start consuming from a queue (bound as Celery binds a new one by default)."""
    if not queue:
        return nok("add_consumer needs a queue name")
    if queue in ctx.worker.queues:
        return ok(f"already consuming from {queue}")
    # Celery declares a new queue bound to `exchange` with `routing_key` (and kombu's
    # `options`); consuming it without that binding would leave those tasks unseen
    binding = {"exchange": exchange, "exchange_type": exchange_type, "routing_key": routing_key}
    defaults = {"exchange": queue, "exchange_type": "direct", "routing_key": queue}
    asked = {
        name: value
        for name, value in {**binding, **options}.items()
        if value not in (None, "", defaults.get(name))
    }
    if asked:
        shown = ", ".join(f"{name}={value!r}" for name, value in asked.items())
        return nok(
            f"cannot add consumer {queue} with {shown}: a millpond worker declares a queue "
            "bound to the direct exchange of its own name only; declare that binding on the "
            f"broker yourself, then send add_consumer {queue} without them"
        )
    ctx.worker.call_soon(lambda: plane(ctx.worker).change_queues(add=queue))
    return ok(f"add consumer {queue}")


@command(kind="control", args=(("queue", str),))
def cancel_consumer(ctx: ControlContext, queue: str = "", **_: Any) -> Any:
    """Stop consuming from a queue."""
    if queue not in ctx.worker.queues:
        return nok(f"not consuming from {queue}")
    if len(ctx.worker.queues) == 1:
        return nok(f"{queue} is the worker's only queue; stop the worker instead (shutdown)")
    ctx.worker.call_soon(lambda: plane(ctx.worker).change_queues(remove=queue))
    return ok(f"no longer consuming from {queue}")


@command(kind="control")
def election(
    ctx: ControlContext, id: Any = None, topic: Any = None, action: Any = None, **_: Any
) -> Any:
    """Take part in an election (Celery's gossip): millpond workers never stand."""
    return None
