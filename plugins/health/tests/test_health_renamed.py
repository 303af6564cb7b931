"""The probes' settings were the core's `health_port`, `health_host`, `health_liveness_timeout`:
those names are refused with the new one from every source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from millpond.config.settings import load_settings
from millpond.exceptions import ConfigurationError


@pytest.mark.parametrize(
    ("old", "new", "variable"),
    [
        ("health_port", "health.port", "MILLPOND_HEALTH__PORT"),
        ("health_host", "health.host", "MILLPOND_HEALTH__HOST"),
        ("health_liveness_timeout", "health.liveness_timeout", "MILLPOND_HEALTH__LIVENESS_TIMEOUT"),
    ],
)
def test_the_old_flat_names_are_refused_with_the_new_one(
    old: str, new: str, variable: str, tmp_path: Path
) -> None:
    """Not a warning and not ignored: a pod whose probes silently vanished would be killed by
    its kubelet, so every source stops the start with the name to use."""
    file = tmp_path / "millpond.toml"
    file.write_text(f"{old} = 8080\n")
    attempts: list[Any] = [
        lambda: load_settings(env={f"MILLPOND_{old.upper()}": "8080"}),
        lambda: load_settings(env={}, file=file),
        lambda: load_settings(env={}, code={old: 8080}),
        lambda: load_settings({old: 8080}, env={}),
        lambda: load_settings(env={}).replace(**{old: 8080}),
    ]
    for attempt in attempts:
        with pytest.raises(ConfigurationError) as caught:
            attempt()
        message = str(caught.value)
        assert f"setting {old!r}" in message
        assert f"use {new}" in message
        assert variable in message
        assert "millpond-health" in message
