"""The receive step's argument check: a count for plain signatures, `Signature.bind` otherwise.

The count is a shortcut taken on every message; these cases pin that it refuses exactly what
`bind` refuses (too few, too many, a bound task's own parameter) and defers to `bind` for
everything a count cannot judge (keyword arguments, `*args`, keyword-only parameters).
"""

from __future__ import annotations

from typing import Any

import pytest

from millpond import Millpond
from millpond.config.settings import load_settings
from millpond.consume.receive import Receiver
from millpond.consume.settle import Acks, Settler
from millpond.contracts.pool import Capabilities
from millpond.exceptions import MalformedMessage
from millpond.wire.protocol import decode_task, encode_task


def _receiver(app: Millpond) -> Receiver:
    settings = load_settings({}, env={})
    return Receiver(Settler(app, settings, Acks()), "solo", Capabilities())


def _tasks(app: Millpond) -> dict[str, Any]:
    @app.task
    def plain(x: int, y: int, z: int = 0) -> int:
        return x + y + z

    @app.task(bind=True)
    def bound(self: Any, x: int) -> int:
        return x

    @app.task
    def star(x: int, *rest: int) -> int:
        return x

    @app.task
    def keyword_only(x: int, *, k: int) -> int:
        return x

    return {"plain": plain, "bound": bound, "star": star, "keyword_only": keyword_only}


@pytest.mark.parametrize(
    ("task", "args", "kwargs", "ok"),
    [
        ("plain", [1, 2], {}, True),
        ("plain", [1, 2, 3], {}, True),
        ("plain", [1], {}, False),
        ("plain", [1, 2, 3, 4], {}, False),
        ("plain", [1], {"y": 2}, True),
        ("plain", [1, 2], {"x": 2}, False),
        ("plain", [1, 2], {"nope": 2}, False),
        ("bound", [1], {}, True),
        ("bound", [], {}, False),
        ("bound", [1, 2], {}, False),
        ("star", [1, 2, 3, 4], {}, True),
        ("star", [], {}, False),
        ("keyword_only", [1], {}, False),
        ("keyword_only", [1], {"k": 2}, True),
    ],
)
def test_count_and_bind_agree(
    memory_app: Millpond, task: str, args: list[Any], kwargs: dict[str, Any], ok: bool
) -> None:
    tasks = _tasks(memory_app)
    receiver = _receiver(memory_app)
    msg = decode_task(encode_task(tasks[task].name, args, kwargs))
    for _ in range(2):  # the first call learns the signature, the second uses what it learnt
        if ok:
            receiver._check_arguments(tasks[task], msg)
        else:
            with pytest.raises(MalformedMessage, match="wrong arguments"):
                receiver._check_arguments(tasks[task], msg)
