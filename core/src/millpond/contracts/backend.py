"""The result-backend contract: where task outcomes are stored and waited for, in Celery's layout
(`celery-task-meta-<id>` as JSON), so Celery clients and millpond read each other's results.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from millpond.exceptions import NotSupported
from millpond.states import TaskState

if TYPE_CHECKING:
    from millpond.contracts.broker import Broker


#: what is stored of a `ResultMeta`, in Celery's order
_STORED = ("status", "result", "traceback", "children", "date_done", "task_id", "name", "retries")


@dataclass(slots=True)
class ResultMeta:
    """A task's stored outcome (a failure's `result` is Celery's `{"exc_type", "exc_message",
    "exc_module"}`); `reply_to`, not stored, is the message's, for a `replies_to_caller` backend."""

    task_id: str
    status: TaskState | str
    result: Any = None
    traceback: str | None = None
    date_done: str | None = None
    name: str | None = None
    retries: int = 0
    children: list[Any] = field(default_factory=list)
    reply_to: str | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in _STORED}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ResultMeta:
        return cls(
            task_id=str(data.get("task_id", "")),
            status=str(data.get("status", TaskState.PENDING)),
            result=data.get("result"),
            traceback=data.get("traceback"),
            date_done=data.get("date_done"),
            name=data.get("name"),
            retries=int(data.get("retries") or 0),
            children=list(data.get("children") or []),
        )


class ResultBackend(ABC):
    """Stores task outcomes and lets callers wait for them (chosen through `millpond.backends`)."""

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        self.url = url
        self.options: Mapping[str, Any] = dict(options or {})

    @abstractmethod
    def store(self, meta: ResultMeta) -> None:
        """Save an outcome (replacing an earlier state of the same task) and wake its waiters. A
        result it cannot encode raises TypeError or ValueError (the worker stores why instead)."""

    @abstractmethod
    def get(self, task_id: str, timeout: float | None) -> ResultMeta | None:
        """Wait until the task is ready or `timeout` passes (None: forever), woken by its completion
        (pub/sub, blocking pop), not polling; the newest meta, ready or not (None: none stored)."""

    @abstractmethod
    def peek(self, task_id: str) -> ResultMeta | None:
        """The stored meta right now, without waiting."""

    @abstractmethod
    def forget(self, task_id: str) -> None: ...

    def close(self) -> None: ...  # noqa: B027 - optional hook

    #: whether each result goes back over the broker to the process that sent the task (Celery's
    #: rpc://), not into a store any process reads: `bind_broker` and `reply_to` set that up
    replies_to_caller: ClassVar[bool] = False

    def bind_broker(self, broker: Broker) -> None:  # noqa: B027 - optional hook
        """The app's broker, which results travel over, right after the backend is created."""

    def reply_to(self, task_id: str) -> str | None:
        """Where the worker is to send a kept result (the message's `reply_to`, as Celery reads it),
        declared and listened to before the task is sent; None: unset."""
        return None

    #: whether this backend joins chord headers itself (`set_chord_size`, `chord_part_return`)
    supports_chords: ClassVar[bool] = False

    def set_chord_size(self, group_id: str, size: int) -> None:
        """Before a chord's header is sent: how many results the join waits for; again for the
        same group id (the chord sent again), a new join."""
        raise NotSupported(f"{type(self).__name__} cannot join chords")

    def chord_part_return(
        self, group_id: str, task_id: str, index: int | None, state: str, result: Any
    ) -> list[ChordPart] | None:
        """Record one header task's outcome (its value, or Celery's exception dict), once however
        often returned. The one caller completing the chord gets every part in header order (others
        None), claiming the join atomically for `CHORD_CLAIM_TTL` unless `chord_done` ends it; a
        lapsed claim (its worker died before sending the body) passes to the next caller."""
        raise NotSupported(f"{type(self).__name__} cannot join chords")

    def chord_done(self, group_id: str) -> None:
        """The body was sent (or the chord failed): later returns of its parts are ignored."""
        raise NotSupported(f"{type(self).__name__} cannot join chords")

    def chord_claim_expires(self, group_id: str) -> float | None:
        """When (epoch) the claim of a complete, claimed, not done join lapses, else None: a
        redelivered header task that finds it claimed waits until then and returns its part."""
        raise NotSupported(f"{type(self).__name__} cannot join chords")

    def chord_release(self, group_id: str) -> None:
        """The claimant could not send the body: end its claim, so the next part returned (its
        redelivered header task) completes the join again."""
        raise NotSupported(f"{type(self).__name__} cannot join chords")

    def save_group(self, group_id: str, value: Any) -> None:
        """Store a group's result tuple (`GroupResult.save`)."""
        raise NotSupported(f"{type(self).__name__} cannot save groups")

    def restore_group(self, group_id: str) -> Any:
        """The result tuple saved for `group_id`, or None."""
        raise NotSupported(f"{type(self).__name__} cannot restore groups")

    def forget_group(self, group_id: str) -> None:
        raise NotSupported(f"{type(self).__name__} cannot forget groups")


#: one returned header part of a chord: (task id, state, result or Celery's exception dict)
ChordPart = tuple[str, str, Any]
#: seconds a chord's join stays claimed by the worker that completed it, unless it says it is done
CHORD_CLAIM_TTL = 30.0
