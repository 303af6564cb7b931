"""Celery's task message protocol v2, the only wire format millpond speaks.

`encode_task` builds a `Message` (what a broker carries) from a task call; `decode_task` turns one
back into a validated `Job`, or raises a `MessageError` subclass saying exactly what is wrong, so
the worker dead-letters the message with a reason instead of crashing.
"""

from __future__ import annotations

import json
import math
import pickle
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, TypeGuard

from millpond.exceptions import MalformedMessage, MessageTooLarge, UnsupportedContentType

JSON: Final = "application/json"
PICKLE: Final = "application/x-python-serialize"

# millpond's own headers (Celery ignores unknown ones), and Celery beat's
#: the producer's wall-clock time of publishing (epoch seconds), for the queue-wait measurement
SENT_AT: Final = "millpond_sent_at"
#: why a message was dead-lettered, set by the broker when it moves it
DEATH_REASON: Final = "x-millpond-death-reason"
#: a scheduler tick's periodic entry name (the header Celery beat sets)
PERIODIC_TASK_NAME: Final = "periodic_task_name"
#: deliveries of a message, for brokers that cannot count them themselves
DELIVERY_COUNT: Final = "x-millpond-delivery-count"
#: a chord header task's message put back to wait for its chord's claim to lapse: the worker that
#: gets it treats it as a redelivery (returns its part again, does not run it twice)
REJOIN: Final = "x-millpond-rejoin"


@dataclass(slots=True)
class Message:
    """One message as a broker carries it: opaque body bytes, headers, and the AMQP properties
    Celery sets (`correlation_id`: the task id, `reply_to`, `delivery_mode`, `priority`)."""

    body: bytes
    headers: dict[str, Any]
    content_type: str = JSON
    content_encoding: str = "utf-8"
    properties: dict[str, Any] = field(default_factory=dict)

    @property
    def task_id(self) -> str | None:
        """The task id if the headers name one (for logging undecodable messages)."""
        return self._text("id")

    @property
    def task_name(self) -> str | None:
        return self._text("task")

    def _text(self, name: str) -> str | None:
        value = self.headers.get(name) if isinstance(self.headers, dict) else None
        return value if isinstance(value, str) else None


@dataclass(slots=True, eq=False)
class Job:
    """A decoded, validated task message, what the worker runs from decode to settle (the pool
    contract's job). `decode_task` fills the message's fields, the worker the delivery's and the
    resolved time limits. All but the worker-only fields pickle and cross to a pool's children."""

    task_id: str
    task_name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    retries: int = 0
    queue: str = ""
    time_limit: float | None = None
    soft_time_limit: float | None = None
    root_id: str | None = None
    parent_id: str | None = None
    origin: str | None = None
    eta: float | None = None
    expires: float | None = None
    delivery_count: int = 1
    sent_at: float | None = None  #: the producer's publish time (header SENT_AT)
    #: propagation fields hooks hand from the worker to the execution unit (W3C trace context)
    carrier: dict[str, str] | None = None
    #: the message's canvas fields that are set (`callbacks`, `errbacks`, `chain`, `chord`), or None
    embed: dict[str, Any] | None = None
    group_id: str | None = None
    group_index: int | None = None
    #: the `reply_to` property: where a backend that replies to the caller (rpc://) sends results
    reply_to: str | None = None
    # -- kept in the worker process only --
    #: the message headers as they came (hooks read the producer's trace context here)
    headers: dict[str, Any] = field(default_factory=dict, repr=False)
    delivery: Any = field(default=None, repr=False)
    #: the `process` span of the tracing hook, while the job runs
    span: Any = field(default=None, repr=False)
    started: float = 0.0

    def __getstate__(self) -> tuple[None, dict[str, Any]]:
        state = {name: getattr(self, name) for name in self.__dataclass_fields__}
        state.update(headers={}, delivery=None, span=None)
        return None, state  # (no __dict__, slots): pickle sets each slot back


def new_id() -> str:
    return str(uuid.uuid4())


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


_Rule = tuple[Callable[[Any], bool], str]
#: what the headers the worker reads must be (a count or a text may be null)
_ID: _Rule = (
    lambda v: isinstance(v, str) and 0 < len(v) <= 255,
    "a non-empty string of at most 255 characters",
)
_COUNT: _Rule = (lambda v: v is None or (type(v) is int and v >= 0), "a non-negative integer")
_TEXT: _Rule = (lambda v: v is None or isinstance(v, str), "a string")
_TEXT_HEADERS: Final = ("root_id", "parent_id", "group", "origin", "traceparent", "tracestate")
_HEADERS: Final = {"id": _ID, "task": _ID, "retries": _COUNT, "group_index": _COUNT}
_HEADERS.update(dict.fromkeys(_TEXT_HEADERS, _TEXT))


def _finite(value: int | float) -> float | None:
    """The number as a finite float, or None: JSON integers have no size limit, and converting
    one with 400 digits raises OverflowError, which must not escape the decoder."""
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _parse_time(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if _is_number(value):
        if (seconds := _finite(value)) is None:
            raise MalformedMessage(f"header {name!r} is not a finite number of seconds")
        return seconds
    if not isinstance(value, str):
        raise MalformedMessage(f"header {name!r} must be an ISO 8601 date-time string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise MalformedMessage(f"header {name!r} is not an ISO 8601 date-time: {value[:64]!r}")
    if parsed.tzinfo is None:  # Celery sends naive UTC when its timezone setting is off
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _limit(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if not _is_number(value):
        raise MalformedMessage(f"timelimit {name} must be a number or null")
    if (seconds := _finite(value)) is None or seconds <= 0:
        raise MalformedMessage(f"timelimit {name} must be a positive number, got {value!r:.64}")
    return seconds


def encode_task(
    task: str,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    task_id: str | None = None,
    eta: float | None = None,
    expires: float | None = None,
    time_limit: float | None = None,
    soft_time_limit: float | None = None,
    headers: Mapping[str, Any] | None = None,
    embed: Mapping[str, Any] | None = None,
    reply_to: str | None = None,
    priority: int | None = None,
) -> Message:
    """Build a protocol v2 message with a JSON body; raises `TypeError` for arguments JSON can't hold.
    `headers` set or override headers by their wire names. `embed` holds the canvas fields Celery's
    workers read, signature dicts: `callbacks`, `errbacks`, `chain` (the remaining steps, reversed)
    and `chord` (the body)."""
    task_id = task_id or new_id()
    kwargs = dict(kwargs or {})
    # the body's canvas fields (its embed), in the order Celery writes them
    canvas = {k: (embed or {}).get(k) or None for k in ("callbacks", "errbacks", "chain", "chord")}
    try:
        body = json.dumps([list(args), kwargs, canvas], separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise TypeError(f"arguments of task {task!r} cannot be sent as JSON: {exc}") from exc
    out: dict[str, Any] = {
        "lang": "py",
        "task": task,
        "id": task_id,
        "shadow": None,
        "eta": _iso(eta),
        "expires": _iso(expires),
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [time_limit, soft_time_limit],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": _short_repr(args),
        "kwargsrepr": _short_repr(kwargs),
        "origin": None,
        "ignore_result": False,
        SENT_AT: None,
        **(headers or {}),
    }
    props: dict[str, Any] = {"correlation_id": task_id, "delivery_mode": 2}
    if reply_to:
        props["reply_to"] = reply_to
    if priority is not None:
        props["priority"] = priority
    return Message(body=body, headers=out, properties=props)


def _short_repr(value: Any, limit: int = 1024) -> str:
    text = repr(tuple(value) if isinstance(value, list) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def decode_task(
    message: Message,
    *,
    accept: frozenset[str] = frozenset({JSON}),
    max_size: int = 10 * 1024 * 1024,
) -> Job:
    if not isinstance(message.body, bytes | bytearray | memoryview):
        raise MalformedMessage("message body is not bytes")
    if len(message.body) > max_size:
        raise MessageTooLarge(
            f"message body is {len(message.body)} bytes, over the {max_size}-byte limit "
            "(setting max_message_size)"
        )
    headers = message.headers
    if not isinstance(headers, dict):
        raise MalformedMessage("message headers are not a mapping")
    content_type = message.content_type if isinstance(message.content_type, str) else ""
    if content_type not in accept:  # `Application/JSON; charset=utf-8` is JSON too
        content_type = content_type.partition(";")[0].strip().lower()
    if content_type not in accept:
        why = (
            "pickle is refused unless the accept_content setting allows it"
            if content_type == PICKLE
            else "millpond decodes JSON (and pickle, when allowed) only: send JSON "
            "(Celery: task_serializer = 'json')"
        )
        raise UnsupportedContentType(
            f"content type {content_type or '(none)'!r} is not accepted "
            f"(accepted: {', '.join(sorted(accept))}); {why}"
        )

    get = headers.get
    for name, (valid, what) in _HEADERS.items():
        if not valid(value := get(name)):
            raise MalformedMessage(f"header {name!r} must be {what}, got {type(value).__name__}")
    timelimit = get("timelimit") or [None, None]
    if not isinstance(timelimit, list | tuple) or len(timelimit) != 2:
        raise MalformedMessage("header 'timelimit' must be [hard, soft]")
    hard, soft = _limit("hard", timelimit[0]), _limit("soft", timelimit[1])

    if content_type == PICKLE:
        try:
            payload = pickle.loads(bytes(message.body))  # noqa: S301 - accept_content allows it
        except Exception as exc:
            raise MalformedMessage(f"pickle body cannot be loaded: {exc}")
    else:
        encoding = message.content_encoding or "utf-8"
        try:
            payload = json.loads(bytes(message.body).decode(encoding))
        except (UnicodeDecodeError, LookupError, TypeError) as exc:
            raise MalformedMessage(f"body is not valid {encoding!s:.64} text: {exc}")
        except RecursionError:
            raise MalformedMessage("body JSON is nested too deeply")
        except ValueError as exc:
            raise MalformedMessage(f"body is not valid JSON: {exc}")
    if not isinstance(payload, list | tuple) or len(payload) not in (2, 3):
        raise MalformedMessage("body must be a JSON array [args, kwargs, embed] (protocol v2)")
    args, kwargs, embed = payload[0], payload[1], payload[2] if len(payload) == 3 else None
    if not isinstance(args, list | tuple):
        raise MalformedMessage(f"body args must be an array, got {type(args).__name__}")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise MalformedMessage("body kwargs must be an object with string keys")
    if embed is not None and not isinstance(embed, dict):
        raise MalformedMessage("body embed must be an object or null")
    if embed:
        _check_embed(embed)
    reply_to = message.properties.get("reply_to") if isinstance(message.properties, dict) else None
    sent_at = get(SENT_AT)  # informational only: a bad value is ignored, not fatal
    return Job(
        task_id=headers["id"],
        task_name=headers["task"],
        args=tuple(args),
        kwargs=kwargs,
        retries=get("retries") or 0,
        time_limit=hard,
        soft_time_limit=soft,
        root_id=get("root_id"),
        parent_id=get("parent_id"),
        origin=get("origin"),
        eta=_parse_time("eta", get("eta")),
        expires=_parse_time("expires", get("expires")),
        sent_at=_finite(sent_at) if _is_number(sent_at) else None,
        embed={k: v for k, v in (embed or {}).items() if v} or None,
        group_id=get("group"),
        group_index=get("group_index"),
        reply_to=reply_to if isinstance(reply_to, str) else None,
        headers=headers,
    )


def _check_signature(where: str, value: Any) -> None:
    if not isinstance(value, dict) or not isinstance(value.get("task"), str) or not value["task"]:
        raise MalformedMessage(f"{where} must be a signature (an object with a 'task' name)")
    for key, kind in (("args", list | tuple), ("kwargs", dict), ("options", dict)):
        if value.get(key) is not None and not isinstance(value[key], kind):
            raise MalformedMessage(f"{where}: its {key!r} has the wrong type")


def _check_embed(embed: dict[str, Any]) -> None:
    """The canvas fields must be signatures, so a worker never fails half-way through a chain: a
    bad one dead-letters the message, with the reason, before the task runs. The chain's next step
    (its last element), callbacks, errbacks and chord body are checked whole; later steps only for
    being signatures (the worker that runs each checks it whole)."""
    for key in ("callbacks", "errbacks", "chain"):
        if (items := embed.get(key)) is None:
            continue
        if not isinstance(items, list):
            raise MalformedMessage(f"body embed {key!r} must be a list of signatures or null")
        whole = len(items) - 1 if key == "chain" else 0
        for index, item in enumerate(items):
            shallow_ok = type(item) is dict and type(item.get("task")) is str and item["task"]
            if index >= whole or not shallow_ok:
                _check_signature(f"body embed {key}[{index}]", item)
    if embed.get("chord") is not None:
        _check_signature("body embed 'chord'", embed["chord"])
