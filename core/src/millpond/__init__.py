"""millpond: a distributed task worker with a small core; pools and brokers are plugins.

    from millpond import Millpond

    app = Millpond("shop")

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    add.delay(2, 3).get(timeout=10)  # an int to the type checker; add.delay("2") is a type error

`SendOptions` and `TaskDecoratorOptions` type the keywords of `apply_async` and `@app.task`, for
code that passes them on; the canvas (`Signature`, `chain`, `group`, ...) is millpond-canvas's,
re-exported. Each name is imported on first use, so importing millpond imports nothing: the
`millpond` command must be able to monkey-patch (gevent) before anything loads.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    name: module
    for module, names in {
        "millpond.produce.app": "Millpond",
        "millpond.produce.result": "AsyncResult",
        "millpond.produce.task": "Request SendOptions Task TaskDecoratorOptions",
        "millpond.exceptions": "ChordError MalformedMessage MaxRetriesExceededError MessageError "
        "MessageTooLarge MillpondError Reject Retry SignatureError SoftTimeLimitExceeded "
        "TaskError TimeLimitExceeded UnsupportedContentType WorkerLostError",
        "millpond_canvas": "GroupResult Signature chain chord chunks group signature xmap xstarmap",
    }.items()
    for name in names.split()
}
__all__ = [*_EXPORTS, "__version__"]  # noqa: PLE0604 (all strings: the keys of _EXPORTS)

if TYPE_CHECKING:
    from millpond.exceptions import ChordError as ChordError
    from millpond.exceptions import MalformedMessage as MalformedMessage
    from millpond.exceptions import MaxRetriesExceededError as MaxRetriesExceededError
    from millpond.exceptions import MessageError as MessageError
    from millpond.exceptions import MessageTooLarge as MessageTooLarge
    from millpond.exceptions import MillpondError as MillpondError
    from millpond.exceptions import Reject as Reject
    from millpond.exceptions import Retry as Retry
    from millpond.exceptions import SignatureError as SignatureError
    from millpond.exceptions import SoftTimeLimitExceeded as SoftTimeLimitExceeded
    from millpond.exceptions import TaskError as TaskError
    from millpond.exceptions import TimeLimitExceeded as TimeLimitExceeded
    from millpond.exceptions import UnsupportedContentType as UnsupportedContentType
    from millpond.exceptions import WorkerLostError as WorkerLostError
    from millpond.produce.app import Millpond as Millpond
    from millpond.produce.result import AsyncResult as AsyncResult
    from millpond.produce.task import Request as Request
    from millpond.produce.task import SendOptions as SendOptions
    from millpond.produce.task import Task as Task
    from millpond.produce.task import TaskDecoratorOptions as TaskDecoratorOptions
    from millpond_canvas import GroupResult as GroupResult
    from millpond_canvas import Signature as Signature
    from millpond_canvas import chain as chain
    from millpond_canvas import chord as chord
    from millpond_canvas import chunks as chunks
    from millpond_canvas import group as group
    from millpond_canvas import signature as signature
    from millpond_canvas import xmap as xmap
    from millpond_canvas import xstarmap as xstarmap


def lazy_export(namespace: dict[str, Any], homes: dict[str, str], name: str) -> Any:
    """A package's `__getattr__` (PEP 562; the core's, the broker plugins'): `name` imported from
    its module in `homes` on first use and kept in `namespace`, the package's `globals()`."""
    if (module := homes.get(name)) is None:
        raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
    value = namespace[name] = getattr(import_module(module), name)
    return value


def __getattr__(name: str) -> Any:
    return lazy_export(globals(), _EXPORTS, name)
