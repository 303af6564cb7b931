"""What an app's clients offer: `app.control`, as the `millpond.clients` plugin provides it.

The core cannot import the control plane's classes (millpond-control depends on the core), yet
`app.control.revoke(...)` should be checked like any typed call. So the core states here, as
Protocols, what Celery's `app.control` offers and users call; millpond-control's `Control` and
`Inspect` satisfy them (its tests check that with mypy), and `Millpond.control` is typed with
`ControlClient`. Every call returns the workers' replies, `[{node: reply}, ...]` (None when not
asked for with `reply=True`); `Inspect` methods merge them into `{node: reply}`, None when no
worker answered in time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

#: what a control call returns: one `{node: reply}` per answering worker, or None (no reply asked)
Replies = list[dict[str, Any]] | None


class InspectClient(Protocol):
    """`app.control.inspect()`: Celery's `Inspect`; each method returns `{node: reply}` or None."""

    def ping(self) -> dict[str, Any] | None: ...
    def stats(self) -> dict[str, Any] | None: ...
    def active(self, safe: bool = False) -> dict[str, Any] | None: ...
    def reserved(self) -> dict[str, Any] | None: ...
    def scheduled(self) -> dict[str, Any] | None: ...
    def registered(self, *taskinfoitems: str) -> dict[str, Any] | None: ...
    def active_queues(self) -> dict[str, Any] | None: ...
    def revoked(self) -> dict[str, Any] | None: ...
    def conf(self, with_defaults: bool = False) -> dict[str, Any] | None: ...
    def query_task(self, *ids: str) -> dict[str, Any] | None: ...
    def report(self) -> dict[str, Any] | None: ...


class ControlClient(Protocol):
    """`app.control`: Celery's remote-control API (docs/control.md)."""

    def inspect(
        self, destination: Sequence[str] | None = None, timeout: float = 1.0
    ) -> InspectClient: ...

    def broadcast(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        destination: Sequence[str] | None = None,
        reply: bool = False,
        timeout: float = 1.0,
        limit: int | None = None,
        pattern: str | None = None,
        matcher: str | None = None,
    ) -> Replies: ...

    def ping(
        self, destination: Sequence[str] | None = None, timeout: float = 1.0
    ) -> list[dict[str, Any]]: ...

    def revoke(
        self,
        task_id: str | Sequence[str],
        *,
        destination: Sequence[str] | None = None,
        terminate: bool = False,
        signal: str = "SIGTERM",
        reply: bool = False,
        timeout: float = 1.0,
    ) -> Replies: ...

    def terminate(
        self, task_id: str | Sequence[str], signal: str = "SIGTERM", **options: Any
    ) -> Replies: ...

    def revoke_by_stamped_headers(self, headers: Mapping[str, Any], **options: Any) -> Replies: ...

    def shutdown(
        self, destination: Sequence[str] | None = None, reply: bool = False, timeout: float = 1.0
    ) -> Replies: ...

    def pool_grow(self, n: int = 1, **options: Any) -> Replies: ...
    def pool_shrink(self, n: int = 1, **options: Any) -> Replies: ...

    def time_limit(
        self, task_name: str, soft: float | None = None, hard: float | None = None, **options: Any
    ) -> Replies: ...

    def rate_limit(
        self, task_name: str, rate_limit: str | float | None, **options: Any
    ) -> Replies: ...

    def add_consumer(self, queue: str, **options: Any) -> Replies: ...
    def cancel_consumer(self, queue: str, **options: Any) -> Replies: ...
    def close(self) -> None: ...
