"""The revoked set: bounded in size and time, shared by the workers of a machine through a file.

Celery keeps revoked ids in each worker's memory (a `LimitedSet`, optionally in a `--statedb`
shelve): a worker started after the revoke never hears of it, and a restart forgets it. Here a
revoke holds:

* every worker that hears one (a broadcast `revoke`) adds it here and writes it to the revoked
  file (`[control] revokes_file`, JSON, merged under a lock), which the other workers of the
  machine re-read when it changes and which outlives restarts;
* a worker that starts asks the running ones for theirs (`hello`, Celery's mingle), so a worker
  on another machine started after the revoke knows it too;
* the worker checks every task it receives (before it waits for its eta, after a delay in the
  broker, again before it starts) and answers a revoked one REVOKED without running it.

Bounded like Celery's: at most `revokes_max` ids, each for `revoke_expires` seconds.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("millpond.control")

_FORMAT = 1


class Revoked:
    """Revoked task ids and stamped-header revokes; thread-safe."""

    def __init__(self, maxlen: int, expires: float, path: Path | None = None) -> None:
        self.maxlen = maxlen
        self.expires = expires
        self.path = path
        self._lock = threading.Lock()
        #: id -> when it was revoked (epoch seconds), oldest first
        self._ids: OrderedDict[str, float] = OrderedDict()
        #: stamped header -> {value: when}
        self._stamps: dict[str, dict[str, float]] = {}
        self._file_mtime = -1.0
        self._checked_at = 0.0
        if path is not None:
            self._reload(force=True)

    # -- reading (the worker loop, per task) -----------------------------------------------------
    def __contains__(self, task_id: object) -> bool:
        self._maybe_reload()
        return task_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def matches(self, task_id: str, headers: Mapping[str, Any]) -> str | None:
        """Why the task is revoked ("revoked", "revoked by stamped header x=y"), or None."""
        self._maybe_reload()
        if task_id in self._ids:
            when = self._ids.get(task_id)
            if when is not None and when + self.expires > time.time():
                return "revoked"
        if self._stamps:
            # Celery 5.3+ carries stamps in the `stamps` header, named by `stamped_headers`
            stamps = headers.get("stamps")
            stamps = stamps if isinstance(stamps, dict) else {}
            for header, values in list(self._stamps.items()):
                got = stamps.get(header, headers.get(header))
                if got is None:
                    continue
                for value in got if isinstance(got, list) else [got]:
                    if str(value) in values:
                        return f"revoked by stamped header {header}={value}"
        return None

    def ids(self, limit: int | None = None) -> list[str]:
        """The live ids, newest last; at most `limit` (the newest)."""
        with self._lock:
            self._purge(time.time())
            ids = list(self._ids)
        return ids if limit is None else ids[-limit:] if limit else []

    def stamps(self) -> dict[str, list[str]]:
        with self._lock:
            return {h: sorted(v) for h, v in self._stamps.items()}

    # -- writing (the control thread) ------------------------------------------------------------
    def add(self, task_ids: Iterable[str], *, at: float | None = None) -> list[str]:
        """Revoke ids; returns the ones that were new. Persisted before it returns."""
        now = time.time() if at is None else at
        with self._lock:
            new = [t for t in task_ids if isinstance(t, str) and t and t not in self._ids]
            for task_id in new:
                self._ids[task_id] = now
            self._purge(time.time())
        if new:
            self._save()
        return new

    def add_stamps(self, stamps: Mapping[str, Any]) -> None:
        now = time.time()
        with self._lock:
            for header, values in stamps.items():
                bucket = self._stamps.setdefault(str(header), {})
                for value in values if isinstance(values, list | tuple) else [values]:
                    bucket[str(value)] = now
        self._save()

    def merge(self, task_ids: Iterable[Any]) -> int:
        """Ids another worker knows (its `hello` reply); returns how many were new."""
        return len(self.add(t for t in task_ids if isinstance(t, str)))

    def _purge(self, now: float) -> None:
        ids = self._ids
        cutoff = now - self.expires
        while ids:
            when = next(iter(ids.values()))
            if when >= cutoff and len(ids) <= self.maxlen:
                break
            ids.popitem(last=False)
        for header in list(self._stamps):
            live = {v: w for v, w in self._stamps[header].items() if w >= cutoff}
            if live:
                self._stamps[header] = live
            else:
                del self._stamps[header]

    # -- the file --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked_file(self) -> Any:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{self.path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read_file(self) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        assert self.path is not None
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}, {}
        except (OSError, ValueError) as exc:
            log.warning("cannot read the revoked file %s (%s); starting without it", self.path, exc)
            return {}, {}
        ids = {
            str(t): float(w)
            for t, w in data.get("revoked", [])
            if isinstance(t, str) and isinstance(w, int | float)
        }
        stamps = {
            str(h): {str(v): float(w) for v, w in pairs}
            for h, pairs in (data.get("stamps") or {}).items()
        }
        return ids, stamps

    def _absorb(self, ids: dict[str, float], stamps: dict[str, dict[str, float]]) -> None:
        """Merge what the file holds (lock held)."""
        for task_id, when in sorted(ids.items(), key=lambda kv: kv[1]):
            if task_id not in self._ids:
                self._ids[task_id] = when
        if ids:
            self._ids = OrderedDict(sorted(self._ids.items(), key=lambda kv: kv[1]))
        for header, values in stamps.items():
            self._stamps.setdefault(header, {}).update(values)
        self._purge(time.time())

    def _maybe_reload(self) -> None:
        """Re-read the file when another worker changed it; checked at most once a second."""
        if self.path is None:
            return
        now = time.monotonic()
        if now - self._checked_at < 1.0:
            return
        self._checked_at = now
        self._reload()

    def _reload(self, force: bool = False) -> None:
        assert self.path is not None
        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            return
        if not force and mtime == self._file_mtime:
            return
        try:
            with self._locked_file():
                ids, stamps = self._read_file()
                self._file_mtime = mtime
        except OSError as exc:
            log.warning("cannot read the revoked file %s: %s", self.path, exc)
            return
        with self._lock:
            self._absorb(ids, stamps)

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            with self._locked_file():
                ids, stamps = self._read_file()
                with self._lock:
                    self._absorb(ids, stamps)
                    data = {
                        "format": _FORMAT,
                        "revoked": [[t, w] for t, w in self._ids.items()],
                        "stamps": {
                            h: [[v, w] for v, w in vs.items()] for h, vs in self._stamps.items()
                        },
                    }
                tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(data, separators=(",", ":")))
                os.replace(tmp, self.path)
                self._file_mtime = self.path.stat().st_mtime
        except OSError as exc:
            log.warning(
                "cannot write the revoked file %s (%s): this revoke holds only until the worker "
                "restarts; fix the file's directory or set [control] revokes_file",
                self.path,
                exc,
            )
