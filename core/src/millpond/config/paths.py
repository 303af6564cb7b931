"""Where millpond keeps files of its own on this machine (the sqlite:// broker, revoked ids)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from millpond.exceptions import ConfigurationError


def millpond_home(env: Mapping[str, str] | None = None, *, purpose: str) -> Path:
    """`$MILLPOND_HOME`, else `$XDG_DATA_HOME/millpond`, else `~/.local/share/millpond`."""
    env = os.environ if env is None else env
    if env.get("MILLPOND_HOME"):
        return Path(env["MILLPOND_HOME"]).expanduser()
    if env.get("XDG_DATA_HOME"):
        return Path(env["XDG_DATA_HOME"]).expanduser() / "millpond"
    try:
        return Path.home() / ".local" / "share" / "millpond"
    except RuntimeError as exc:
        raise ConfigurationError(
            f"cannot find a home directory for {purpose} ({exc}); set MILLPOND_HOME"
        ) from exc
