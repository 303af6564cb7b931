"""A monitor made of Celery's own parts: `EventReceiver` on a thread feeding `events.State`, the
way Flower and `celery events` read a fleet. What it records is what a Celery monitor sees."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any


class Capture:
    """Every event on the broker's `celeryev` exchange, from the moment `start()` returns."""

    def __init__(self, broker_url: str) -> None:
        from celery import Celery

        self.app = Celery("interop-monitor", broker=broker_url)
        self.app.conf.broker_connection_retry_on_startup = True
        self.events: list[dict[str, Any]] = []
        self.state = self.app.events.State()
        self.cond = threading.Condition()
        self._receiver: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="event-capture", daemon=True)

    def _run(self) -> None:
        try:
            with self.app.connection() as conn:
                self._receiver = self.app.events.Receiver(conn, handlers={"*": self._on_event})
                self._receiver.capture(limit=None, timeout=None, wakeup=False)
        except BaseException as exc:
            self._error = exc
            with self.cond:
                self.cond.notify_all()

    def _on_event(self, event: dict[str, Any]) -> None:
        with self.cond:
            self.state.event(event)
            self.events.append(event)
            self.cond.notify_all()

    def start(self, timeout: float = 30.0) -> Capture:
        """Start receiving, and return once a probe event sent through Celery's own dispatcher
        came back (so nothing sent after this is missed: a fanout keeps nothing for late
        subscribers)."""
        self._thread.start()
        token = uuid.uuid4().hex
        deadline = time.monotonic() + timeout
        with self.app.connection() as conn:
            dispatcher = self.app.events.Dispatcher(conn, hostname="probe@interop")
            while True:
                dispatcher.send("probe-ready", token=token)
                try:
                    self.wait_for(
                        lambda evs: any(e.get("token") == token for e in evs), 0.5, "the probe"
                    )
                    break
                except AssertionError:
                    if self._error is not None:
                        raise
                    if time.monotonic() > deadline:
                        raise AssertionError(
                            f"the event receiver saw no probe within {timeout} s"
                        ) from None
            dispatcher.close()
        return self

    def stop(self) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(10)

    def of(self, hostname: str, event_type: str | None = None) -> list[dict[str, Any]]:
        with self.cond:
            return [
                e
                for e in self.events
                if e.get("hostname") == hostname and (event_type is None or e["type"] == event_type)
            ]

    def wait_for(
        self,
        check: Callable[[list[dict[str, Any]]], Any],
        timeout: float,
        what: str | Callable[[], str],
    ) -> Any:
        """The first truthy `check(events)`, waiting at most `timeout` seconds for it."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                if self._error is not None:
                    raise AssertionError(f"the event receiver failed: {self._error!r}")
                value = check(self.events)
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    shown = what() if callable(what) else what
                    types = [(e.get("hostname"), e["type"]) for e in self.events[-30:]]
                    raise AssertionError(
                        f"timed out after {timeout} s waiting for {shown}; last events: {types}"
                    )
                self.cond.wait(min(left, 0.5))

    def task_event(self, task_id: str, event_type: str, timeout: float) -> dict[str, Any]:
        def find(evs: list[dict[str, Any]]) -> dict[str, Any] | None:
            return next(
                (e for e in evs if e.get("uuid") == task_id and e["type"] == event_type), None
            )

        found: dict[str, Any] = self.wait_for(find, timeout, f"{event_type} of {task_id}")
        return found
