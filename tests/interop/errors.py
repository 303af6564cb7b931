"""An exception of the suite's own, raised on both sides: a failure must come back as this type
(each side rebuilds it from `exc_module` and `exc_type` because the module is imported)."""

from __future__ import annotations


class InteropError(Exception):
    pass
