"""The scheduler loop: one leader among the replicas publishes each tick once.

How N replicas publish each tick exactly once, with nothing but the app's broker:

1. **Leader lease.** Every replica tries `claims.acquire(<prefix>:leader, me, lease_timeout)`; the
   holder leads and renews every third of `lease_timeout`, the others try again every fifth. A
   leader that dies stops renewing: another replica leads at most `lease_timeout` plus one poll
   later (`millpond beat --list` shows who leads). A leader publishes only while its lease is
   known to be valid, and gives it up when it stops, so a planned restart hands over at once.
2. **Per-tick claims.** Before publishing the tick at instant T of entry E, the leader takes the
   claim `<prefix>:tick:E:T` (kept an hour). Should two replicas both believe they lead (a leader
   frozen past its lease, then resuming), only one of them gets the tick.
3. **State.** After publishing, the leader records T as E's last tick in `<prefix>:state`, where
   the claims live. A new leader starts from there: ticks that fell while nobody led follow the
   entry's `catch_up` (run_once: the latest of them is published once; skip: they are dropped),
   never a burst.

The window that remains: a leader killed after taking a tick's claim and before the broker has
the message loses that one tick (it is counted as missed by nobody); the claim is never taken
twice, so no tick is ever published twice. Where claims end with their holder's connection
(RabbitMQ), the tick claim cannot fence a successor against a dead leader's last tick, so there
the tick is recorded in the state before it is published: the same window, the same outcome.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from millpond.contracts.broker import Claims
from millpond.exceptions import ConfigurationError, MillpondError
from millpond.wire.protocol import PERIODIC_TASK_NAME
from millpond_beat import metrics
from millpond_beat.clock import Clock, SystemClock
from millpond_beat.entries import Entry

if TYPE_CHECKING:
    from millpond.produce.app import Millpond

log = structlog.get_logger("millpond.beat")

#: the header carrying the tick's instant (epoch seconds): which slot a message is
TICK_HEADER = "x-millpond-beat-tick"
#: the state field naming the replica that was last elected (entry names never start with "@")
LEADER_FIELD = "@leader"
#: how long a tick's claim is kept: a second publisher of one tick would have to be frozen longer
TICK_CLAIM_TTL = 3600.0


@dataclass(frozen=True, slots=True)
class BeatConfig:
    """The `[beat]` settings the loop reads (see `millpond_beat.settings`)."""

    lease_timeout: float = 5.0
    late_after: float = 2.0
    reload_interval: float = 5.0
    key_prefix: str = "millpond.beat"
    #: the longest sleep between rounds: a wall clock stepped forward (NTP) is noticed this soon
    max_sleep: float = 60.0

    @classmethod
    def from_section(cls, values: Mapping[str, Any]) -> BeatConfig:
        return cls(
            lease_timeout=float(values["lease_timeout"]),
            late_after=float(values["late_after"]),
            reload_interval=float(values["reload_interval"]),
            key_prefix=str(values["key_prefix"]),
        )

    @property
    def leader_key(self) -> str:
        return f"{self.key_prefix}:leader"

    @property
    def state_key(self) -> str:
        return f"{self.key_prefix}:state"

    def tick_key(self, entry: str, tick: float) -> str:
        return f"{self.key_prefix}:tick:{entry}:{tick!r}"


def replica_id() -> str:
    """This replica's name in the leader lease: host, pid and a random part (pids repeat)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Beat:
    """The scheduler of one replica. `run()` loops until `stop()`; `step()` is one round."""

    def __init__(
        self,
        app: Millpond,
        entries: Mapping[str, Entry],
        claims: Claims,
        config: BeatConfig | None = None,
        *,
        clock: Clock | None = None,
        reload: Callable[[], Mapping[str, Entry] | None] | None = None,
        published: Callable[[str, float], None] | None = None,
        name: str | None = None,
        meter_provider: Any = None,
    ) -> None:
        self.app = app
        self.claims = claims
        self.config = config or BeatConfig()
        self.clock: Clock = clock or SystemClock()
        self.name = name or replica_id()
        self.reload = reload
        #: told (entry name, tick) after each tick this replica published (a schedule source
        #: records the row's last run with it)
        self.published = published
        self.entries: dict[str, Entry] = dict(entries)
        self.leading = False
        self.metrics = metrics.BeatMetrics(meter_provider)
        self._stop = threading.Event()
        #: per entry: the last tick handled (published or dropped), and the next one due
        self._last: dict[str, float] = {}
        self._due: dict[str, float | None] = {}
        self._lease_until = 0.0
        self._next_lease = 0.0
        self._next_reload = 0.0

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> None:
        log.info("beat starting", replica=self.name, entries=len(self.entries))
        try:
            while not self._stop.is_set():
                try:
                    wait = self.step()
                except Exception:  # a bug or a surprise must not end the schedule
                    log.exception("beat round failed; trying again in a second")
                    wait = 1.0
                if self.clock.wait(wait, self._stop):
                    break
        finally:
            self._step_down("stopping")

    def stop(self) -> None:
        self._stop.set()

    def step(self) -> float:
        """One round: reload, keep or seek the lease, publish what is due; returns how long to
        sleep before the next round."""
        now = self.clock.time()
        if self.reload is not None and self.config.reload_interval and now >= self._next_reload:
            self._next_reload = now + self.config.reload_interval
            self._reload(now)
        if now >= self._next_lease:
            self._lease(now)
        if self.leading:
            self._publish_due(self.clock.time())
        return self._sleep_for(self.clock.time())

    def _sleep_for(self, now: float) -> float:
        wake = self._next_lease
        if self.reload is not None and self.config.reload_interval:
            wake = min(wake, self._next_reload)
        if self.leading:
            for due in self._due.values():
                if due is not None:
                    wake = min(wake, due)
        return max(0.0, min(wake - now, self.config.max_sleep))

    # -- leadership ------------------------------------------------------------------------------
    def _lease(self, now: float) -> None:
        ttl = self.config.lease_timeout
        try:
            held = self.claims.acquire(self.config.leader_key, self.name, ttl)
        except MillpondError as exc:
            log.warning("beat cannot reach the claims store", error=str(exc))
            held = False
        if held:
            self._lease_until = now + ttl
            self._next_lease = now + ttl / 3
            if not self.leading:
                self._elected(now)
        else:
            if self.leading:
                log.warning("beat lost the lead", replica=self.name)
            self.leading = False
            self._next_lease = now + min(ttl / 5, 1.0)

    def _elected(self, now: float) -> None:
        try:
            state = self.claims.load_state(self.config.state_key)
        except MillpondError as exc:
            log.warning("beat cannot read its state; not leading yet", error=str(exc))
            self._next_lease = now + min(self.config.lease_timeout / 5, 1.0)
            return
        self.leading = True
        # who leads, for `--list` on brokers that cannot say who holds a claim (RabbitMQ)
        self._save(LEADER_FIELD, self.name)
        self._last.clear()
        self._due.clear()
        self._forget(
            n for n, v in state.items() if v and n != LEADER_FIELD and n not in self.entries
        )
        for name, entry in self.entries.items():
            self._start_entry(name, entry, state.get(name), now)
        log.info("beat leads", replica=self.name, entries=len(self.entries))

    def _start_entry(self, name: str, entry: Entry, stored: str | None, now: float) -> None:
        last = _parse_tick(stored)
        if last is None:
            # never ran: the first tick is the next one from now, and it is recorded at once, so
            # a leader elected after this one still owes that tick (and catches it up)
            last = now
            self._save(name, last)
            if entry.next_after(now) is None:
                log.warning("beat entry will never run: its one tick (at) passed before it was "
                            "scheduled; give it a time to come, or remove it",
                            entry=name, schedule=entry.schedule.describe())  # fmt: skip
        self._last[name] = last
        self._due[name] = entry.next_after(last)

    def _forget(self, names: Iterable[str]) -> None:
        """Drop the last ticks of entries no longer scheduled, as Celery beat drops them from its
        schedule file: one added back (or enabled again) later starts afresh, and its old last
        tick does not make a leader catch up a run for the time it was gone."""
        gone = dict.fromkeys(names, "")
        if gone:
            try:
                self.claims.save_state(self.config.state_key, gone)
            except MillpondError as exc:
                log.warning("beat cannot store its state", entries=sorted(gone), error=str(exc))

    def _step_down(self, why: str) -> None:
        if not self.leading:
            return
        self.leading = False
        try:
            self.claims.release(self.config.leader_key, self.name)
        except MillpondError:
            pass  # it runs out by itself
        log.info("beat stepped down", replica=self.name, reason=why)

    # -- ticks -----------------------------------------------------------------------------------
    def _publish_due(self, now: float) -> None:
        for name, entry in list(self.entries.items()):
            due = self._due.get(name)
            if due is None or due > now:
                continue
            if self.clock.time() >= self._lease_until:
                return  # renew first: publishing on an expired lease could race a successor
            following = entry.next_after(due)
            if following is None or following > now:  # the usual case: one tick is due
                latest: float | None = due
                count = 1
            else:  # several fell due while nobody published them
                latest, count = entry.schedule.due_between(self._last[name], now, entry.tz)
                following = entry.next_after(latest) if latest is not None else None
            if latest is None:  # pragma: no cover - due <= now means one is there
                continue
            late = now - latest > self.config.late_after
            missed = count - 1
            if late and entry.catch_up == "skip":
                missed += 1
                log.warning("beat skipped a late tick", entry=name, tick=latest, late=now - latest)
            else:
                outcome = self._publish(entry, latest, now)
                if outcome is None:  # the claims store is unreachable: lead again when it is
                    self.leading = False
                    self._next_lease = now + min(self.config.lease_timeout / 5, 1.0)
                    return
                if outcome and late:
                    self.metrics.late(name)
            if missed:
                self.metrics.missed(name, missed)
                log.warning("beat missed ticks", entry=name, missed=missed, catch_up=entry.catch_up)
            self._last[name] = latest
            self._due[name] = following
            self._save(name, latest)

    def _publish(self, entry: Entry, tick: float, now: float) -> bool | None:
        """Claim the tick, then publish it through the app's producer path (publish hooks, a
        `publish` span): True when this replica published it, False when another replica had
        claimed it (or the broker refused the message), None when the claims store is
        unreachable (the tick is tried again once it is back)."""
        key = self.config.tick_key(entry.name, tick)
        try:
            if not self.claims.acquire(key, self.name, TICK_CLAIM_TTL):
                log.info("beat tick already claimed by another replica", entry=entry.name)
                return False
        except MillpondError as exc:
            log.warning("beat cannot claim a tick", entry=entry.name, error=str(exc))
            return None
        if not self.claims.outlives_holder and not self._record_before_publish(entry, tick, key):
            return None
        options = dict(entry.options)
        if not options.get("queue"):  # the task's own queue if it names one, as for a .delay()
            options["queue"] = self.app.queue_for(entry.task)
        headers = {
            **dict(options.pop("headers", None) or {}),
            PERIODIC_TASK_NAME: entry.name,
            TICK_HEADER: tick,
            "celery_beat_task": True,  # what Celery beat marks its messages with
        }
        # as Celery's: counted from when the tick is sent, so a tick caught up late (run_once)
        # still runs rather than arrive expired
        expires = self.clock.time() + entry.expires if entry.expires is not None else None
        try:
            result = self.app.send_task(
                entry.task,
                entry.args,
                entry.kwargs,
                expires=expires,
                headers=headers,
                **options,
            )
        except Exception as exc:  # the broker refused it, or it cannot be encoded
            log.error("beat could not publish a tick", entry=entry.name, tick=tick, error=str(exc))
            self.metrics.missed(entry.name, 1)
            return False
        self.metrics.published(entry.name)
        if self.published is not None:
            try:
                self.published(entry.name, tick)
            except Exception as exc:
                log.warning("beat cannot record a published tick", entry=entry.name, error=str(exc))
        if not self.claims.outlives_holder:
            # the claim would end with this replica's connection anyway (RabbitMQ): holding it an
            # hour would only keep a queue per tick on the broker
            try:
                self.claims.release(key, self.name)
            except MillpondError:
                pass
        log.info(
            "beat published",
            entry=entry.name,
            task=entry.task,
            task_id=result.id,
            tick=tick,
            late=round(now - tick, 3),
        )
        return True

    def _record_before_publish(self, entry: Entry, tick: float, key: str) -> bool:
        """Where a tick's claim ends with its holder's connection (RabbitMQ), a successor could
        claim a tick the dead leader had already published, so the tick is recorded as the
        entry's last one *before* it is published: a leader killed in between loses that tick,
        none is published twice. False (and the claim given back) when the state cannot be
        written: the tick is tried again once the store answers."""
        try:
            self.claims.save_state(self.config.state_key, {entry.name: repr(tick)})
        except MillpondError as exc:
            log.warning(
                "beat cannot record a tick before publishing it", entry=entry.name, error=str(exc)
            )
            try:
                self.claims.release(key, self.name)
            except MillpondError:
                pass
            return False
        return True

    def _save(self, name: str, value: float | str) -> None:
        try:
            text = value if isinstance(value, str) else repr(value)
            self.claims.save_state(self.config.state_key, {name: text})
        except MillpondError as exc:
            log.warning("beat cannot store its state", entry=name, error=str(exc))

    # -- schedule changes ------------------------------------------------------------------------
    def _reload(self, now: float) -> None:
        assert self.reload is not None
        try:
            fresh = self.reload()
        except ConfigurationError as exc:
            log.error("beat schedule change refused; keeping the running one", error=str(exc))
            return
        if fresh is None:
            return
        fresh = dict(fresh)
        added = [n for n in fresh if n not in self.entries]
        removed = [n for n in self.entries if n not in fresh]
        changed = [
            n
            for n in fresh
            if n in self.entries and fresh[n].fingerprint() != self.entries[n].fingerprint()
        ]
        if not (added or removed or changed):
            return
        log.info("beat schedule changed", added=added, removed=removed, changed=changed)
        self.entries = fresh
        for name in removed:
            self._last.pop(name, None)
            self._due.pop(name, None)
        if self.leading:
            self._forget(removed)
            for name in added:
                self._start_entry(name, fresh[name], None, now)
            for name in changed:  # a changed entry starts afresh: no catch-up of the old schedule
                self._start_entry(name, fresh[name], None, now)

    # -- for --list ------------------------------------------------------------------------------
    def next_ticks(self, now: float) -> dict[str, float | None]:
        """Each entry's next tick from the stored state (what the leader will publish next)."""
        state = self.claims.load_state(self.config.state_key)
        out: dict[str, float | None] = {}
        for name, entry in self.entries.items():
            last = _parse_tick(state.get(name))
            due = entry.next_after(last if last is not None else now)
            if due is not None and due <= now:  # overdue: the leader publishes it next round
                due = now
            out[name] = due
        return out


def _parse_tick(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None
