"""kombu's JSON envelope, how Celery stores a message in a Redis list (the embedded brokers too):
keeping it lets Celery and millpond producers and workers share a Redis, each consuming what the
other pushed.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

from millpond.exceptions import MalformedMessage
from millpond.wire.protocol import Message


def dumps(message: Message, *, queue: str, exchange: str = "") -> str:
    """The envelope as a JSON string, with a fresh `delivery_tag` like kombu's producer sets."""
    props = dict(message.properties)
    props.setdefault("delivery_mode", 2)
    props.setdefault("priority", 0)
    props["body_encoding"] = "base64"
    props["delivery_info"] = {"exchange": exchange, "routing_key": queue}
    props["delivery_tag"] = str(uuid.uuid4())
    return json.dumps(
        {
            "body": base64.b64encode(message.body).decode("ascii"),
            "content-encoding": message.content_encoding,
            "content-type": message.content_type,
            "headers": message.headers,
            "properties": props,
        },
        separators=(",", ":"),
    )


def loads(raw: str | bytes) -> Message:
    """Parse an envelope; anything that is not one raises `MalformedMessage` with the reason."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise MalformedMessage("envelope JSON is nested too deeply")
    except ValueError as exc:  # UnicodeDecodeError is one
        raise MalformedMessage(f"envelope is not valid JSON: {exc}")
    if not isinstance(data, dict):
        raise MalformedMessage("envelope is not a JSON object")
    props = data.get("properties") or {}
    headers = data.get("headers") or {}
    if not isinstance(props, dict) or not isinstance(headers, dict):
        raise MalformedMessage("envelope properties and headers must be objects")
    body: Any = data.get("body", "")
    if not isinstance(body, str):
        raise MalformedMessage("envelope body is not a string")
    if props.get("body_encoding") != "base64":
        raw_body = body.encode("utf-8", "surrogateescape")
    else:
        try:
            raw_body = base64.b64decode(body, validate=True)
        except ValueError as exc:  # binascii.Error is one
            raise MalformedMessage(f"envelope body is not valid base64: {exc}")
    return Message(
        body=raw_body,
        headers=headers,
        content_type=str(data.get("content-type") or ""),
        content_encoding=str(data.get("content-encoding") or "utf-8"),
        properties={k: v for k, v in props.items() if k not in ("body_encoding", "delivery_info")},
    )
