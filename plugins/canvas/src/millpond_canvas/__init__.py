"""millpond-canvas: chains, groups, chords and callbacks for millpond, in Celery's wire format.

    from millpond import chain, chord, group     # re-exported by millpond, which depends on this

    (add.s(2, 2) | add.s(4) | add.s(8))()
    chord(add.s(i, i) for i in range(10))(tsum.s())

`signatures` is the producer side (what a canvas is and how it is sent), `steps` the worker side
(what a finished task sends next), `builtins` Celery's built-in canvas tasks, and `plugin` the
`millpond.canvas` entry point that the core reaches through `millpond.contracts.canvas`.
"""

from __future__ import annotations

from millpond_canvas.results import GroupResult
from millpond_canvas.signatures import (
    CanvasError,
    Signature,
    chain,
    chord,
    chunks,
    group,
    maybe_signature,
    signature,
    xmap,
    xstarmap,
)

__all__ = [
    "CanvasError",
    "GroupResult",
    "Signature",
    "chain",
    "chord",
    "chunks",
    "group",
    "maybe_signature",
    "signature",
    "xmap",
    "xstarmap",
]
