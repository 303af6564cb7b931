"""kombu's stored JSON envelope, edited where it lies: the transports whose message is one stored
blob (a file, a znode) change a header (the delivery count, the death reason) by rewriting that
blob, never by decoding and re-encoding the message, so what Celery wrote stays byte-for-byte
kombu's apart from the header."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from millpond.wire.protocol import DELIVERY_COUNT


def rewrite_headers(raw: bytes, change: Mapping[str, Any], drop: Iterable[str] = ()) -> bytes:
    """The envelope `raw` with the headers in `drop` removed and those in `change` set. Raises
    ValueError when `raw` is not a JSON object (the caller hands such a blob back as it is)."""
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("a kombu envelope is a JSON object")
    headers = dict(data.get("headers") or {})
    for key in drop:
        headers.pop(key, None)
    headers.update(change)
    data["headers"] = headers
    return json.dumps(data, separators=(",", ":")).encode()


def delivery_count(data: Mapping[str, Any]) -> int:
    """The delivery count a decoded envelope's headers carry (1 when absent or not a count)."""
    value = (data.get("headers") or {}).get(DELIVERY_COUNT, 1)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1


def bump_count(raw: bytes) -> bytes:
    """The envelope `raw` with its delivery counted once more (a redelivery is coming)."""
    return rewrite_headers(raw, {DELIVERY_COUNT: delivery_count(json.loads(raw)) + 1})
