"""The solo pool: runs each task inline in the worker's consumer-loop thread, one at a time.

It is the smallest possible pool and the reference for the contract. It declares no time limits and
no termination, because a task running in the loop's own thread cannot be interrupted safely; the
worker warns about tasks that ask for limits. The broker keeps the connection alive while a long
task runs (heartbeat threads), so a long task does not cost the worker its connection.
"""

from __future__ import annotations

from millpond.contracts.pool import BasePool, Capabilities, Job

__all__ = ["SoloPool"]


class SoloPool(BasePool):
    name = "solo"
    capabilities = Capabilities(concurrent=False)
    #: a fetch and an ack are a round trip each; with one task at a time and no-op tasks they
    #: were a fifth of the loop's wall time at 16 per fetch. The window is handed back at once on
    #: a warm stop (`Consumer.release`), so a larger one costs other workers little.
    default_prefetch_multiplier = 64

    @classmethod
    def default_concurrency(cls) -> int:
        return 1

    def __init__(self, concurrency: int, *args: object, **kwargs: object) -> None:
        if concurrency != 1:
            raise ValueError(
                f"the solo pool runs one task at a time; concurrency must be 1, "
                f"got {concurrency} (use threads or prefork for more)"
            )
        super().__init__(concurrency, *args, **kwargs)  # type: ignore[arg-type]

    def on_start(self) -> None:
        pass

    def on_apply(self, job: Job) -> None:
        self.complete(job, self.execution.run(job))

    def on_stop(self, timeout: float | None) -> None:
        pass  # nothing can be running: jobs run inline

    def on_terminate(self) -> None:
        pass
