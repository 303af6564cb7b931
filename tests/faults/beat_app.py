"""The app the beat fault tests run under `millpond beat` replicas: one entry every second."""

from __future__ import annotations

from millpond import Millpond

app = Millpond("beat-ha")


@app.task
def tick() -> None:
    """Never run here: the test reads the published messages from the queue."""


app.add_periodic_task(1.0, tick.s(), name="every-second")
