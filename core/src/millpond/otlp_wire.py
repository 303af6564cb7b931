"""OTLP trace requests written straight to protobuf wire format, without message objects.

The OpenTelemetry exporter builds a tree of protobuf message objects for every span and then
serializes it: about 80 us of CPU per span here, more than a no-op task costs. The spans the
worker records have a fixed shape, so this module writes their bytes directly: the parts that
repeat (the resource, the scope, attribute keys, a queue's shared attributes, task names) are
encoded once and cached, and a span costs a few joins and two `struct.pack` calls.

Field numbers follow opentelemetry-proto (`trace/v1/trace.proto`, `common/v1/common.proto`,
`collector/trace/v1/trace_service.proto`); tests decode the output with the official generated
classes, so a mistake here fails there.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

# Span kinds and status codes as numbered in the proto.
KIND_INTERNAL = 1
KIND_SERVER = 2
KIND_CLIENT = 3
KIND_PRODUCER = 4
KIND_CONSUMER = 5
STATUS_UNSET = 0
STATUS_OK = 1
STATUS_ERROR = 2

#: Span.flags bits: "is_remote is known" and "the parent is remote"
FLAG_HAS_IS_REMOTE = 0x100
FLAG_IS_REMOTE = 0x200

_SMALL = [bytes((i,)) for i in range(128)]
_pack_q = struct.Struct("<Q").pack
_pack_d = struct.Struct("<d").pack
_pack_times = struct.Struct("<BQBQ").pack  # Span fields 7 and 8: start and end, fixed64
_pack_flags = struct.Struct("<BBI").pack  # Span field 16, fixed32 (a two-byte tag)
_pack_event_time = struct.Struct("<BQ").pack

_INT64_MASK = (1 << 64) - 1


def varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag, the payload's length, the payload."""
    size = len(payload)
    return tag + (_SMALL[size] if size < 0x80 else varint(size)) + payload


# -- attributes (common.proto KeyValue / AnyValue) ------------------------------------------------
def any_value(value: Any) -> bytes:
    """An AnyValue message for an attribute value (str, bool, int, float, bytes or a sequence)."""
    if isinstance(value, str):
        return field(b"\x0a", value.encode("utf-8", "replace"))
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + varint(value & _INT64_MASK)
    if isinstance(value, float):
        return b"\x21" + _pack_d(value)
    if isinstance(value, bytes | bytearray):
        return field(b"\x3a", bytes(value))
    if isinstance(value, Sequence):
        return field(b"\x2a", b"".join(field(b"\x0a", any_value(item)) for item in value))
    return field(b"\x0a", str(value).encode("utf-8", "replace"))


_keys: dict[str, bytes] = {}
_pairs: dict[tuple[str, Any, type], bytes] = {}
_PAIR_CACHE = 4096
#: keys whose string values repeat from span to span (a task's state, an error type): their
#: encoded pairs are cached; values of other keys (message ids, user data) would only churn it
REPEATING_KEYS: set[str] = set()


def key_value(key: str, value: Any) -> bytes:
    """A KeyValue message."""
    encoded_key = _keys.get(key)
    if encoded_key is None:
        if len(_keys) >= _PAIR_CACHE:
            _keys.clear()
        encoded_key = _keys[key] = field(b"\x0a", key.encode("utf-8", "replace"))
    return encoded_key + field(b"\x12", any_value(value))


def attribute(key: str, value: Any, tag: bytes = b"\x4a") -> bytes:
    """One attribute field (KeyValue under `tag`: 0x4a on a Span, 0x1a on an Event).

    Pairs that repeat are encoded once: small integers (retry and delivery counts) and strings of
    `REPEATING_KEYS`.
    """
    cls = value.__class__
    cacheable = (cls is int and -1 <= value < 256) or (cls is str and key in REPEATING_KEYS)
    if cacheable:
        cached = _pairs.get((key, value, cls))
        if cached is not None and tag == b"\x4a":
            return cached
    encoded = field(tag, key_value(key, value))
    if cacheable and tag == b"\x4a":
        if len(_pairs) >= _PAIR_CACHE:
            _pairs.clear()
        _pairs[(key, value, cls)] = encoded
    return encoded


def attributes(values: Mapping[str, Any], tag: bytes) -> bytes:
    """Repeated KeyValue fields under `tag` (0x4a on a Span, 0x1a on an Event or a Link)."""
    return b"".join([attribute(k, v, tag) for k, v in values.items()])


def span_attributes(values: Mapping[str, Any]) -> bytes:
    return b"".join([attribute(k, v) for k, v in values.items()])


# -- spans ------------------------------------------------------------------------------------------
def event(name: str, time_ns: int, attrs: Mapping[str, Any] | None) -> bytes:
    body = _pack_event_time(0x09, time_ns) + field(b"\x12", name.encode("utf-8", "replace"))
    if attrs:
        body += attributes(attrs, b"\x1a")
    return field(b"\x5a", body)


def link(
    trace_id: bytes,
    span_id: bytes,
    trace_state: str | None,
    attrs: Mapping[str, Any] | None,
    *,
    remote: bool,
) -> bytes:
    body = b"\x0a\x10" + trace_id + b"\x12\x08" + span_id
    if trace_state:
        body += field(b"\x1a", trace_state.encode())
    if attrs:
        body += attributes(attrs, b"\x22")
    flags = FLAG_HAS_IS_REMOTE | (FLAG_IS_REMOTE if remote else 0)
    body += struct.pack("<BI", 0x35, flags)
    return field(b"\x6a", body)


def status(code: int, message: str | None) -> bytes:
    if code == STATUS_UNSET:
        return b""
    body = b""
    if message:
        body = field(b"\x12", message.encode("utf-8", "replace"))
    return field(b"\x7a", body + b"\x18" + _SMALL[code])


_names: dict[tuple[str, int], bytes] = {}


def name_and_kind(name: str, kind: int) -> bytes:
    """A span's name and kind fields (5 and 6), cached: names repeat (one per queue or task)."""
    encoded = _names.get((name, kind))
    if encoded is None:
        if len(_names) >= _PAIR_CACHE:
            _names.clear()
        encoded = _names[(name, kind)] = field(b"\x2a", name.encode("utf-8", "replace")) + (
            b"\x30" + _SMALL[kind]
        )
    return encoded


def span(  # noqa: PLR0917 - called per span, positional is the cheap call
    trace_id: bytes,
    span_id: bytes,
    parent_id: bytes,
    name: str,
    kind: int,
    start_ns: int,
    end_ns: int,
    attrs: bytes,
    trace_state: str | None = None,
    parent_remote: bool = False,
    extra: bytes = b"",
) -> bytes:
    """One Span as the `spans` field (2) of a ScopeSpans message.

    Ids are raw bytes (16 and 8; `parent_id` empty for a root span); `attrs` is pre-encoded
    attribute fields (see `attribute`); `extra` carries pre-encoded events, links, status and
    dropped counts, which most spans do not have.
    """
    head = b"\x0a\x10" + trace_id + b"\x12\x08" + span_id
    if trace_state:
        head += field(b"\x1a", trace_state.encode())
    if parent_id:
        head += b"\x22\x08" + parent_id
    body = b"".join(
        (
            head,
            name_and_kind(name, kind),
            _pack_times(0x39, start_ns, 0x41, end_ns),
            attrs,
            extra,
            REMOTE_FLAGS if parent_remote else LOCAL_FLAGS,
        )
    )
    size = len(body)
    return b"\x12" + (_SMALL[size] if size < 0x80 else varint(size)) + body


#: the Span.flags field of a span whose parent is local, and of one whose parent is remote
LOCAL_FLAGS = _pack_flags(0x85, 0x01, FLAG_HAS_IS_REMOTE)
REMOTE_FLAGS = _pack_flags(0x85, 0x01, FLAG_HAS_IS_REMOTE | FLAG_IS_REMOTE)


def dropped(tag: int, count: int) -> bytes:
    """A dropped_*_count field (attributes 10, events 12, links 14) when something was dropped."""
    return (_SMALL[tag << 3] + varint(count)) if count else b""


# -- the request ------------------------------------------------------------------------------------
def resource_prefix(
    resource_attributes: Mapping[str, Any], scope_name: str, scope_version: str
) -> tuple[bytes, bytes]:
    """The constant parts of a request: (resource field, scope field), encoded once."""
    resource = field(b"\x0a", attributes(resource_attributes, b"\x0a"))
    scope = field(
        b"\x0a",
        field(b"\x0a", scope_name.encode())
        + (field(b"\x12", scope_version.encode()) if scope_version else b""),
    )
    return resource, scope


def request(resource: bytes, scope: bytes, spans: Sequence[bytes]) -> bytes:
    """An ExportTraceServiceRequest holding `spans` (each from `span`) under one resource and scope.

    Written with one join: the spans are most of a request's bytes, copied once.
    """
    scope_spans_size = len(scope) + sum(map(len, spans))
    scope_spans_head = b"\x12" + varint(scope_spans_size)
    resource_spans_size = len(resource) + len(scope_spans_head) + scope_spans_size
    return b"".join(
        [b"\x0a", varint(resource_spans_size), resource, scope_spans_head, scope, *spans]
    )
