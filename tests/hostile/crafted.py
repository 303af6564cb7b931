"""A catalogue of hostile messages, pushed straight into a broker's queue (no millpond producer).

Every `Case` is a message a careless or malicious producer could write: truncated or non-UTF-8
bodies, the wrong body shape, nesting deep enough to blow the parser's stack, a body over
`max_message_size`, content types the worker must not parse (pickle among them), unknown tasks,
arguments the function cannot take, and headers whose types are forged. The worker must
dead-letter each one with a reason (`reason` is a piece of it) and carry on; the cases marked
`runs` are odd but legitimate and must simply run.

A message carries its case name in the header `x-case` when its headers can carry anything;
Redis entries that are not an envelope at all (`raw`) are recognised by their bytes.
"""

from __future__ import annotations

import json
import pickle
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from millpond.wire import envelope
from millpond.wire.protocol import JSON, PICKLE, Message, encode_task
from tests.faults.harness import NOOP, SINK

CASE = "x-case"
#: the worker under attack runs with this limit (small, so the test stays fast)
MAX_SIZE = 1024 * 1024

BOTH = ("redis", "amqp")
REDIS = ("redis",)
AMQP = ("amqp",)


@dataclass(frozen=True)
class Case:
    name: str
    reason: str
    build: Callable[[str, Path], Message] | None = None
    raw: Callable[[Path], bytes] | None = None
    brokers: tuple[str, ...] = BOTH
    #: "dead" (dead-lettered with `reason`), "runs", or "fails" (runs and fails with `reason`)
    outcome: str = "dead"


class PickleBomb:
    """Unpickling this creates a file: proof that code from a message ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def marker_path(directory: Path) -> Path:
    return directory / "pickle-ran.marker"


def message(
    name: str,
    *,
    task: str = SINK,
    args: Any = (1,),
    kwargs: Any = None,
    body: bytes | None = None,
    headers: dict[str, Any] | None = None,
    drop: tuple[str, ...] = (),
    content_type: str = JSON,
    content_encoding: str = "utf-8",
) -> Message:
    """A well-formed task message for `name`, then spoiled as asked."""
    out = encode_task(task, list(args), kwargs or {}, task_id=str(uuid.uuid4()))
    out.headers[CASE] = name
    out.headers.update(headers or {})
    for key in drop:
        out.headers.pop(key, None)
    if body is not None:
        out.body = body
    out.content_type = content_type
    out.content_encoding = content_encoding
    return out


def spoil(name: str, reason: str, brokers: tuple[str, ...] = BOTH, **how: Any) -> Case:
    return Case(name, reason, build=lambda n, d: message(n, **how), brokers=brokers)


def odd(name: str, build: Callable[[str, Path], Message], reason: str = "") -> Case:
    """Odd but legitimate: it runs (or, with a `reason`, runs and fails with that error)."""
    return Case(name, reason, build=build, outcome="fails" if reason else "runs")


def _headerless(name: str) -> Message:
    out = message(name)
    out.headers = {}
    return out


def junk(name: str, raw: Callable[[Path], bytes]) -> Case:
    """A Redis list entry that is not a kombu envelope at all (recognised by its bytes)."""
    return Case(name, "not a kombu JSON envelope", raw=raw, brokers=REDIS)


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _good_envelope(queue: str = "q") -> dict[str, Any]:
    return json.loads(envelope.dumps(encode_task(SINK, [1]), queue=queue))  # type: ignore[no-any-return]


def _raw_envelope(**changes: Any) -> Callable[[Path], bytes]:
    def build(_: Path) -> bytes:
        data = _good_envelope()
        data.update(changes)
        return json.dumps(data).encode()

    return build


CASES: list[Case] = [
    # -- bodies ----------------------------------------------------------------------------------
    spoil("truncated body JSON", "not valid JSON", body=b'[[1], {}, {"callbacks": nu'),
    spoil("body is an object", "must be a JSON array", body=b'{"args": [1]}'),
    spoil("body has four parts", "must be a JSON array", body=b"[[1], {}, {}, {}]"),
    spoil("args not an array", "args must be an array", body=b'["x", {}, {}]'),
    spoil("kwargs not an object", "kwargs must be an object", body=b"[[1], [2], {}]"),
    spoil("embed not an object", "embed must be an object", body=b"[[1], {}, 7]"),
    spoil("body nested 100,000 deep", "nested too deeply", body=_nested(100_000)),
    spoil(
        "body over max_message_size",
        f"over the {MAX_SIZE}-byte limit",
        body=b'[["' + b"x" * (MAX_SIZE + 10) + b'"], {}, {}]',
    ),
    spoil("body not UTF-8", "not valid utf-8", body=b'[["\xff\xfe\xfd"], {}, {}]'),
    spoil("unknown content encoding", "not valid rot13", content_encoding="rot13"),
    spoil("empty body", "not valid JSON", body=b""),
    # -- content types ---------------------------------------------------------------------------
    spoil(
        "YAML content type",
        "'application/x-yaml' is not accepted (accepted: application/json); millpond decodes JSON",
        content_type="application/x-yaml",
    ),
    spoil("no content type", "'(none)' is not accepted", content_type=""),
    Case(
        "pickle body",
        f"'{PICKLE}' is not accepted",
        build=lambda n, d: message(
            n, body=pickle.dumps(PickleBomb(marker_path(d))), content_type=PICKLE
        ),
    ),
    # -- what runs -------------------------------------------------------------------------------
    spoil("unknown task", "unknown task 'no.such.task'", task="no.such.task"),
    spoil("too many arguments", "wrong arguments", task=NOOP, args=(1, 2)),
    spoil("unexpected keyword", "wrong arguments", task=NOOP, args=(), kwargs={"evil": 1}),
    # -- forged headers --------------------------------------------------------------------------
    spoil("retries a string", "'retries' must be a non-negative integer", headers={"retries": "3"}),
    spoil("retries negative", "'retries' must be a non-negative integer", headers={"retries": -1}),
    spoil(
        "retries a boolean", "'retries' must be a non-negative integer", headers={"retries": True}
    ),
    spoil("eta not a date", "'eta' is not an ISO 8601", headers={"eta": "tomorrow at noon"}),
    spoil("eta a boolean", "'eta' must be an ISO 8601", headers={"eta": True}),
    # RabbitMQ refuses infinite and NaN doubles in headers itself (it closes the connection)
    spoil("eta infinite", "'eta' is not a finite number", REDIS, headers={"eta": float("inf")}),
    spoil(
        "eta a 400-digit integer", "'eta' is not a finite number", REDIS, headers={"eta": 10**400}
    ),
    spoil("expires a list", "'expires' must be an ISO 8601", headers={"expires": [1, 2]}),
    spoil("timelimit a string", "'timelimit' must be [hard, soft]", headers={"timelimit": "60"}),
    spoil("timelimit one item", "'timelimit' must be [hard, soft]", headers={"timelimit": [1]}),
    spoil("timelimit negative", "must be a positive number", headers={"timelimit": [-1, None]}),
    spoil(
        "timelimit NaN",
        "must be a positive number",
        REDIS,
        headers={"timelimit": [float("nan"), None]},
    ),
    spoil(
        "timelimit a 400-digit integer",
        "must be a positive number",
        REDIS,
        headers={"timelimit": [10**400, None]},
    ),
    spoil("timelimit of strings", "must be a number or null", headers={"timelimit": ["a", "b"]}),
    spoil("id a number", "header 'id' must be", headers={"id": 123}),
    spoil("id empty", "header 'id' must be", headers={"id": ""}),
    spoil("id 300 characters", "header 'id' must be", headers={"id": "i" * 300}),
    spoil("id missing", "header 'id' must be", drop=("id",)),
    spoil("id a table", "header 'id' must be", headers={"id": {"$ne": None}}),
    spoil("task a number", "header 'task' must be", headers={"task": 42}),
    spoil("task missing", "header 'task' must be", drop=("task",)),
    spoil("root_id a number", "'root_id' must be a string", headers={"root_id": 5}),
    spoil(
        "traceparent a table", "'traceparent' must be a string", headers={"traceparent": {"a": 1}}
    ),
    Case("no headers at all", "header 'id' must be", build=lambda n, d: _headerless(n)),
    spoil(
        "eta an AMQP timestamp",
        "'eta' must be an ISO 8601 date-time string",
        AMQP,
        headers={"eta": datetime(2030, 1, 1, tzinfo=UTC)},
    ),
    spoil(
        "retries an AMQP decimal",
        "'retries' must be a non-negative integer",
        AMQP,
        headers={"retries": Decimal("1.5")},
    ),
    # -- odd but legitimate: these run -----------------------------------------------------------
    odd(
        "arguments nested 200 deep",
        lambda n, d: message(n, body=b"[" + _nested(200) + b", {}, {}]"),
    ),
    odd(
        "unknown header nested 300 deep",
        lambda n, d: message(n, headers={"x-junk": json.loads(_nested(300))}),
    ),
    odd("payload just under the limit", lambda n, d: message(n, args=("y" * (MAX_SIZE - 100),))),
    odd("eta at the epoch", lambda n, d: message(n, headers={"eta": 1.0e-300})),
    # JSON decodes 600 levels, pickle cannot send them to a prefork child: the task fails (FAILURE
    # stored, message acknowledged) with that reason; a threads or gevent worker would run it
    odd(
        "arguments nested 600 deep",
        lambda n, d: message(n, body=b"[" + _nested(600) + b", {}, {}]"),
        reason="cannot be sent to a child process: its arguments cannot be pickled",
    ),
    # -- Redis list entries that are not an envelope at all --------------------------------------
    junk(
        "envelope truncated", lambda d: envelope.dumps(encode_task(SINK), queue="q").encode()[:60]
    ),
    junk("envelope not UTF-8", lambda d: b"\xff\xfe\x00\x81garbage"),
    junk("envelope an array", lambda d: b"[1, 2, 3]"),
    junk("envelope empty", lambda d: b""),
    junk("envelope nested 100,000 deep", lambda d: _nested(100_000)),
    junk("envelope headers an array", _raw_envelope(headers=[1])),
    junk("envelope body not base64", _raw_envelope(body="%%%not base64%%%")),
    junk("envelope body a number", _raw_envelope(body=5)),
]


def for_broker(broker: str) -> list[Case]:
    return [case for case in CASES if broker in case.brokers]
