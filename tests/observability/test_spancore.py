"""The C part of the traced task path (`millpond._spancore`) against the Python code it stands for.

Every fast path hands anything unusual back to Python, so each test puts the same input through
the C path and the Python one and compares what comes out: bytes on the wire, span fields, the
job's trace context. The whole tracing suite also runs once more with MILLPOND_PURE_PYTHON=1
(`dev.py test`), so both implementations pass the same behaviour tests.
"""

from __future__ import annotations

import math
import os
import shutil
import sysconfig
import uuid
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from millpond import otlp_wire, span_recorder, telemetry
from millpond.pool import Job
from millpond.span_recorder import RecordedSpan, SpanRecorder

from .test_span_recorder import PARENT, TRACE, Capture, make_recorder, span


def test_the_c_part_is_built_where_a_compiler_is() -> None:
    """An editable or wheel install compiles it; should that quietly fail, this says so."""
    if os.environ.get("MILLPOND_PURE_PYTHON"):
        assert not span_recorder.NATIVE
        return
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip("no C compiler here: millpond runs in pure Python")
    assert span_recorder.NATIVE, "millpond._spancore was not built: pip install -e core"


def test_worker_processes_use_what_this_session_uses(obs_env: dict[str, str]) -> None:
    """The subprocess workers of the tracing tests run the C part exactly when this process
    does, so the pure-Python session checks the multi-pool trace tree in pure Python too."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", "import millpond.span_recorder as r; print(r.NATIVE)"],
        env=obs_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == str(span_recorder.NATIVE)


@pytest.fixture
def native() -> ModuleType:
    module = span_recorder.native_module()
    if module is None:
        pytest.skip("the C part is not in use (MILLPOND_PURE_PYTHON, or not built)")
    return module


@pytest.fixture
def recorder() -> Iterator[SpanRecorder]:
    rec = make_recorder(Capture())
    yield rec
    rec.shutdown()


# -- the wire ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("retries", "delivery_count", "sent_at"),
    [(0, 0, None), (-1, 1, 1.5), (2**62, 300, 1e9), (127, 128, 0.0), (5, 2**40, -3.0)],
)
def test_the_c_encoder_writes_the_python_encoders_bytes(
    native: ModuleType, recorder: SpanRecorder, retries: int, delivery_count: int, sent_at: Any
) -> None:
    for name, task_id, state in [
        ("run t", "id", None),
        ("prøcess q" * 40, "ü" * 100, "FAILURE"),
        ("", "", "SUCCESS"),
    ]:
        s = span(recorder, name=name, message=(task_id, retries, delivery_count, sent_at))
        s.state = state
        s.end_ns = s.start_ns + 1
        encoded = native.encode(s)
        assert encoded is not None
        assert encoded == s.encode_in_python()  # the struct path for plain spans
        s.plain = False
        assert encoded == s.encode_in_python()  # the general encoder
        request = ExportTraceServiceRequest()
        request.ParseFromString(otlp_wire.request(b"", b"", [encoded]))
        assert request.resource_spans[0].scope_spans[0].spans[0].name == name


def test_what_the_c_encoder_does_not_know_goes_to_python(
    native: ModuleType, recorder: SpanRecorder
) -> None:
    unusual: list[dict[str, Any]] = [
        {"message": ("lone \udc80 surrogate", 0, 0, None)},  # Python writes U+FFFD
        {"message": ("id", 2**70, 0, None)},  # past int64
        {"message": ("id", 0, 0, 5)},  # an int send time
        {"message": None},
        {"trace_state": trace.TraceState([("k", "v")])},
        {"link_from": (TRACE, PARENT, "k=v")},
        {"trace_hex": TRACE.upper()},
    ]
    for fields in unusual:
        s = span(recorder, **fields)
        s.end_ns = s.start_ns + 1
        assert native.encode(s) is None, fields
        assert s.encode() == s.encode_in_python()  # and the span is still exported
    s = span(recorder)
    s.set_attribute("user", "value")
    assert native.encode(s) is None
    assert native.encode(object()) is None


def test_a_nan_queue_wait_is_written_as_python_would(native: ModuleType) -> None:
    s = span(None, message=("id", 0, 0, math.nan))
    assert native.encode(s) == s.encode_in_python()


# -- spans --------------------------------------------------------------------------------------------
def test_a_span_ends_once_and_reports_an_escaping_exception(recorder: SpanRecorder) -> None:
    recorded: list[RecordedSpan | bytes] = []
    recorder.record = recorded.append  # type: ignore[method-assign]
    s = span(recorder)
    s.end(end_time=42)
    s.end()
    assert s.end_ns == 42 and len(recorded) == 1
    # the C part hands a plain span over as its bytes, written at once; Python, as itself
    assert recorded[0] == (s.encode_in_python() if span_recorder.NATIVE else s)
    with pytest.raises(ValueError, match="boom"), span(recorder) as failing:
        raise ValueError("boom")
    assert recorded[-1] is failing and failing.status_code == 2  # ERROR: encoded later
    assert failing.events is not None and len(failing.events) == 1
    with pytest.raises(TypeError):
        s.end(1, 2)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        RecordedSpan(None, TRACE)  # type: ignore[call-arg]


def test_ids_are_fresh_hex_and_a_forked_child_draws_other_ones() -> None:
    ids = {span(None).span_hex for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 16 and int(i, 16) for i in ids)
    if not hasattr(os, "fork"):
        return
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, then out without running the test session's hooks
        os.write(write, " ".join(span(None).span_hex for _ in range(8)).encode())
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    child = os.read(read, 4096).decode().split()
    os.close(read)
    assert status == 0 and len(child) == 8
    assert not set(child) & {span(None).span_hex for _ in range(8)}


# -- the task path --------------------------------------------------------------------------------------
def _job(traceparent: str | None, tracestate: str | None = None) -> Job:
    job = Job(uuid.uuid4().hex, "spancore.task", (), {}, queue="q", sent_at=1.5)
    job.producer_traceparent = traceparent
    job.producer_tracestate = tracestate
    return job


def _opened(job: Job) -> tuple[Any, ...]:
    """What a started job carries, with the new ids replaced by their length."""
    s = job.span
    assert isinstance(s, RecordedSpan) and job.traceparent is not None
    return (
        s.recorder is not None,
        s.trace_hex if s.parent_hex else len(s.trace_hex),
        s.parent_hex,
        s.parent_remote,
        s.link_from,
        s.name,
        s.kind,
        s.base,
        s.message,
        s.trace_state,
        job.traceparent[:3] + job.traceparent[35:36] + job.traceparent[52:],
        job.traceparent[3:35] == s.trace_hex and job.traceparent[36:52] == s.span_hex,
        job.tracestate,
    )


PRODUCER = f"00-{TRACE}-{PARENT}-01"


@pytest.mark.parametrize(
    ("traceparent", "tracestate"),
    [
        (None, None),
        ("", None),
        (PRODUCER, None),
        (PRODUCER[:-1] + "0", None),  # not sampled
        (PRODUCER[:-1] + "3", None),  # sampled, another flag set
        (f"00-{'0' * 32}-{PARENT}-01", None),  # invalid ids: a new trace
        (PRODUCER.upper().replace("0X", "0x"), None),  # upper case: the rules decide
        (f"01-{TRACE}-{PARENT}-01-future", None),  # a later version
        ("garbage", None),
        (PRODUCER, "vendor=1"),
    ],
)
@pytest.mark.parametrize("parenting", ["parent", "link"])
@pytest.mark.parametrize("sampler", ["parentbased_always_on", "always_on", "always_off"])
def test_the_c_process_span_is_the_python_one(
    native: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
    traceparent: str | None,
    tracestate: str | None,
    parenting: str,
    sampler: str,
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
    rec = make_recorder(Capture(), sampler=span_recorder.sampler_from_env())
    previous = telemetry.PROCESS_PARENTING
    try:
        telemetry.PROCESS_PARENTING = parenting
        telemetry.use_recorder(rec)
        assert telemetry.start_process_span is native.start_process_span
        fast, slow = _job(traceparent, tracestate), _job(traceparent, tracestate)
        slow.task_id = fast.task_id
        telemetry.start_process_span(fast, "solo")  # fills the shape cache when it must
        telemetry._start_process_span(slow, "solo")
        assert _opened(fast) == _opened(slow)
        again = _job(traceparent, tracestate)
        again.task_id = fast.task_id
        assert native.start_process_span(again, "solo") is None  # the cache is warm now
        assert _opened(again) == _opened(slow)
    finally:
        telemetry.PROCESS_PARENTING = previous
        telemetry.use_recorder(None)
        rec.shutdown()


def test_the_c_run_span_is_current_with_its_ids_in_the_log_context(
    native: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    import contextvars

    import structlog

    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)  # parent-based: 00 is not sampled
    rec = make_recorder(Capture(), sampler=span_recorder.sampler_from_env())
    telemetry.use_recorder(rec)
    assert telemetry.enter_run_span is native.enter_run_span
    fallen_back: list[Job] = []
    python_enter = telemetry._enter_run_span

    def python_path(job: Job) -> Any:
        fallen_back.append(job)
        return python_enter(job)

    monkeypatch.setattr(telemetry, "_enter_run_span", python_path)
    telemetry._configure_native()

    def enter(job: Job) -> tuple[Any, Any, dict[str, Any]]:
        made = native.enter_run_span(job)
        return made, trace.get_current_span(), structlog.contextvars.get_contextvars()

    previous = telemetry.TRACING
    telemetry.TRACING = True
    try:
        for flags in ("01", "00"):
            job = _job(f"00-{TRACE}-{PARENT}-{flags}")
            telemetry.start_process_span(job, "solo")
            for _first_python_then_c in range(2):
                made, current, bound = contextvars.Context().run(enter, job)
                assert current is made
                assert bound == {"trace_id": TRACE, "span_id": made.span_hex}
                if flags == "00":  # not sampled: the process span carries the context
                    assert made is job.span
                    continue
                assert fallen_back == [job]  # the first time only: then the C part knows it
                assert made.parent_hex == job.span.span_hex and made.trace_hex == TRACE
                assert (made.name, made.kind, made.message) == (
                    "run spancore.task",
                    otlp_wire.KIND_INTERNAL,
                    (job.task_id, 0, 0, None),
                )
        no_context = _job(None)
        assert native.enter_run_span(no_context) is telemetry._NOT_TRACED
        telemetry.TRACING = False
        assert native.enter_run_span(job) is telemetry._NOT_TRACED
    finally:
        telemetry.TRACING = previous
        monkeypatch.undo()
        telemetry.use_recorder(None)
        rec.shutdown()


def test_the_c_process_span_ends_a_success_and_hands_the_rest_to_python(
    native: ModuleType,
) -> None:
    from millpond.pool import Outcome

    capture = Capture()
    rec = make_recorder(capture)
    telemetry.use_recorder(rec)
    try:
        assert telemetry.end_process_span is native.end_process_span
        ended = {}
        for state in ("SUCCESS", "FAILURE", "RETRY"):
            job = _job(PRODUCER)
            telemetry.start_process_span(job, "solo")
            process = job.span
            native.end_process_span(job, Outcome(state=state, exc_type="E", exc_message="m"))
            assert job.span is None and process.end_ns and process.state == state
            ended[state] = process
        native.end_process_span(_job(None), Outcome(state="SUCCESS"))  # no span: nothing
        assert ended["SUCCESS"].plain and not ended["FAILURE"].plain  # error status: Python's
        assert ended["RETRY"].events  # the retry event
        assert rec.force_flush()
        states = {
            next(
                kv.value.string_value for kv in s.attributes if kv.key == "millpond.task.state"
            ): s.status.code
            for s in capture.spans()
        }
        assert states == {"SUCCESS": 0, "FAILURE": 2, "RETRY": 0}  # UNSET, ERROR, UNSET
    finally:
        telemetry.use_recorder(None)
        rec.shutdown()
