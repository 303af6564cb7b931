"""The control-command registry: a command's kind, safety, help and declared arguments."""

from __future__ import annotations

from typing import Any

import pytest

from millpond_control.registry import Registry, nok, ok


def test_registry_declares_kind_safety_and_arguments() -> None:
    registry = Registry()

    @registry.register(kind="inspect")
    def ping(ctx: Any, **_: Any) -> Any:
        """Answer pong."""
        return ok("pong")

    @registry.register("rate_limit", kind="control", args=(("task_name", str), ("rate", str)))
    def set_rate(ctx: Any, **_: Any) -> Any:
        return nok("no")

    assert "ping" in registry
    assert registry.get("ping") is not None
    assert registry.get("ping").safe is True  # type: ignore[union-attr]
    assert registry.get("ping").help == "Answer pong."  # type: ignore[union-attr]
    cmd = registry.get("rate_limit")
    assert cmd is not None
    assert (cmd.kind, cmd.safe, cmd.args) == ("control", False, (("task_name", str), ("rate", str)))
    assert [c.name for c in registry] == ["ping", "rate_limit"]
    with pytest.raises(ValueError, match="kind"):
        registry.register(kind="other")(ping)  # type: ignore[arg-type]
