"""The worker's own span recorder: `process` and `run` spans at a fraction of the SDK's cost.

With the OpenTelemetry Python SDK, a traced no-op task cost more than twice the task itself:
starting and ending two SDK spans is about 100 us of CPU, and the OTLP exporter's encoding about
80 us per span more, all under the worker's GIL. The two spans the worker makes for every task
have a fixed shape, so the worker records them itself when it set up tracing from the `OTEL_*`
variables with the OTLP/HTTP exporter:

* `RecordedSpan` implements the OpenTelemetry `Span` API (attributes, events, links, status,
  exceptions, `get_span_context`), so the task body, log lines and spans the user opens through the
  SDK see it as the current span and continue the trace from it.
* `SpanRecorder` queues ended spans and a background thread writes them as OTLP protobuf bytes
  (`millpond.otlp_wire`) and posts them (`millpond.otlp_http`), with the batch processor's
  `OTEL_BSP_*` settings and the SDK's `OTEL_*_LIMIT` span limits.
* Sampling follows `OTEL_TRACES_SAMPLER`/`_ARG` with the SDK's own rules (the trace-id ratio
  bound included), so a trace is kept or dropped alike by the recorder and by the SDK.

Everything else (the producer's `publish` spans, the user's own spans, a console or gRPC
exporter, a tracer provider the application installed itself) stays with the SDK.
"""

from __future__ import annotations

import atexit
import os
import random
import re
import struct
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any, Self

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from opentelemetry.util import types

from millpond import otlp_wire
from millpond.span_names import DELIVERY_COUNT, MESSAGE_ID, QUEUE_WAIT_MS, TASK_RETRIES, TASK_STATE

#: (parent_sampled or None for a root span, trace id as hex) -> keep this span?
Sampler = Callable[[bool | None, str], bool]

_STATUS_CODES = {StatusCode.UNSET: 0, StatusCode.OK: 1, StatusCode.ERROR: 2}
_SAMPLED = trace.TraceFlags(trace.TraceFlags.SAMPLED)
_NOT_SAMPLED = trace.TraceFlags(trace.TraceFlags.DEFAULT)
_getrandbits = random.getrandbits
_time_ns = time.time_ns


def _load_native() -> ModuleType | None:
    """`millpond._spancore`, the traced task path in C, unless absent or MILLPOND_PURE_PYTHON."""
    if os.environ.get("MILLPOND_PURE_PYTHON", "").strip().lower() in ("1", "true", "yes", "on"):
        return None
    try:
        from millpond import _spancore
    except ImportError:
        return None
    return _spancore


_spancore = _load_native()


def native_module() -> ModuleType | None:
    """The C part in use (`millpond._spancore`), or None: everything runs in Python."""
    return _spancore


#: whether the C part is in use (`millpond._spancore`); the Python code gives the same results
NATIVE = _spancore is not None


def sampler_from_env() -> Sampler:
    """The `OTEL_TRACES_SAMPLER` decision as a plain function (default `parentbased_always_on`).

    The ratio uses the SDK's `TraceIdRatioBased` bound, so a trace the SDK keeps for the
    producer's spans is kept here too.
    """
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

    name = (os.environ.get("OTEL_TRACES_SAMPLER") or "parentbased_always_on").strip().lower()
    root_name = name.removeprefix("parentbased_")
    root: Callable[[str], bool]
    if root_name == "always_off":
        root = _never
    elif root_name == "traceidratio":
        arg = (os.environ.get("OTEL_TRACES_SAMPLER_ARG") or "1.0").strip()
        bound = TraceIdRatioBased(float(arg)).bound
        mask = TraceIdRatioBased.TRACE_ID_LIMIT

        def root(trace_hex: str) -> bool:
            return (int(trace_hex, 16) & mask) < bound

    else:
        root = _always
    if name.startswith("parentbased_"):

        def decide(parent_sampled: bool | None, trace_hex: str) -> bool:
            return root(trace_hex) if parent_sampled is None else parent_sampled

        decide.follows_parent = True  # type: ignore[attr-defined]  # see SpanRecorder

    else:

        def decide(parent_sampled: bool | None, trace_hex: str) -> bool:
            return root(trace_hex)

    return decide


def _always(trace_hex: str) -> bool:
    return True


def _never(trace_hex: str) -> bool:
    return False


NO_TRACE = "0" * 32
NO_SPAN = "0" * 16


def new_trace_hex() -> str:
    trace_hex = _getrandbits(128).to_bytes(16, "big").hex()  # 3x faster than f"{n:032x}"
    while trace_hex == NO_TRACE:
        trace_hex = _getrandbits(128).to_bytes(16, "big").hex()
    return trace_hex


def new_span_hex() -> str:
    span_hex = _getrandbits(64).to_bytes(8, "big").hex()
    while span_hex == NO_SPAN:
        span_hex = _getrandbits(64).to_bytes(8, "big").hex()
    return span_hex


#: the W3C version-00 traceparent (what every current SDK sends), lower-case hex
TRACEPARENT_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
SAMPLED_DIGITS = frozenset("13579bdf")  # the flags byte's low bit is "sampled"
_fullmatch_00 = TRACEPARENT_00.fullmatch


def parse_traceparent(traceparent: str) -> tuple[str, str, bool] | None:
    """(trace id hex, span id hex, sampled) of a valid version-00 traceparent, else None."""
    if _fullmatch_00(traceparent) is None:
        return None
    trace_hex, span_hex = traceparent[3:35], traceparent[36:52]
    if trace_hex == NO_TRACE or span_hex == NO_SPAN:
        return None
    return trace_hex, span_hex, traceparent[54] in SAMPLED_DIGITS


_fromhex = bytes.fromhex
_last_message: tuple[str, bytes] = ("", b"")
#: (retries, delivery count) -> both attributes encoded; small counts repeat endlessly
_counts: dict[tuple[int, int], bytes] = {}
#: a double attribute is a fixed-size field: everything but the 8 value bytes is constant
_QUEUE_WAIT_PREFIX = otlp_wire.attribute(QUEUE_WAIT_MS, 0.0)[:-8]
_pack_double = struct.Struct("<d").pack
_native_encode: Callable[[Any], bytes | None] | None = None
if _spancore is not None:
    _spancore.configure_wire(
        *(
            otlp_wire.field(b"\x0a", key.encode())
            for key in (MESSAGE_ID, TASK_RETRIES, DELIVERY_COUNT, QUEUE_WAIT_MS, TASK_STATE)
        )
    )
    _native_encode = _spancore.encode


def _message_attributes(message: tuple[str, int, int, float | None], start_ns: int) -> bytes:
    """The attributes a task's spans take from its message, encoded when the span is exported."""
    global _last_message
    task_id, retries, delivery_count, sent_at = message
    last_id, encoded_id = _last_message
    if task_id != last_id:  # a task's `run` and `process` spans are usually exported together
        encoded_id = otlp_wire.attribute(MESSAGE_ID, task_id)
        _last_message = (task_id, encoded_id)
    counts = _counts.get((retries, delivery_count))
    if counts is None:
        counts = otlp_wire.attribute(TASK_RETRIES, retries)
        if delivery_count:
            counts += otlp_wire.attribute(DELIVERY_COUNT, delivery_count)
        if len(_counts) < 1024:
            _counts[(retries, delivery_count)] = counts
    if sent_at is None:
        return encoded_id + counts
    wait = start_ns / 1e6 - sent_at * 1000.0
    return encoded_id + counts + _QUEUE_WAIT_PREFIX + _pack_double(wait if wait > 0.0 else 0.0)


class _PySpanCore:
    """The fields of a recorded span and its end, in Python: what `millpond._spancore.SpanCore`
    does in C, used where that could not be built or MILLPOND_PURE_PYTHON is set."""

    __slots__ = (
        "base",
        "end_ns",
        "kind",
        "link_from",
        "message",
        "name",
        "parent_hex",
        "parent_remote",
        "plain",
        "recorder",
        "span_hex",
        "start_ns",
        "state",
        "trace_hex",
        "trace_state",
    )

    def __init__(  # noqa: PLR0917 - made twice per task: positional is the cheap call
        self,
        recorder: SpanRecorder | None,
        trace_hex: str,
        parent_hex: str,
        name: str,
        kind: int,
        base: bytes,
        message: tuple[str, int, int, float | None] | None,
        parent_remote: bool = False,
        trace_state: trace.TraceState | None = None,
        link_from: tuple[str, str, str | None] | None = None,
    ) -> None:
        self.recorder = recorder
        self.trace_hex = trace_hex
        span_hex = _getrandbits(64).to_bytes(8, "big").hex()  # new_span_hex, inlined: hot
        self.span_hex = span_hex if span_hex != NO_SPAN else new_span_hex()
        self.parent_hex = parent_hex
        self.parent_remote = parent_remote
        self.name = name
        self.kind = kind
        self.base = base
        self.message = message
        self.trace_state = trace_state
        self.link_from = link_from
        self.start_ns = _time_ns()
        self.end_ns = 0
        self.state: str | None = None  # the outcome, on `process` spans
        #: nothing beyond its fixed shape was added (see `_encode_plain`)
        self.plain = True

    def end(self, end_time: int | None = None) -> None:
        recorder = self.recorder
        if recorder is None or self.end_ns:
            return
        self.end_ns = end_time or _time_ns()
        recorder.record(self)  # type: ignore[arg-type]  # always a RecordedSpan

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        """End the span; an exception escaping the block is recorded on it, as the SDK does."""
        if exc is not None and self.recorder is not None and not self.end_ns:
            self._escaped(exc)
        self.end()

    def _escaped(self, exc: BaseException) -> None:
        raise NotImplementedError  # RecordedSpan's


if _spancore is not None:
    _SpanCore: type[_PySpanCore] = _spancore.SpanCore
else:
    _SpanCore = _PySpanCore


class RecordedSpan(_SpanCore, trace.Span):  # type: ignore[misc,valid-type]
    """A span recorded by `SpanRecorder`; unsampled ones (no recorder) carry only their context.

    Ids are kept as the hex text they travel as in `traceparent`; the attributes every span of a
    queue and task shares come pre-encoded (`base`), and the ones a task's message gives
    (`message`: task id, retries, delivery count, send time) are encoded when the span is
    exported, off the task's path. Attributes set later go to a dict.

    Its fields, its creation (ids, start time), `end` and the context-manager protocol live in
    the base class: `millpond._spancore.SpanCore` in C, or `_PySpanCore`.
    """

    # Set on few spans: class defaults, so a task's spans skip assigning them (they go to the
    # instance's __dict__, as the API's Span class declares no slots).
    attributes: dict[str, Any] | None = None
    events: list[bytes] | None = None
    links: list[bytes] | None = None
    status_code = 0
    status_message: str | None = None
    dropped_attributes = 0
    dropped_events = 0
    _context: trace.SpanContext | None = None

    @property
    def sampled(self) -> bool:
        return self.recorder is not None

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_hex}-{self.span_hex}-{'01' if self.recorder else '00'}"

    # -- the Span API -----------------------------------------------------------------------------
    def get_span_context(self) -> trace.SpanContext:
        context = self._context
        if context is None:
            context = self._context = trace.SpanContext(
                int(self.trace_hex, 16),
                int(self.span_hex, 16),
                is_remote=False,
                trace_flags=_SAMPLED if self.recorder else _NOT_SAMPLED,
                trace_state=self.trace_state,
            )
        return context

    def is_recording(self) -> bool:
        return self.recorder is not None and not self.end_ns

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        recorder = self.recorder
        if recorder is None or self.end_ns or value is None:
            return
        self.plain = False
        attributes = self.attributes
        if attributes is None:
            attributes = self.attributes = {}
        elif key not in attributes and len(attributes) >= recorder.max_attributes:
            self.dropped_attributes += 1
            return
        attributes[key] = recorder.limit(value)

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(
        self, name: str, attributes: types.Attributes = None, timestamp: int | None = None
    ) -> None:
        recorder = self.recorder
        if recorder is None or self.end_ns:
            return
        self.plain = False
        events = self.events
        if events is None:
            events = self.events = []
        if len(events) >= recorder.max_events:
            self.dropped_events += 1
            return
        attrs = {k: recorder.limit(v) for k, v in (attributes or {}).items() if v is not None}
        events.append(otlp_wire.event(name, timestamp or _time_ns(), attrs))

    def add_link(self, context: trace.SpanContext, attributes: types.Attributes = None) -> None:
        recorder = self.recorder
        if recorder is None or self.end_ns or not context.is_valid:
            return
        self.plain = False
        links = self.links
        if links is None:
            links = self.links = []
        if len(links) < recorder.max_links:
            state = context.trace_state.to_header() if context.trace_state else None
            links.append(
                otlp_wire.link(
                    context.trace_id.to_bytes(16, "big"),
                    context.span_id.to_bytes(8, "big"),
                    state,
                    attributes,
                    remote=context.is_remote,
                )
            )

    def update_name(self, name: str) -> None:
        if self.recorder is not None and not self.end_ns:
            self.name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self.recorder is None or self.end_ns or self.status_code == 1:  # OK is final
            return
        if isinstance(status, Status):
            code, description = status.status_code, status.description
        else:
            code = status
        if code is StatusCode.UNSET:
            return
        self.plain = False
        self.status_code = _STATUS_CODES[code]
        self.status_message = description if code is StatusCode.ERROR else None

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        if self.recorder is None or self.end_ns:
            return
        module = type(exception).__module__
        qualname = type(exception).__qualname__
        attrs: dict[str, Any] = {
            "exception.type": f"{module}.{qualname}"
            if module and module != "builtins"
            else qualname,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            attrs.update(attributes)
        self.add_event("exception", attrs, timestamp)

    def _escaped(self, exc: BaseException) -> None:
        """An exception escaped the span's block (`__exit__`): recorded as the SDK does."""
        self.record_exception(exc, escaped=True)
        self.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))

    def __repr__(self) -> str:
        return f"RecordedSpan({self.name!r}, trace_id={self.trace_hex}, span_id={self.span_hex})"

    # -- the wire ---------------------------------------------------------------------------------
    def encode(self) -> bytes:
        """The span as OTLP protobuf (a ScopeSpans `spans` field); `_native_encode` first."""
        if _native_encode is not None:
            encoded = _native_encode(self)
            if encoded is not None:
                return encoded
        return self.encode_in_python()

    def encode_in_python(self) -> bytes:
        if self.plain and self.message is not None and self.trace_state is None:
            link_from = self.link_from
            if link_from is None or link_from[2] is None:
                return _encode_plain(self, self.message, link_from)
        attrs = self.base
        if self.message is not None:
            attrs += _message_attributes(self.message, self.start_ns)
        if self.state is not None:
            attrs += otlp_wire.attribute(TASK_STATE, self.state)
        if self.attributes:
            attrs += otlp_wire.span_attributes(self.attributes)
        extra = b""
        if self.events:
            extra += b"".join(self.events)
        if self.link_from is not None:
            trace_hex, span_hex, state = self.link_from
            if state:
                extra += otlp_wire.link(
                    _fromhex(trace_hex), _fromhex(span_hex), state, None, remote=True
                )
            else:  # the usual link to the producer: a fixed-size field
                extra += (
                    _LINK_HEAD + _fromhex(trace_hex) + b"\x12\x08" + _fromhex(span_hex) + _LINK_TAIL
                )
        if self.links:
            extra += b"".join(self.links)
        if self.status_code:
            extra += otlp_wire.status(self.status_code, self.status_message)
        if self.dropped_attributes:
            extra += otlp_wire.dropped(10, self.dropped_attributes)
        if self.dropped_events:
            extra += otlp_wire.dropped(12, self.dropped_events)
        return otlp_wire.span(
            _fromhex(self.trace_hex),
            _fromhex(self.span_hex),
            _fromhex(self.parent_hex),
            self.name,
            self.kind,
            self.start_ns,
            self.end_ns,
            attrs,
            self.trace_state.to_header() if self.trace_state else None,
            self.parent_remote,
            extra,
        )


_REMOTE_LINK = otlp_wire.link(bytes(16), bytes(8), None, None, remote=True)
_LINK_HEAD = _REMOTE_LINK[:4]  # tag, length, trace id tag and length
_LINK_TAIL = _REMOTE_LINK[-5:]  # the flags field

#: span shape -> (struct packing the whole span, its constant parts)
_Shape = tuple[bytes, str, int, bool, bool, bool, int, int, bool, str | None, int]
_plain_shapes: dict[_Shape, tuple[Callable[..., bytes], tuple[bytes, ...]]] = {}


def _encode_plain(
    span: RecordedSpan,
    message: tuple[str, int, int, float | None],
    link_from: tuple[str, str, str | None] | None,
) -> bytes:
    """`RecordedSpan.encode` for a span nothing was added to: one `struct.pack` call.

    Such a span's bytes differ from its siblings' only in fixed-size places (ids, times, the
    queue wait) and in the message id's text; everything else, the length prefix included, is
    the same for every span of its shape, so it is laid out once per shape. Tests check the
    result against the general encoder, byte for byte.
    """
    task_id, retries, delivery_count, sent_at = message
    message_id = task_id.encode("utf-8", "replace")
    parent_hex = span.parent_hex
    shape = (
        span.base,
        span.name,
        span.kind,
        bool(parent_hex),
        span.parent_remote,
        link_from is not None,
        retries,
        delivery_count,
        sent_at is not None,
        span.state,
        len(message_id),
    )
    entry = _plain_shapes.get(shape)
    if entry is None:
        if len(_plain_shapes) >= 4096:
            _plain_shapes.clear()
        entry = _plain_shapes[shape] = _plain_layout(*shape)
    pack, c = entry
    start_ns = span.start_ns
    wait: float | bytes = b""
    if sent_at is not None:
        wait = start_ns / 1e6 - sent_at * 1000.0
        wait = max(wait, 0.0)
    link_trace = link_span = b""
    if link_from is not None:
        link_trace, link_span = _fromhex(link_from[0]), _fromhex(link_from[1])
    return pack(
        c[0], _fromhex(span.trace_hex), c[1], _fromhex(span.span_hex), c[2],
        _fromhex(parent_hex), c[3], start_ns, c[4], span.end_ns, c[5], message_id, c[6], wait,
        c[7], link_trace, c[8], link_span, c[9],
    )  # fmt: skip


def _plain_layout(  # noqa: PLR0917 - the shape tuple, unpacked
    base: bytes,
    name: str,
    kind: int,
    has_parent: bool,
    parent_remote: bool,
    has_link: bool,
    retries: int,
    delivery_count: int,
    has_wait: bool,
    state: str | None,
    message_id_length: int,
) -> tuple[Callable[..., bytes], tuple[bytes, ...]]:
    """The constant parts of one span shape, in `otlp_wire.span`'s field order, and its struct."""
    counts = otlp_wire.attribute(TASK_RETRIES, retries)
    if delivery_count:
        counts += otlp_wire.attribute(DELIVERY_COUNT, delivery_count)
    some_id = "x" * message_id_length  # any text of the same length: only the head is kept
    message_id_head = otlp_wire.attribute(MESSAGE_ID, some_id)[: -message_id_length or None]
    constants = [
        b"\x0a\x10",  # the outer tag and length go in front below
        b"\x12\x08",
        b"\x22\x08" if has_parent else b"",
        otlp_wire.name_and_kind(name, kind) + b"\x39",
        b"\x41",
        base + message_id_head,
        counts + (_QUEUE_WAIT_PREFIX if has_wait else b""),
        (otlp_wire.attribute(TASK_STATE, state) if state is not None else b"")
        + (_LINK_HEAD if has_link else b""),
        b"\x12\x08" if has_link else b"",
        (_LINK_TAIL if has_link else b"")
        + (otlp_wire.REMOTE_FLAGS if parent_remote else otlp_wire.LOCAL_FLAGS),
    ]
    sizes = [16, 8, 8 if has_parent else 0, 8, 8, message_id_length, 8 if has_wait else 0]
    sizes += [16 if has_link else 0, 8 if has_link else 0]
    body = sum(len(part) for part in constants) + sum(sizes)
    constants[0] = b"\x12" + otlp_wire.varint(body) + constants[0]
    holes = ["16s", "8s", f"{sizes[2]}s", "Q", "Q", f"{message_id_length}s"]
    holes += ["d" if has_wait else "0s", f"{sizes[7]}s", f"{sizes[8]}s"]
    layout = "<" + "".join(f"{len(constants[i])}s{holes[i]}" for i in range(9))
    layout += f"{len(constants[9])}s"
    return struct.Struct(layout).pack, tuple(constants)


class SpanRecorder:
    """Queues ended spans and exports them in batches from a background thread.

    The queue is a deque (append and popleft are atomic, so `record` takes no lock); when it holds
    `max_queue` spans, new ones are dropped and counted, as the SDK's batch processor does. After a
    fork the child starts with an empty queue and its own thread (the parent exports what it had).
    """

    def __init__(
        self,
        send: Callable[[bytes, float], bool],
        resource_attributes: Mapping[str, Any],
        scope_version: str,
        *,
        sampler: Sampler,
        max_queue: int = 2048,
        batch_size: int = 512,
        delay: float = 5.0,
        export_timeout: float = 30.0,
        max_attributes: int = 128,
        max_events: int = 128,
        max_links: int = 128,
        max_attribute_length: int | None = None,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self._send = send
        self._resource, self._scope = otlp_wire.resource_prefix(
            resource_attributes, "millpond", scope_version
        )
        self.sample = sampler
        #: the sampler keeps exactly the spans whose parent was sampled (the parent-based ones):
        #: a span with a parent needs no call
        self.follows_parent: bool = getattr(sampler, "follows_parent", False)
        self.max_queue = max_queue
        self.batch_size = max(1, min(batch_size, max_queue))
        self.delay = delay
        self.export_timeout = export_timeout
        self.max_attributes = max_attributes
        self.max_events = max_events
        self.max_links = max_links
        self.max_attribute_length = max_attribute_length
        self._on_error = on_error
        self.dropped = 0
        self.exported = 0
        self.failed = 0
        self._stopped = False
        self._reset()
        # Through a weak reference: a process that makes many recorders (tests) does not keep
        # every one alive in its fork and exit hooks.
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _call(ref, "_reset"))
        atexit.register(_call, ref, "shutdown")

    def _reset(self) -> None:
        self._queue: deque[RecordedSpan | bytes] = deque()
        self._wake = threading.Event()
        self._export_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        #: (queue, batch size) while the export thread runs: the C part appends a span that does
        #: not fill a batch to the queue itself, and calls `record` for anything else
        self._fast_queue: tuple[deque[RecordedSpan | bytes], int] | None = None

    def limit(self, value: Any) -> Any:
        """An attribute value cut to OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT, like the SDK does."""
        limit = self.max_attribute_length
        if limit is None:
            return value
        if isinstance(value, str):
            return value[:limit]
        if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
            return [v[:limit] if isinstance(v, str) else v for v in value]
        return value

    # -- the hot path -----------------------------------------------------------------------------
    def record(self, span: RecordedSpan | bytes) -> None:
        """Queue an ended span for export: the span, or (from the C part) its OTLP bytes."""
        queue = self._queue
        if len(queue) >= self.max_queue:
            self.dropped += 1
            if self.dropped == 1 or not self.dropped % 10_000:
                self._report(
                    f"span queue full ({self.max_queue} spans): {self.dropped} spans dropped so "
                    "far; raise OTEL_BSP_MAX_QUEUE_SIZE or check the collector"
                )
            return
        queue.append(span)
        if self._thread is None:
            self._start()
        elif len(queue) >= self.batch_size and not self._wake.is_set():
            self._wake.set()

    # -- the export thread ------------------------------------------------------------------------
    def _start(self) -> None:
        if self._stopped:
            return
        thread = threading.Thread(target=self._run, name="millpond-span-export", daemon=True)
        self._thread = thread
        thread.start()
        self._fast_queue = (self._queue, self.batch_size)

    def _run(self) -> None:
        wake = self._wake
        while not self._stopped:
            batch_full = wake.wait(self.delay)
            wake.clear()
            # Woken by a full batch: send full batches only. Sending whatever arrived meanwhile
            # too would post a request every few spans under load, at a fixed cost per request.
            self._export_queued(full_batches_only=batch_full)

    def _export_queued(
        self, deadline: float | None = None, *, full_batches_only: bool = False
    ) -> bool:
        """Export what is queued, a batch at a time; False if a batch failed or time ran out."""
        ok = True
        minimum = self.batch_size if full_batches_only else 1
        with self._export_lock:
            queue = self._queue
            popleft = queue.popleft
            while len(queue) >= minimum:
                batch: list[bytes] = []
                try:
                    for _ in range(min(len(queue), self.batch_size)):
                        item = popleft()
                        batch.append(item if isinstance(item, bytes) else item.encode())
                except Exception as exc:  # a bad attribute value: lose this batch, say so
                    self.failed += len(batch)
                    self._report(f"could not encode spans: {type(exc).__name__}: {exc}")
                    ok = False
                    continue
                timeout = self.export_timeout
                if deadline is not None:
                    timeout = min(timeout, deadline - time.monotonic())
                    if timeout <= 0:
                        self.failed += len(batch)
                        return False
                try:
                    sent = self._send(
                        otlp_wire.request(self._resource, self._scope, batch), timeout
                    )
                except Exception as exc:  # the transport's bug: keep the thread, say what it was
                    self._report(f"export failed: {type(exc).__name__}: {exc}")
                    sent = False
                if sent:
                    self.exported += len(batch)
                else:
                    self.failed += len(batch)
                    self._report(f"could not export {len(batch)} spans")
                    ok = False
        return ok

    def _report(self, message: str) -> None:
        if self._on_error is not None:
            self._on_error(message)

    # -- flushing ---------------------------------------------------------------------------------
    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Export every span ended so far, in the calling thread (a prefork child before exit)."""
        return self._export_queued(time.monotonic() + timeout_millis / 1000.0)

    def shutdown(self, timeout_millis: int = 30_000) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._fast_queue = None
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_millis / 1000.0)
        self.force_flush(timeout_millis)


def _call(ref: weakref.ref[SpanRecorder], method: str) -> None:
    recorder = ref()
    if recorder is not None:
        getattr(recorder, method)()
