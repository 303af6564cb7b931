"""Tasks that can wait for the database transaction to commit before they are sent.

A task sent inside `transaction.atomic()` may start before the row it reads is committed (and
find nothing), or be sent for a change that is then rolled back. `delay_on_commit` hands the send
to Django's `transaction.on_commit`: it happens once the outermost transaction commits, never if
it rolls back, and at once when no transaction is open (autocommit).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from django.db import transaction

from millpond.produce.task import Task

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class DjangoTask(Task[P, R_co]):
    """A millpond task with `delay_on_commit` / `apply_async_on_commit`; typed like `Task`
    (`DjangoMillpond.task` returns `DjangoTask[P, R]`, so a type checker sees both methods and
    checks `delay_on_commit`'s arguments against the function's)."""

    def delay_on_commit(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """`delay(*args, **kwargs)` once the current transaction commits.

        Returns nothing: the task id does not exist before the commit (pass `task_id=` to
        `apply_async_on_commit` if the caller needs to know it now)."""
        self.apply_async_on_commit(args, kwargs)

    def apply_async_on_commit(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        using: str | None = None,
        **options: Any,
    ) -> None:
        """`apply_async(args, kwargs, **options)` once the transaction of the `using` database
        (the default one, if not given) commits; nothing is sent if it rolls back."""
        # the arguments are copied now: a caller mutating its list before the commit must not
        # change what is sent
        frozen_args = tuple(args or ())
        frozen_kwargs = dict(kwargs or {})

        def send() -> None:
            self.apply_async(frozen_args, frozen_kwargs, **options)

        transaction.on_commit(send, using=using)


class BoundDjangoTaskDecorator(Protocol):
    """What `@app.task(bind=True, ...)` of a `DjangoMillpond` returns (see `BoundTaskDecorator`
    for why it is a Protocol and the first parameter is matched as `Task[P, Any]`)."""

    def __call__(self, fn: Callable[Concatenate[Task[P, Any], P], R], /) -> DjangoTask[P, R]: ...
