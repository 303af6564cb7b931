"""Optional message signing: an HMAC-SHA256 over the body, the headers that decide what runs or what
operators are shown, and the properties that decide where results go. With a `signing_key` set,
producers sign every message and workers dead-letter unsigned or altered ones before parsing their
body. It proves a message came from someone holding the key, unaltered; it does not encrypt (TLS).

Left out on purpose (docs/guarantees.md lists them): headers a broker adds or rewrites in transit
(every `x-*` header: RabbitMQ's `x-death` and `x-delivery-count`, millpond's dead-letter reason),
the trace context (`traceparent`, `tracestate`: it changes which trace spans join, not what runs)
and the `priority` and delivery properties (scheduling hints a broker may normalise).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Final

from millpond.exceptions import SignatureError
from millpond.wire.protocol import Message

HEADER: Final = "x-millpond-signature"
_SIGNED_HEADERS: Final = (
    *("id", "task", "eta", "expires", "retries", "timelimit", "root_id", "parent_id", "group"),
    *("group_index", "ignore_result"),
    # what operators see (events, `inspect active`, Flower) must be what runs
    *("argsrepr", "kwargsrepr", "shadow", "lang", "origin"),
    # canvas stamping decides what a `revoke_by_stamped_headers` matches
    *("stamped_headers", "stamps", "replaced_task_nesting"),
)
#: properties that decide where the result goes (rpc:// replies to `reply_to`, keyed by the id)
_SIGNED_PROPERTIES: Final = ("reply_to", "correlation_id")
#: the scheme version: v1 covered fewer headers and no properties, and is refused
VERSION: Final = "v2="


def _digest(message: Message, key: bytes) -> str:
    signed = {name: message.headers.get(name) for name in _SIGNED_HEADERS}
    properties = message.properties if isinstance(message.properties, dict) else {}
    routed = {name: properties.get(name) for name in _SIGNED_PROPERTIES}
    preamble = json.dumps(
        [message.content_type, message.content_encoding, signed, routed],
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    ).encode()
    mac = hmac.new(key, preamble + b"\n", hashlib.sha256)
    mac.update(bytes(message.body))
    return VERSION + mac.hexdigest()


def sign(message: Message, key: str) -> None:
    """Add the signature header to a message (in place)."""
    message.headers[HEADER] = _digest(message, key.encode())


def verify(message: Message, key: str) -> None:
    """Raise `SignatureError` unless the message carries a valid signature for `key`."""
    if not isinstance(message.headers, dict):
        raise SignatureError("message headers are not a mapping; cannot check its signature")
    given = message.headers.get(HEADER)
    if not isinstance(given, str) or not given:
        raise SignatureError(
            "message is not signed and this worker requires signatures (signing_key is set); "
            "send it from a producer configured with the same signing_key"
        )
    if given.startswith("v1="):
        raise SignatureError(
            "message carries an older millpond's v1 signature, which does not cover argsrepr, "
            "kwargsrepr or reply_to; upgrade the producer so it signs with v2"
        )
    # compare bytes: compare_digest refuses str with non-ASCII characters (TypeError), and a
    # forged header must be refused as a bad signature, not crash the worker
    expected = _digest(message, key.encode()).encode()
    if not hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected):
        raise SignatureError(
            "message signature does not match: it was altered, or signed with another key"
        )
