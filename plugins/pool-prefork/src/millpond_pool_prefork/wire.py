"""Length-prefixed pickles over the parent-child sockets.

Each frame is a 4-byte big-endian length and a pickle. Pickle, because a Job's arguments came from
JSON and an Outcome holds plain values: both pickle cheaply, and only our own processes are at
either end of a socketpair. The parent reads without ever blocking (`FrameReader` is fed whatever
bytes a readable socket had), so one stuck child cannot stall the supervisor; a child reads and
writes blocking, because it has nothing else to do.
"""

from __future__ import annotations

import pickle
import socket
import struct
from typing import Any

HEADER = struct.Struct("!I")
#: a frame larger than this is a bug or corruption, never a real job or outcome
MAX_FRAME = 1 << 30


class WireError(Exception):
    """The other end sent something that is not a frame of ours."""


def frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    if len(data) > MAX_FRAME:
        raise WireError(f"a frame of {len(data)} bytes is over the {MAX_FRAME}-byte limit")
    return HEADER.pack(len(data)) + data


def _read_exact(sock: socket.socket, size: int) -> bytes | None:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            return None
        got += n
    return bytes(buffer)


def recv(sock: socket.socket) -> Any:
    """The next object from a blocking socket, or None at end of stream (the peer is gone)."""
    header = _read_exact(sock, HEADER.size)
    if header is None:
        return None
    (size,) = HEADER.unpack(header)
    if size > MAX_FRAME:
        raise WireError(f"frame of {size} bytes announced: the stream is corrupt")
    body = _read_exact(sock, size)
    if body is None:
        return None
    return pickle.loads(body)  # noqa: S301 - our own process at the other end


class FrameReader:
    """Reassembles frames from the chunks a non-blocking reader gets."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self._buffer += data
        out: list[Any] = []
        while len(self._buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buffer)
            if size > MAX_FRAME:
                raise WireError(f"frame of {size} bytes announced: the stream is corrupt")
            end = HEADER.size + size
            if len(self._buffer) < end:
                break
            out.append(pickle.loads(bytes(self._buffer[HEADER.size : end])))  # noqa: S301
            del self._buffer[:end]
        return out

    @property
    def partial(self) -> bool:
        """Whether bytes of an unfinished frame are buffered (a child died mid-write)."""
        return bool(self._buffer)
