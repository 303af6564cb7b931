"""The consumer's hot path: cut whole `basic.deliver` messages out of the raw AMQP byte stream.

py-amqp reads a frame with three `recv` calls and dispatches it through several layers of Python;
at 10,000 messages a second that is most of the worker's budget. The consumer instead reads
everything the socket holds in one `recv` and lets `parse` slice complete deliveries (method,
content header and body frames) out of it. Every other frame (channel 0 methods, cancellations,
closes, anything unusual) is handed back untouched, so py-amqp still owns the protocol state
machine. A delivery is only ever consumed whole, so py-amqp never sees half a message.
"""

from __future__ import annotations

import struct
from typing import Final, Literal, NamedTuple

from amqp.exceptions import UnexpectedFrame

_FRAME_HEAD: Final = struct.Struct(">BHI")
_METHOD_ID: Final = struct.Struct(">HH")
_BODY_SIZE: Final = struct.Struct(">Q")
_TAG_AND_FLAG: Final = struct.Struct(">QB")
_ACK: Final = struct.Struct(">BHIHHQBB")
_QOS: Final = struct.Struct(">BHIHHIHBB")
_FRAME_END: Final = 0xCE
_METHOD, _HEADER, _BODY, _HEARTBEAT = 1, 2, 3, 8
_BASIC_DELIVER: Final = (60, 60)
_BASIC_QOS_OK: Final = (60, 11)


class RawDelivery(NamedTuple):
    """One delivery as it came off the wire; properties are decoded later, by the consumer."""

    consumer_tag: bytes
    delivery_tag: int
    redelivered: bool
    exchange: bytes
    #: the content-header frame payload; basic properties start at offset 12
    header: bytes
    body: bytes


class Frame(NamedTuple):
    """Any frame `parse` does not handle itself, in py-amqp's `on_inbound_frame` shape."""

    frame_type: int
    channel: int
    payload: bytes


def parse(
    data: bytes, pos: int, channel: int, out: list[RawDelivery]
) -> tuple[int, Frame | None, int, int]:
    """Append the complete deliveries for `channel` found from `pos` on to `out`.

    Returns `(next_pos, frame, heartbeats, qos_oks)`: parsing stops before the first incomplete
    frame or after the first frame it does not handle (`frame`, to be dispatched by py-amqp before
    anything after `next_pos` is looked at). `qos_oks` counts the `basic.qos-ok` frames on
    `channel` it consumed: the answers to the consumer's ack probes (see `qos_frame`), too
    frequent for py-amqp's slow path. Raises `UnexpectedFrame` on a corrupt stream.
    """
    end = len(data)
    heartbeats = 0
    qos_oks = 0
    unpack_head = _FRAME_HEAD.unpack_from
    while end - pos >= 8:
        ftype, fchan, size = unpack_head(data, pos)
        frame_end = pos + 8 + size
        if frame_end > end:
            break
        if data[frame_end - 1] != _FRAME_END:
            raise UnexpectedFrame(f"AMQP frame does not end in 0xCE (type {ftype}, size {size})")
        if ftype == _HEARTBEAT:
            heartbeats += 1
            pos = frame_end
            continue
        if ftype == _METHOD and fchan == channel:
            method = _METHOD_ID.unpack_from(data, pos + 7)
            if method == _BASIC_DELIVER:
                got = _delivery(data, pos, frame_end, end, channel)
                if got is None:
                    break  # the rest of the message has not arrived yet
                if got is not False:
                    delivery, pos = got
                    out.append(delivery)
                    continue
            elif method == _BASIC_QOS_OK and size == 4:
                qos_oks += 1
                pos = frame_end
                continue
        frame = Frame(ftype, fchan, data[pos + 7 : frame_end - 1])
        return frame_end, frame, heartbeats, qos_oks
    return pos, None, heartbeats, qos_oks


def _delivery(
    data: bytes, start: int, method_end: int, end: int, channel: int
) -> tuple[RawDelivery, int] | Literal[False] | None:
    """The delivery whose method frame spans `start:method_end`, with the position after it.

    None: its frames are not all here yet. False: they are not contiguous (another channel's
    frame sits in between), so it must take py-amqp's general path.
    """
    unpack_head = _FRAME_HEAD.unpack_from
    if end - method_end < 8:
        return None
    htype, hchan, hsize = unpack_head(data, method_end)
    header_end = method_end + 8 + hsize
    if htype != _HEADER or hchan != channel:
        return False
    if header_end > end:
        return None
    if data[header_end - 1] != _FRAME_END:
        raise UnexpectedFrame("AMQP content header frame does not end in 0xCE")
    (body_size,) = _BODY_SIZE.unpack_from(data, method_end + 11)
    pos = header_end
    parts: list[bytes] = []
    remaining = body_size
    while remaining > 0:
        if end - pos < 8:
            return None
        btype, bchan, bsize = unpack_head(data, pos)
        if btype != _BODY or bchan != channel:
            return False
        body_end = pos + 8 + bsize
        if body_end > end:
            return None
        if data[body_end - 1] != _FRAME_END:
            raise UnexpectedFrame("AMQP content body frame does not end in 0xCE")
        parts.append(data[pos + 7 : body_end - 1])
        remaining -= bsize
        pos = body_end
    # basic.deliver arguments: consumer-tag, delivery-tag, redelivered, exchange, routing-key
    offset = start + 11
    tag_len = data[offset]
    consumer_tag = data[offset + 1 : offset + 1 + tag_len]
    offset += 1 + tag_len
    delivery_tag, redelivered = _TAG_AND_FLAG.unpack_from(data, offset)
    offset += 9
    exchange = data[offset + 1 : offset + 1 + data[offset]]
    body = parts[0] if len(parts) == 1 else b"".join(parts)
    raw = RawDelivery(
        consumer_tag,
        delivery_tag,
        bool(redelivered & 1),
        exchange,
        data[method_end + 7 : header_end - 1],
        body,
    )
    return raw, pos


def ack_frame(channel: int, delivery_tag: int, multiple: bool) -> bytes:
    """The bytes of one `basic.ack` method frame (acks are batched into a single write)."""
    return _ACK.pack(1, channel, 13, 60, 80, delivery_tag, 1 if multiple else 0, _FRAME_END)


def qos_frame(channel: int, prefetch_count: int, global_: bool) -> bytes:
    """The bytes of one `basic.qos` method frame (prefetch_size 0).

    The consumer re-sends its own QoS as a probe: RabbitMQ handles a channel's frames in order,
    so its `qos-ok` proves every ack written before the probe has arrived."""
    return _QOS.pack(1, channel, 11, 60, 10, 0, prefetch_count, 1 if global_ else 0, _FRAME_END)
