"""Fuzz target for everything a worker does with bytes from a broker before it trusts them.

One input drives one of three paths, chosen by its first byte:

0. a Redis list entry: `envelope.loads`, then the checks a worker makes (`signing.verify` with a
   key, `decode_task`);
1. an AMQP-style message: the rest is split at the first NUL into a JSON document for the headers
   (anything JSON can say, so forged types) and the body bytes, with a content type and encoding
   picked by the second byte;
2. the same message, signed first and then altered by one byte: verification must refuse it.

The contract: every input either decodes into a valid `Job` or raises a `MessageError`
subclass; anything else (OverflowError, RecursionError, TypeError...) is a finding, because in the
worker it would escape the decoder. Pickle is never in the accepted content types here: loading
fuzzed pickles would run arbitrary opcodes on this machine.

Run it under atheris for a long campaign (`pip install atheris`, not a project dependency):

    .venv/bin/python tests/hostile/fuzz_decoder.py -atheris_runs=2000000 -max_len=4096

In CI, tests/hostile/test_fuzz_decoder.py feeds `fuzz_one_input` from hypothesis, bounded.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from millpond.exceptions import MessageError, SignatureError
from millpond.wire import envelope, signing
from millpond.wire.protocol import JSON, Job, Message, decode_task, encode_task

KEY = "fuzz-key"
MAX_SIZE = 64 * 1024
_TYPES = (JSON, "application/json; charset=utf-8", "", "text/plain", "APPLICATION/JSON")
_ENCODINGS = ("utf-8", "latin-1", "utf-16", "rot13", "bogus", "")


def _says_why(exc: Exception) -> None:
    if not str(exc):
        raise AssertionError(f"{type(exc).__name__} without a reason: a refusal must say why")


def _check(msg: Job) -> None:
    """What the worker relies on after a successful decode."""
    assert isinstance(msg.task_id, str) and 0 < len(msg.task_id) <= 255
    assert isinstance(msg.task_name, str) and 0 < len(msg.task_name) <= 255
    assert isinstance(msg.args, tuple)
    assert isinstance(msg.kwargs, dict) and all(isinstance(k, str) for k in msg.kwargs)
    assert isinstance(msg.retries, int) and not isinstance(msg.retries, bool)
    assert msg.retries >= 0
    for when in (msg.eta, msg.expires, msg.sent_at):
        assert when is None or (isinstance(when, float) and math.isfinite(when))
    for limit in (msg.time_limit, msg.soft_time_limit):
        assert limit is None or (isinstance(limit, float) and math.isfinite(limit) and limit > 0)
    for text in (msg.root_id, msg.parent_id, msg.group_id, msg.origin, msg.reply_to):
        assert text is None or isinstance(text, str)


def decode(message: Message) -> Job | None:
    """The worker's checks; None when the message is refused (as it must be, with a reason)."""
    _ = message.task_id, message.task_name  # used to log refusals: must never raise
    try:
        signing.verify(message, KEY)
    except SignatureError as exc:
        _says_why(exc)
    try:
        msg = decode_task(message, max_size=MAX_SIZE)
    except MessageError as exc:
        _says_why(exc)
        return None
    _check(msg)
    return msg


def _message(data: bytes) -> Message:
    kind = data[0] if data else 0
    head, _, body = data[1:].partition(b"\0")
    try:
        headers: Any = json.loads(head)
    except (ValueError, RecursionError):
        headers = {}
    return Message(
        body=body,
        headers=headers if isinstance(headers, dict) else {"id": headers},
        content_type=_TYPES[kind % len(_TYPES)],
        content_encoding=_ENCODINGS[(kind // len(_TYPES)) % len(_ENCODINGS)],
    )


def _tamper(data: bytes) -> None:
    message = _message(data)
    if not isinstance(message.headers.get("id"), str):
        message = encode_task("fuzz.task", [data[:32].hex()], task_id="t-1")
    signing.sign(message, KEY)
    body = bytearray(message.body or b"\0")
    at = data[0] % len(body) if data else 0
    body[at] ^= 0x01
    message.body = bytes(body)
    try:
        signing.verify(message, KEY)
    except SignatureError:
        return
    raise AssertionError("a message altered after signing passed verification")


def fuzz_one_input(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0] % 3, data[1:]
    if mode == 0:
        try:
            message = envelope.loads(rest)
        except MessageError as exc:
            _says_why(exc)
            return
        decode(message)
    elif mode == 1:
        decode(_message(rest))
    else:
        _tamper(rest)


#: a few valid inputs for each path, to start a campaign from (and for the CI examples)
SEEDS: list[bytes] = [
    b"\0" + envelope.dumps(encode_task("fuzz.task", [1, "two"], {"k": 3.5}), queue="q").encode(),
    b"\1\0" + json.dumps(encode_task("fuzz.task", [1]).headers).encode() + b"\0[[1],{},{}]",
    b"\2\0" + json.dumps(encode_task("fuzz.task").headers).encode() + b"\0[[],{},null]",
]


def main() -> None:  # pragma: no cover - needs atheris
    import atheris

    atheris.Setup(sys.argv, fuzz_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
