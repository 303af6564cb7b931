"""Canvas: signatures, and the chains, groups and chords built from them, in Celery's wire format.

    from millpond import chain, chord, group

    (add.s(2, 2) | add.s(4) | add.s(8))()               # a chain: each result feeds the next
    group(add.s(i, i) for i in range(10))()               # a group: run in parallel
    chord(add.s(i, i) for i in range(10))(tsum.s())      # a chord: a group, then one body

A `Signature` is a dict with Celery's keys (`task`, `args`, `kwargs`, `options`, `subtask_type`,
`immutable`), so it travels inside a message exactly as Celery's does: a Celery worker runs the
canvases millpond sends, and a millpond worker runs Celery's (`millpond_canvas.steps`).

How each kind travels (protocol v2, the body's third element):

* a task's `link` / `link_error` become the message's `callbacks` / `errbacks`: signatures sent
  when the task succeeds (with its result prepended to their arguments) or fails;
* a chain sends its first task with `chain`, the list of the remaining steps *reversed*: the worker
  that finishes a step sends the last element with the rest of the list;
* a group sends each task with the headers `group` (the group id) and `group_index`;
* a chord sends its header as a group whose every task carries `chord`, the body's signature; the
  result backend counts the header's results (`set_chord_size`, `chord_part_return`) and the worker
  that returns the last part sends the body with the header's results, once.

Every step gets its task id when the canvas is sent (`freeze`), so the caller's result handles,
`AsyncResult.parent` and `GroupResult`, name the tasks that will run.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import structlog

from millpond.contracts.backend import ResultBackend
from millpond.exceptions import MillpondError
from millpond.produce.result import AsyncResult
from millpond.produce.task import SEND_OPTIONS
from millpond_canvas.results import GroupResult

if TYPE_CHECKING:
    from millpond.produce.app import Millpond
    from millpond.produce.task import Task

R = TypeVar("R")

#: options Celery's producers put on signatures that mean nothing to a millpond producer: the
#: message goes out the same without them (routing is by queue)
INERT_KEYS = frozenset(
    {
        "add_to_parent",
        "retry",
        "retry_policy",
        "serializer",
        "compression",
        "stamped_headers",
        "stamps",
        "shadow",
        "exchange",
        "routing_key",
        "mandatory",
        "delivery_mode",
        "publisher",
        "producer",
        "connection",
        "router",
        "replaced_task_nesting",
    }
)


class CanvasError(MillpondError):
    """A canvas cannot be sent as built (a signature without a task or an app, say)."""


class Signature(dict[str, Any], Generic[R]):
    """One task call, not made yet: the task's name, arguments and options."""

    #: subclasses by `subtask_type`, for `from_dict`
    TYPES: ClassVar[dict[str, type[Signature[Any]]]] = {}
    kind: ClassVar[str | None] = None

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.kind:
            Signature.TYPES[cls.kind] = cls

    def __init__(
        self,
        task: str | Task[..., R],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        subtask_type: str | None = None,
        immutable: bool = False,
        app: Millpond | None = None,
    ) -> None:
        name = task if isinstance(task, str) else task.name
        if app is None and not isinstance(task, str):
            app = task.app
        super().__init__(
            task=name,
            args=list(args),
            kwargs=dict(kwargs or {}),
            options=dict(options or {}),
            subtask_type=subtask_type if subtask_type is not None else self.kind,
            immutable=bool(immutable),
        )
        self.app: Millpond | None = app

    # -- the dict's fields -----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self["task"])

    @property
    def args(self) -> list[Any]:
        return self["args"]  # type: ignore[no-any-return]

    @property
    def kwargs(self) -> dict[str, Any]:
        return self["kwargs"]  # type: ignore[no-any-return]

    @property
    def options(self) -> dict[str, Any]:
        return self["options"]  # type: ignore[no-any-return]

    @property
    def immutable(self) -> bool:
        return bool(self.get("immutable"))

    @property
    def subtask_type(self) -> str | None:
        return self.get("subtask_type")

    @property
    def id(self) -> str | None:
        """The task id, once frozen."""
        return self.options.get("task_id")

    def __repr__(self) -> str:
        args = ", ".join([*map(repr, self.args), *(f"{k}={v!r}" for k, v in self.kwargs.items())])
        return f"{self.name}({args}){'!' if self.immutable else ''}"

    # -- building ----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], app: Millpond | None = None) -> Signature[Any]:
        """The signature a dict (from a message, or Celery's JSON) stands for."""
        if isinstance(data, Signature):
            if app is not None and data.app is None:
                data.app = app
            return data
        if not isinstance(data, Mapping) or not isinstance(data.get("task"), str):
            raise CanvasError(f"not a signature (a dict with a 'task' name): {data!r:.200}")
        kind = data.get("subtask_type")
        target = cls.TYPES.get(kind) if kind else None
        if target is not None:
            return target._from_fields(data, app)
        return Signature(
            data["task"],
            data.get("args") or (),
            data.get("kwargs") or {},
            data.get("options") or {},
            subtask_type=kind,
            immutable=bool(data.get("immutable")),
            app=app,
        )

    @classmethod
    def _from_fields(cls, data: Mapping[str, Any], app: Millpond | None) -> Signature[Any]:
        raise NotImplementedError  # every registered kind rebuilds itself

    def clone(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> Signature[R]:
        """A copy with `args` prepended, `kwargs` and `options` merged (arguments are left alone
        on an immutable signature)."""
        merged_args, merged_kwargs, merged_options = self._merge(args, kwargs, options)
        return Signature.from_dict(
            {
                "task": self.name,
                "args": merged_args,
                "kwargs": merged_kwargs,
                "options": _copy_options(merged_options),
                "subtask_type": self.subtask_type,
                "immutable": self.immutable,
            },
            self.app,
        )

    def _merge(
        self, args: Sequence[Any], kwargs: Mapping[str, Any] | None, options: Mapping[str, Any]
    ) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
        merged_options = {**self.options, **options}
        if self.immutable:
            return list(self.args), dict(self.kwargs), merged_options
        return [*args, *self.args], {**self.kwargs, **(kwargs or {})}, merged_options

    def set(self, *, immutable: bool | None = None, **options: Any) -> Signature[R]:
        """Set options (queue, countdown, ...) in place; returns the signature for chaining."""
        if immutable is not None:
            self.set_immutable(immutable)
        self.options.update(options)
        return self

    def set_immutable(self, immutable: bool) -> None:
        self["immutable"] = immutable

    def link(self, callback: Signature[Any]) -> Signature[Any]:
        """Send `callback` with this task's result when it succeeds."""
        self.options.setdefault("link", []).append(callback)
        return callback

    def link_error(self, errback: Signature[Any]) -> Signature[Any]:
        """Run `errback` when this task fails: an errback task that takes three arguments
        `(request, exc, traceback)` is called in the worker that saw the failure, as Celery does;
        one that takes one is sent with the failed task's id."""
        self.options.setdefault("link_error", []).append(errback)
        return errback

    # `|` chains, as in Celery (a Signature is a dict, whose `|` merges: not what a canvas means)
    def __or__(self, other: Signature[Any]) -> chain:  # type: ignore[override]
        if not isinstance(other, Signature):
            return NotImplemented
        return chain(self, other)

    # -- sending -----------------------------------------------------------------------------------
    def freeze(
        self,
        _id: str | None = None,
        group_id: str | None = None,
        chord: Signature[Any] | None = None,
        root_id: str | None = None,
        parent_id: str | None = None,
        group_index: int | None = None,
    ) -> AsyncResult[R]:
        """Give the signature its task id now (and its place in a group or chord), and the queue
        this app would send it to: a worker that sends the step later (the next step of a chain,
        a chord's body) sends it where its producer meant, not to its own default queue."""
        opts = self.options
        task_id = opts.setdefault("task_id", _id or str(uuid.uuid4()))
        if self.app is not None and not opts.get("queue"):
            opts["queue"] = self.app.queue_for(self.name)
        if root_id:
            opts["root_id"] = root_id
        if parent_id:
            opts["parent_id"] = parent_id
        if group_id and "group_id" not in opts:
            opts["group_id"] = group_id
        if chord is not None:
            opts["chord"] = chord
        if group_index is not None:
            opts["group_index"] = group_index
        return AsyncResult(task_id, self._app())

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult[R]:
        return self.apply_async(args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task here, now, with the partial arguments merged (Celery's `sig()`); a
        chain, group or chord is sent instead, as Celery's are."""
        merged_args, merged_kwargs, _ = self._merge(args, kwargs, {})
        app = self._app()
        task = app.tasks.get(self.name)
        if task is None:
            raise CanvasError(f"task {self.name!r} is not registered in this app to run here")
        return task(*merged_args, **merged_kwargs)

    def apply_async(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> AsyncResult[R]:
        """Send the task: `args` prepended, `kwargs` and `options` merged over the stored ones; a
        task this app declares is sent by its own `apply_async`, so its options (queue, time
        limits, priority, expiry) apply where the signature has none, as in Celery."""
        merged_args, merged_kwargs, merged_options = self._merge(args, kwargs, options)
        app = self._app()
        send = _send_options(self.name, merged_options, app)
        if (task := app.tasks.get(self.name)) is not None:
            return task.apply_async(merged_args, merged_kwargs, **send)
        return app.send_task(self.name, merged_args, merged_kwargs, **send)

    def _app(self) -> Millpond:
        if self.app is None:
            raise CanvasError(
                f"signature {self!r} is not bound to an app: make it with task.s(...) or "
                "app.signature(name, ...), or pass app="
            )
        return self.app


def _copy_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options with their lists copied (links), so a clone's changes stay its own."""
    return {k: list(v) if isinstance(v, list) else v for k, v in options.items()}


def _send_options(name: str, options: Mapping[str, Any], app: Millpond) -> dict[str, Any]:
    """The keywords `send_task` takes, from a signature's options; an option nothing here can
    honour is said once per task name (never silently dropped)."""
    send: dict[str, Any] = {}
    for key, value in options.items():
        if key in SEND_OPTIONS:  # what `send_task` takes
            if value is not None:
                send[key] = value
        elif key not in INERT_KEYS:
            _warn_left_out(name, key)
    for key in ("link", "link_error"):
        if key in send:
            send[key] = _signature_list(send[key], app)
    if "chord" in send:
        send["chord"] = Signature.from_dict(send["chord"], app)
    return send


@functools.cache
def _warn_left_out(name: str, key: str) -> None:
    """Say once per process that a signature option is left out of the message."""
    structlog.get_logger("millpond").warning(
        f"signature option {key!r} of {name} is not supported by millpond and is "
        "left out of the message"
    )


def _signature_list(value: Any, app: Millpond) -> list[Signature[Any]]:
    items = value if isinstance(value, list | tuple) else [value]
    return [Signature.from_dict(item, app) for item in items]


def maybe_signature(value: Any, app: Millpond | None = None) -> Signature[Any] | None:
    """A signature from a signature or its dict; None stays None."""
    if value is None:
        return None
    return Signature.from_dict(value, app)


# -- chains ----------------------------------------------------------------------------------------
class _Composite(Signature[R]):
    """A signature made of signatures (a chain's steps, a group's members), kept under its
    `tasks` keyword as Celery does; `kind` names Celery's built-in task for it."""

    def __init__(
        self,
        *tasks: Signature[Any] | Iterable[Signature[Any]],
        app: Millpond | None = None,
        **options: Any,
    ) -> None:
        parts = _flatten_args(tasks)
        super().__init__(
            f"celery.{self.kind}", (), {"tasks": parts}, options, app=app or _first_app(parts)
        )

    @classmethod
    def _from_fields(cls, data: Mapping[str, Any], app: Millpond | None) -> Signature[Any]:
        kwargs = data.get("kwargs") or {}
        parts = [Signature.from_dict(t, app) for t in kwargs.get("tasks") or []]
        made = cls(parts, app=app, **(data.get("options") or {}))
        made["immutable"] = bool(data.get("immutable"))
        return made

    @property
    def tasks(self) -> list[Signature[Any]]:
        return self.kwargs["tasks"]  # type: ignore[no-any-return]


class chain(_Composite[Any]):
    """Tasks one after another, each given the previous one's result."""

    kind = "chain"

    def __call__(self, *args: Any, **kwargs: Any) -> AsyncResult[Any]:
        """Send the chain (`chain(...)()`, as Celery has it)."""
        return self.apply_async(args, kwargs)

    def __or__(self, other: Signature[Any]) -> chain:  # type: ignore[override]
        if not isinstance(other, Signature):
            return NotImplemented
        return chain(*self.tasks, other, app=self.app, **self.options)

    def clone(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> chain:
        made = chain(
            [t.clone() for t in self.tasks], app=self.app, **_copy_options(self.options), **options
        )
        made["immutable"] = self.immutable
        if (args or kwargs) and not self.immutable:
            made.kwargs["tasks"][0] = made.tasks[0].clone(args, kwargs)
        return made

    def freeze(
        self,
        _id: str | None = None,
        group_id: str | None = None,
        chord: Signature[Any] | None = None,
        root_id: str | None = None,
        parent_id: str | None = None,
        group_index: int | None = None,
    ) -> AsyncResult[Any]:
        """Freeze the steps in place, as Celery does, so the chain sent later (as a chord's
        body, a group's member, from a message) runs under the ids this returns."""
        steps = self._steps(
            _id=_id, root_id=root_id, group_id=group_id, group_index=group_index, chord_body=chord
        )
        self.kwargs["tasks"] = [step for step, _ in steps]
        result = steps[-1][1]
        self.options["task_id"] = result.id  # a chain's id is its last task's, as in Celery
        return result

    def apply_async(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> AsyncResult[Any]:
        """Send the first step with the rest of the chain; returns the last step's result, whose
        `parent` is the step before it, and so on."""
        options = {**self.options, **options}
        if self.immutable:  # takes no partial arguments (a parent's result), as in Celery
            args, kwargs = (), None
        link, link_error = options.pop("link", None), options.pop("link_error", None)
        continuation = list(options.pop("chain", None) or [])
        task_id = options.pop("task_id", None)
        group_id = options.pop("group_id", None)
        group_index = options.pop("group_index", None)
        chord_body = options.pop("chord", None)
        steps = self._steps(
            args,
            kwargs,
            _id=task_id,
            root_id=options.pop("root_id", None),
            group_id=group_id,
            group_index=group_index,
            chord_body=chord_body,
        )
        if not steps:
            raise CanvasError("an empty chain has nothing to send")
        app = self._app()
        for errback in _signature_list(link_error, app) if link_error else []:
            for step, _ in steps:
                step.link_error(errback.clone())
        if link:
            for callback in _signature_list(link, app):
                steps[-1][0].link(callback)
        first = steps[0][0]
        rest = [step for step, _ in reversed(steps[1:])]
        first.apply_async(chain=[*continuation, *rest] or None, **options)
        return steps[-1][1]

    def _steps(
        self,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        _id: str | None = None,
        root_id: str | None = None,
        group_id: str | None = None,
        group_index: int | None = None,
        chord_body: Any = None,
        parent_id: str | None = None,
    ) -> list[tuple[Signature[Any], AsyncResult[Any]]]:
        """The chain's steps, frozen, each with its result (whose `parent` is the step before).

        Nested chains are spliced in; a group followed by a step becomes a chord whose body is
        that step (Celery's upgrade); the first step gets the partial arguments; the last step
        gets the chain's own task id and, inside a group or chord, its place there.
        """
        flat: list[Signature[Any]] = []
        for step in self.tasks:
            step = Signature.from_dict(step, self.app)
            if isinstance(step, chain):
                flat.extend(step.clone().tasks)
            else:
                flat.append(step.clone())
        merged: list[Signature[Any]] = []
        for step in flat:
            if merged and isinstance(merged[-1], group):
                merged[-1] = chord(merged[-1], step, app=self.app)
            else:
                merged.append(step)
        if merged and (args or kwargs):
            merged[0] = merged[0].clone(args, kwargs)
        out: list[tuple[Signature[Any], AsyncResult[Any]]] = []
        parent: AsyncResult[Any] | None = None
        for index, step in enumerate(merged):
            last = index == len(merged) - 1
            result = step.freeze(
                _id=_id if last else None,
                root_id=root_id,
                group_id=group_id if last else None,
                group_index=group_index if last else None,
                chord=chord_body if last else None,
            )
            if root_id is None:
                root_id = result.id
            result.parent = parent
            parent = result
            out.append((step, result))
        return out


# -- groups ----------------------------------------------------------------------------------------
class group(_Composite[list[Any]]):
    """Tasks run in parallel; their results come back as one list, in order."""

    kind = "group"

    def __call__(self, *args: Any, **kwargs: Any) -> GroupResult:
        """Send the group (`group(...)()`, as Celery has it)."""
        return self.apply_async(args, kwargs)

    def clone(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> group:
        members = [t.clone(args, kwargs) for t in self.tasks]
        return group(members, app=self.app, **_copy_options(self.options), **options)

    def set_immutable(self, immutable: bool) -> None:
        """Make every member immutable (or not), as Celery's `group.set_immutable` does."""
        for member in self.tasks:
            member.set_immutable(immutable)

    def link(self, callback: Signature[Any]) -> Signature[Any]:
        raise CanvasError(
            "a group has no single result to link a callback to: use a chord, "
            "chord(group, callback)"
        )

    def link_error(self, errback: Signature[Any]) -> Signature[Any]:
        for member in self.tasks:
            member.link_error(errback.clone())
        return errback

    def _members(self) -> Iterator[Signature[Any]]:
        """The tasks, with nested groups unrolled (a group in a group runs in the same one)."""
        for member in self.tasks:
            member = Signature.from_dict(member, self.app)
            if isinstance(member, group):
                yield from member._members()
            else:
                yield member

    # a group's result is a GroupResult, as in Celery, not one task's AsyncResult
    def freeze(  # type: ignore[override]
        self,
        _id: str | None = None,
        group_id: str | None = None,
        chord: Signature[Any] | None = None,
        root_id: str | None = None,
        parent_id: str | None = None,
        group_index: int | None = None,
    ) -> GroupResult:
        gid = self.options.setdefault("task_id", _id or str(uuid.uuid4()))
        results = [
            member.freeze(group_id=gid, group_index=index, root_id=root_id)
            for index, member in enumerate(self._members())
        ]
        return GroupResult(gid, results, self._app())

    def apply_async(  # type: ignore[override]
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> GroupResult:
        """Send every task with the group's id and its index; returns their `GroupResult`."""
        options = {**self.options, **options}
        if options.pop("link", None):
            raise CanvasError("cannot link a callback to a group: use chord(group, callback)")
        join_id = options.pop("group_id", None)
        group_id = options.pop("task_id", None) or join_id or str(uuid.uuid4())
        join_index = options.pop("group_index", None)
        chord_body = options.pop("chord", None)
        # the body of a chord in an outer chord's header: its tasks return their parts to the
        # outer join (which counted them), at the inner chord's place there, as Celery's do
        outer = chord_body is not None and join_id is not None and join_id != group_id
        app = self._app()
        members = [m.clone(args, kwargs) for m in self._members()]
        if chord_body is not None:
            for member in members:
                if _ends_in_group(member):
                    raise CanvasError(
                        "a chain that ends in a group cannot be a member of a chord's header "
                        "(its group's results would never reach the chord): end the chain with "
                        "a task, or put the group's tasks in the header themselves"
                    )
            if not outer:
                chord_backend(app).set_chord_size(group_id, sum(map(_header_size, members)))
        results: list[AsyncResult[Any]] = []
        with app.publishing_together():
            for index, member in enumerate(members):
                place: dict[str, Any] = {"group_id": group_id, "group_index": index}
                if outer:  # Celery's tasks carry their place in the outer join themselves
                    place = (
                        {} if _joined(member) else {"group_id": join_id, "group_index": join_index}
                    )
                results.append(member.apply_async(**{"chord": chord_body, **place}, **options))
        return GroupResult(group_id, results, app)


def _joined(sig: Signature[Any]) -> bool:
    """Whether a signature carries its place in a chord's join (its group id and the body)."""
    return bool(sig.options.get("group_id")) and sig.options.get("chord") is not None


def _ends_in_group(sig: Signature[Any]) -> bool:
    """Whether a chain's last step is a group (nested chains followed to their end)."""
    while isinstance(sig, chain) and sig.tasks:
        sig = Signature.from_dict(sig.tasks[-1], sig.app)
    return isinstance(sig, group)


def _header_size(sig: Signature[Any]) -> int:
    """How many results a chord header member returns to the join (Celery's count: a chain's
    last task, a chord's body, each task of a nested group)."""
    if isinstance(sig, group):
        return sum(_header_size(m) for m in sig._members())
    if isinstance(sig, chain):
        return 1 if sig.tasks else 0
    if isinstance(sig, chord):
        body = sig.body
        return _header_size(body) if body is not None else 0
    return 1


# -- chords ----------------------------------------------------------------------------------------
class chord(Signature[Any]):
    """A group (the header), then one task (the body) given the list of the header's results.

    The body runs once, when the last header task has returned, whichever worker that was; if a
    header task fails, the body does not run: it is marked FAILURE with a `ChordError` naming the
    failed task, and its errbacks run, once.
    """

    kind = "chord"

    def __init__(
        self,
        header: group | Iterable[Signature[Any]],
        body: Signature[Any] | None = None,
        app: Millpond | None = None,
        **options: Any,
    ) -> None:
        head = header if isinstance(header, group) else group(header, app=app)
        super().__init__(
            "celery.chord",
            (),
            {"header": head, "body": body, "kwargs": {}},
            options,
            app=app or head.app or (body.app if body is not None else None),
        )

    @classmethod
    def _from_fields(cls, data: Mapping[str, Any], app: Millpond | None) -> Signature[Any]:
        kwargs = data.get("kwargs") or {}
        header = kwargs.get("header") or []
        head = (
            Signature.from_dict(header, app)
            if isinstance(header, Mapping)
            else group([Signature.from_dict(t, app) for t in header], app=app)
        )
        body = maybe_signature(kwargs.get("body"), app)
        made = cls(head, body, app=app, **(data.get("options") or {}))  # type: ignore[arg-type]
        made["immutable"] = bool(data.get("immutable"))
        return made

    def set_immutable(self, immutable: bool) -> None:
        """Make the header's tasks immutable (or not), not the body, as Celery's does."""
        self.header.set_immutable(immutable)

    @property
    def header(self) -> group:
        return self.kwargs["header"]  # type: ignore[no-any-return]

    @property
    def body(self) -> Signature[Any] | None:
        body = self.kwargs.get("body")
        return maybe_signature(body, self.app) if body is not None else None

    def clone(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> chord:
        body = self.body
        made = chord(
            self.header.clone() if self.immutable else self.header.clone(args, kwargs),
            body.clone() if body is not None else None,
            app=self.app,
            **_copy_options(self.options),
            **options,
        )
        made["immutable"] = self.immutable
        return made

    def __call__(self, body: Signature[Any] | None = None, **options: Any) -> AsyncResult[Any]:
        """`chord(header)(body)`, as Celery has it."""
        target = self if body is None else self.clone()
        if body is not None:
            target.kwargs["body"] = body
        return target.apply_async(**options)

    def freeze(
        self,
        _id: str | None = None,
        group_id: str | None = None,
        chord: Signature[Any] | None = None,
        root_id: str | None = None,
        parent_id: str | None = None,
        group_index: int | None = None,
    ) -> AsyncResult[Any]:
        body = self._body()
        header = self.header.freeze(root_id=root_id)
        # the chord's own id is its header's group id, as in Celery: a Celery worker rebuilds a
        # chord's header as a plain list of tasks and takes the group id from here
        self.options["task_id"] = header.id
        result = body.freeze(
            _id=_id, root_id=root_id, group_id=group_id, group_index=group_index, chord=chord
        )
        result.parent = header
        return result

    def _body(self) -> Signature[Any]:
        body = self.body
        if body is None:
            raise CanvasError("a chord needs a body: chord(header, body) or chord(header)(body)")
        return body

    def apply_async(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> AsyncResult[Any]:
        """Send the header with the body attached; returns the body's result (whose `parent`
        is the header's `GroupResult`)."""
        options = {**self.options, **options}
        if self.immutable:  # takes no partial arguments (a parent's result), as in Celery
            args, kwargs = (), None
        body = self._body().clone()
        # what the caller meant for "the chord" belongs to its body: its id, callbacks, and the
        # rest of a chain it is a step of
        for key in ("link", "link_error"):
            for sig in _signature_list(options.pop(key), self._app()) if key in options else []:
                getattr(body, key)(sig)
        for key in ("chain", "group_id", "group_index", "chord", "parent_id"):
            if key in options:
                body.options[key] = options.pop(key)
        body_id = options.pop("task_id", None)
        root_id = options.pop("root_id", None)
        # the rest (queue, priority, time limits, ...) is for the body too, as Celery's
        # `chord.run` has it; a countdown or eta delays the header only
        body.options.update({k: v for k, v in options.items() if k not in ("countdown", "eta")})
        if isinstance(body, group) and _joined(body):
            # in an outer chord's header: each task of the group body carries its place in the
            # outer join, as Celery's do (so a Celery worker sending the body sends it there too)
            place = {k: body.options.get(k) for k in ("group_id", "group_index", "chord")}
            for member in body._members():
                member.options.update(place)
        body_result = body.freeze(_id=body_id, root_id=root_id)
        header = self.header.clone(args, kwargs)
        if not header.tasks:  # nothing to wait for: the body runs now, with no results
            body.apply_async(([],), **options)
            return body_result
        group_id = header.options.get("task_id") or self.options.get("task_id")
        group_id = group_id or str(uuid.uuid4())
        header.options["task_id"] = group_id
        header_result = header.apply_async(chord=body, root_id=root_id or body_result.id, **options)
        body_result.parent = header_result
        return body_result


# -- map, starmap, chunks --------------------------------------------------------------------------
class xmap(Signature[list[Any]]):
    """One task message that calls `task(item)` for every item, in one worker (`celery.map`)."""

    kind = "xmap"

    def __init__(self, task: Signature[Any], it: Iterable[Any], app: Millpond | None = None,
                 **options: Any) -> None:  # fmt: skip
        super().__init__(
            f"celery.{'map' if self.kind == 'xmap' else 'starmap'}",
            (),
            {"task": task, "it": [list(i) if isinstance(i, tuple) else i for i in it]},
            options,
            app=app or task.app,
        )

    @classmethod
    def _from_fields(cls, data: Mapping[str, Any], app: Millpond | None) -> Signature[Any]:
        kwargs = data.get("kwargs") or {}
        task = Signature.from_dict(kwargs.get("task") or {}, app)
        return cls(task, kwargs.get("it") or [], app=app, **(data.get("options") or {}))


class xstarmap(xmap):
    """One task message that calls `task(*item)` for every item (`celery.starmap`)."""

    kind = "xstarmap"


class chunks(Signature[list[Any]]):
    """`task(*item)` over the items in groups of `n`: a group of `celery.starmap` tasks."""

    kind = "chunks"

    def __init__(self, task: Signature[Any], it: Iterable[Any], n: int,
                 app: Millpond | None = None, **options: Any) -> None:  # fmt: skip
        if n < 1:
            raise CanvasError(f"chunks of {n}: the chunk size must be at least 1")
        super().__init__(
            "celery.chunks",
            (),
            {"task": task, "it": [list(i) if isinstance(i, tuple) else i for i in it], "n": n},
            options,
            app=app or task.app,
        )

    @classmethod
    def _from_fields(cls, data: Mapping[str, Any], app: Millpond | None) -> Signature[Any]:
        kwargs = data.get("kwargs") or {}
        task = Signature.from_dict(kwargs.get("task") or {}, app)
        return cls(
            task, kwargs.get("it") or [], int(kwargs.get("n") or 1), app=app,
            **(data.get("options") or {}),
        )  # fmt: skip

    def __call__(self, *args: Any, **kwargs: Any) -> GroupResult:
        """Send the chunks (`add.chunks(items, 10)()`, as Celery has it)."""
        return self.apply_async(args, kwargs)

    def group(self) -> group:
        """The group this stands for: one `celery.starmap` per chunk."""
        task = Signature.from_dict(self.kwargs["task"], self.app)
        items, n = list(self.kwargs["it"]), int(self.kwargs["n"])
        parts = [items[i : i + n] for i in range(0, len(items), n)]
        return group((xstarmap(task, part, app=self.app) for part in parts), app=self.app)

    def apply_async(  # type: ignore[override]
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> GroupResult:
        return self.group().apply_async(args, kwargs, **{**self.options, **options})


# -- helpers ---------------------------------------------------------------------------------------
def _flatten_args(tasks: tuple[Any, ...]) -> list[Signature[Any]]:
    """`chain(a, b)` and `chain([a, b])` (or a generator) alike."""
    if len(tasks) == 1 and not isinstance(tasks[0], Mapping):
        return [Signature.from_dict(t) for t in tasks[0]]
    return [Signature.from_dict(t) for t in tasks]


def _first_app(sigs: Iterable[Signature[Any]]) -> Millpond | None:
    return next((s.app for s in sigs if s.app is not None), None)


def chord_backend(app: Millpond) -> ResultBackend:
    """The app's result backend, if it can join chords; else a clear error saying what can."""
    backend = app.backend
    if backend is None or not backend.supports_chords:
        kind = type(backend).__name__ if backend is not None else "no result backend"
        raise CanvasError(
            f"a chord needs a result backend that joins its header ({kind} does not): use "
            "the embedded sqlite:// (the default), memory://, or redis:// as result_backend"
        )
    return backend


def signature(
    task: str | Task[..., R] | Mapping[str, Any],
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    app: Millpond | None = None,
    **options: Any,
) -> Signature[Any]:
    """A signature from a task, its name, or a signature dict (Celery's `signature()`)."""
    if isinstance(task, Mapping):
        return Signature.from_dict(task, app)
    return Signature(task, args, kwargs, options, app=app)


__all__ = [
    "CanvasError",
    "Signature",
    "chain",
    "chord",
    "chord_backend",
    "chunks",
    "group",
    "maybe_signature",
    "signature",
    "xmap",
    "xstarmap",
]
