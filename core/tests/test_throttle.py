"""Repeating log lines are told once per interval per kind, with how many were held back."""

from __future__ import annotations

from typing import Any

from millpond.observe.throttle import Throttled


def test_one_line_per_interval_per_kind_with_the_count_held_back() -> None:
    lines: list[tuple[str, dict[str, Any]]] = []
    now = [100.0]
    throttled = Throttled(
        lambda event, **fields: lines.append((event, fields)), 10.0, lambda: now[0]
    )
    throttled.log("expired", "task not run", task_id="a")
    throttled.log("expired", "task not run", task_id="b")
    throttled.log("recycled", "recycling a child")  # another kind is not held back
    now[0] += 3
    throttled.log("expired", "task not run", task_id="c")
    now[0] += 7
    throttled.log("expired", "task not run", task_id="d")
    assert lines == [
        ("task not run", {"task_id": "a"}),
        ("recycling a child", {}),
        ("task not run", {"task_id": "d", "and_before": 2}),
    ]
