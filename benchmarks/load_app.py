"""The task the load runs execute: a no-op that appends its id to a ledger file.

`LOAD_DIR` names the directory; one small `os.write` on an `O_APPEND` descriptor per task is
atomic on a local file, so three workers (and prefork's children) share one ledger safely.
"""

from __future__ import annotations

import os

from millpond import Millpond

app = Millpond("load")


@app.task(bind=True, name="load.noop")
def noop(self) -> None:  # type: ignore[no-untyped-def]
    directory = os.environ.get("LOAD_DIR")
    if not directory:
        return
    fd = os.open(os.path.join(directory, "done.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{self.request.id}\n".encode())
    finally:
        os.close(fd)
