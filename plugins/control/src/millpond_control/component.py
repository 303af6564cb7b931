"""The control plane as a worker component (`millpond.components` entry point `control`).

The core worker builds it with every other installed component (see
`millpond.contracts.component`): it reads the `[control]` section and the revoked file when the
worker is built, learns the running workers' revokes (mingle) and starts the pidbox node before
the first fetch, tells the worker which tasks are revoked, swaps the worker's consumer when
`add_consumer`/`cancel_consumer` change its queues, and stops the node first at shutdown.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from millpond.config.settings import millpond_home
from millpond.contracts.component import WorkerComponent
from millpond_control import ratelimit as _rate_limit_command  # noqa: F401 - registers it
from millpond_control.node import ControlNode
from millpond_control.revoked import Revoked
from millpond_control.settings import SECTION, ControlSettings

if TYPE_CHECKING:
    from millpond.consume.worker import Worker

log = structlog.get_logger("millpond.worker")


class ControlPlane(WorkerComponent):
    """One worker's remote control and revokes: its settings, its revoked set and its node."""

    filters_tasks = True

    def __init__(self, worker: Worker) -> None:
        super().__init__(worker)
        self.settings = ControlSettings.from_section(worker.settings.section(SECTION))
        self.revoked = Revoked(
            self.settings.revokes_max, self.settings.revoke_expires, self._revokes_path()
        )
        self.node: ControlNode | None = None
        #: the queues to consume once what the current consumer delivered is settled
        self.next_queues: tuple[str, ...] | None = None

    def _revokes_path(self) -> Path | None:
        given = self.settings.revokes_file
        if given is not None and given.strip().lower() in ("none", ""):
            return None
        if given:
            return Path(given).expanduser()
        return millpond_home(purpose="the revoked file ([control] revokes_file)") / "revoked.json"

    def start(self) -> None:
        """Learn the running workers' revokes (mingle), then answer remote control; both
        before the first fetch, so a task revoked before this worker started never runs here."""
        node = ControlNode(self.worker, self.settings, plane=self)
        self.node = node
        try:
            node.mingle()
        except Exception:
            log.exception("mingle failed; starting without the other workers' revokes")
        if self.settings.enabled:
            node.start()
        else:
            log.info("remote control is off on this worker ([control] enabled = false)")

    def stop(self) -> None:
        if self.node is not None:
            self.node.stop()

    def discard(self, task_id: str, headers: Mapping[str, Any]) -> str | None:
        return self.revoked.matches(task_id, headers)

    def change_queues(self, *, add: str | None = None, remove: str | None = None) -> None:
        """Consume from one more queue, or one fewer (on the loop's thread, `call_soon`). The
        worker stops fetching until `tend` can swap the consumer."""
        worker = self.worker
        queues = list(self.next_queues or worker.queues)
        if add and add not in queues:
            worker.app.broker.declare([add])
            queues.append(add)
        if remove and remove in queues and len(queues) > 1:
            queues.remove(remove)
        wanted = tuple(queues)
        self.next_queues = wanted if wanted != worker.queues else None
        worker.closing = self.next_queues is not None

    def tend(self) -> None:
        """The queue change, once nothing the old consumer delivered is held (every ack goes to
        the consumer that delivered the message; holders give theirs back while it closes)."""
        worker, queues = self.worker, self.next_queues
        if queues is None:
            return
        worker.acks.flush()
        if worker.acks.held > 0 or worker.buffer:
            return
        self.next_queues = None
        worker.open_consumer(queues)
        log.info("consuming from new queues", queues=list(queues))
