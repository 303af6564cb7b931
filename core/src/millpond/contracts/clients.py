"""The types of `app.control` and its `inspect()`: millpond-control's `Control` and `Inspect`.

millpond-control depends on the core, so the core reaches it at run time only through the
`millpond.clients` entry point, and names its classes for the type checker alone (as it does
millpond-canvas's `Signature`): the remote-control API is written down once, in that package.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from millpond_control.client import Control as ControlClient
    from millpond_control.client import Inspect as InspectClient

__all__ = ["ControlClient", "InspectClient"]


def __getattr__(name: str) -> Any:
    """The two names at run time too (imported on first use, like `millpond`'s own exports)."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module("millpond_control.client"), name.removesuffix("Client"))
