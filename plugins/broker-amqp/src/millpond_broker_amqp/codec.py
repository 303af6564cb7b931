"""Map a millpond `Message` onto AMQP basic properties and back, the way Celery (kombu) does.

Celery puts protocol v2 headers in `application_headers`, the task id in `correlation_id`, and
marks messages persistent; keeping exactly that layout is what lets a Celery producer feed a
millpond worker and the other way round.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import amqp

from millpond.wire.protocol import Message

#: AMQP basic properties carried in `Message.properties` (content type/encoding and headers have
#: their own fields).
PROPERTY_NAMES: Final = (
    "correlation_id",
    "reply_to",
    "delivery_mode",
    "priority",
    "expiration",
    "message_id",
    "timestamp",
    "type",
    "user_id",
    "app_id",
)

#: headers RabbitMQ adds itself (dead-lettering, quorum delivery counting); a copy we republish
#: must not carry them, or the next reader would count deaths and deliveries twice.
BROKER_HEADERS: Final = frozenset(
    {
        "x-death",
        "x-delivery-count",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)

#: marks a delivery whose AMQP properties could not be decoded; the content type makes the
#: worker dead-letter it (it is in no accept list) and the header says why.
UNDECODABLE_TYPE: Final = "application/x-millpond-undecodable"
DECODE_ERROR: Final = "x-millpond-decode-error"


def to_amqp(message: Message, headers: Mapping[str, Any] | None = None) -> amqp.Message:
    """The AMQP message for `message`; `headers`, when given, replaces its headers."""
    props: dict[str, Any] = {}
    given = message.properties
    for name in PROPERTY_NAMES:
        value = given.get(name)
        if value is not None:
            props[name] = value
    props.setdefault("delivery_mode", 2)
    return amqp.Message(
        message.body,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        application_headers=dict(message.headers if headers is None else headers),
        **props,
    )


def from_properties(props: Mapping[str, Any], body: bytes) -> Message:
    """The millpond `Message` for decoded basic properties and a body."""
    headers = props.get("application_headers")
    properties = {name: props[name] for name in PROPERTY_NAMES if props.get(name) is not None}
    return Message(
        body=body,
        headers=headers if isinstance(headers, dict) else {},
        content_type=props.get("content_type") or "",
        content_encoding=props.get("content_encoding") or "utf-8",
        properties=properties,
    )


def undecodable(body: bytes, reason: str) -> Message:
    """A stand-in for a delivery whose properties are corrupt: the worker dead-letters it."""
    return Message(
        body=body,
        headers={DECODE_ERROR: reason},
        content_type=UNDECODABLE_TYPE,
        content_encoding="binary",
        properties={},
    )


def republish_headers(message: Message, updates: Mapping[str, Any]) -> dict[str, Any]:
    """Headers for a copy of a delivered message: the broker's own bookkeeping dropped and
    `updates` applied (a value of None removes that header)."""
    out = {k: v for k, v in message.headers.items() if k not in BROKER_HEADERS}
    for key, value in updates.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out
