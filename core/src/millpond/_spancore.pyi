"""The traced task path in C (`_spancore.c`); see `millpond.span_recorder`."""

from collections.abc import Callable
from contextlib import AbstractContextManager
from contextvars import ContextVar
from typing import Any, Self

class SpanCore:
    recorder: Any
    trace_hex: str
    span_hex: str
    parent_hex: str
    name: str
    base: bytes
    message: tuple[str, int, int, float | None] | None
    trace_state: Any
    link_from: tuple[str, str, str | None] | None
    state: str | None
    start_ns: int
    end_ns: int
    kind: int
    parent_remote: bool
    plain: bool
    def __init__(
        self,
        recorder: Any,
        trace_hex: str,
        parent_hex: str,
        name: str,
        kind: int,
        base: bytes,
        message: tuple[str, int, int, float | None] | None,
        parent_remote: bool = False,
        trace_state: Any = None,
        link_from: tuple[str, str, str | None] | None = None,
    ) -> None: ...
    def end(self, end_time: int | None = None) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None: ...

def configure(
    *,
    span_type: type[SpanCore],
    recorder: Any,
    process_shapes: dict[Any, tuple[bytes, str]],
    run_shapes: dict[str, tuple[bytes, str]],
    sampler: Callable[[bool | None, str], bool],
    follows_parent: bool,
    link_only: bool,
    otel_variable: ContextVar[Any] | None,
    otel_key: str | None,
    otel_context: Callable[[dict[str, Any]], Any],
    log_variables: tuple[ContextVar[Any], ...] | None,
    module_dict: dict[str, Any],
    not_traced: AbstractContextManager[None],
    start_fallback: Callable[[Any, str], None],
    run_fallback: Callable[[Any], AbstractContextManager[Any]],
    end_fallback: Callable[[Any, Any], None],
) -> None: ...
def configure_wire(
    message_id: bytes, retries: bytes, delivery_count: bytes, queue_wait: bytes, state: bytes
) -> None: ...
def start_process_span(job: Any, pool_name: str) -> None: ...
def enter_run_span(job: Any) -> AbstractContextManager[Any]: ...
def end_process_span(job: Any, outcome: Any) -> None: ...
def encode(span: object) -> bytes | None: ...
