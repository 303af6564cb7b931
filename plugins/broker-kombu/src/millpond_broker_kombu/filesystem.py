"""The file system as a broker: kombu's filesystem layout, with claims that survive a killed worker.

kombu writes each message as one file, `<ms>_<uuid>.<queue>.msg`, in the data folder (Celery's
`data_folder_in`/`data_folder_out`, set to the same directory), and kombu's consumer moves a file
away and deletes it when it reads it: a worker killed with messages in hand loses them. millpond
keeps kombu's files and names, so Celery and millpond share a directory, but a millpond consumer
claims a message by renaming it (atomic on one file system, so two workers never both get it) into
its own claim directory `.millpond/claims/<consumer>/`, next to `<consumer>.lock`, a file it holds
an exclusive `flock` on for as long as it lives. The kernel drops that lock when the process dies,
however it dies, so any other consumer that can take the lock knows the owner is gone and puts its
claimed messages back, counting the delivery. Nothing times out: a live worker keeps its messages
however long its tasks run (the lock is held by the process, not by a thread that must run).

Delays wait in `.millpond/delayed/` as `<eta ms>_<uuid>.<queue>.msg` and are moved into the data
folder, when due, by whichever millpond consumer of the directory looks first (a Celery worker
does not look there). Dead letters are the queue `<queue>.dead` in the same layout.

One machine, or a shared file system whose rename is atomic and whose flock works across the
clients (local disks do; many network file systems do not): see docs/brokers.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
import uuid
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar
from urllib.parse import unquote, urlsplit

from millpond.contracts.broker import Broker, Consumer, Delivery, dead_letter_queue, mask_url
from millpond.contracts.waking import Waker
from millpond.exceptions import ConfigurationError, MalformedMessage
from millpond.wire import envelope
from millpond.wire.protocol import DEATH_REASON, DELIVERY_COUNT, Message
from millpond_broker_kombu.link import Link, warn_unused_priority
from millpond_broker_kombu.polling import delivered, poll_fetch
from millpond_broker_kombu.section import FILESYSTEM
from millpond_broker_kombu.stored import delivery_count, rewrite_headers

log = logging.getLogger("millpond.broker.filesystem")

#: millpond's own directory inside the data folder (kombu ignores it: it has no `.msg` suffix)
OWN = ".millpond"

#: the lease files this process holds: a forked child closes its copies, or a child that outlived
#: a killed worker would keep the worker's lease (and its claimed messages) held
_LEASES: weakref.WeakSet[Any] = weakref.WeakSet()


def _drop_inherited_leases() -> None:
    """In a forked child: point each inherited lease descriptor at /dev/null. The parent keeps its
    lock (an flock belongs to the open file description, held until all its descriptors close);
    the child's file object stays valid, it just no longer holds the lease."""
    leases = list(_LEASES)
    if not leases:
        return
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        for f in leases:
            with contextlib.suppress(OSError, ValueError):
                os.dup2(null, f.fileno())
    finally:
        os.close(null)


os.register_at_fork(after_in_child=_drop_inherited_leases)


def queue_of(filename: str) -> str | None:
    """The queue a kombu message file belongs to (`<ms>_<uuid>.<queue>.msg`), or None."""
    rest = filename.partition(".")[2]
    return rest[: -len(".msg")] if rest.endswith(".msg") and rest != ".msg" else None


def _now_ms() -> int:
    return int(time.time() * 1000)


def _kombu_name(queue: str) -> str:
    """A fresh file name in kombu's pattern (its prefix is monotonic milliseconds)."""
    return f"{round(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"


def _write_atomically(path: Path, data: bytes, scratch: Path) -> None:
    """Write a whole file under `scratch`, then rename it to `path`: readers never see half."""
    tmp = scratch / f"{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _read_whole(path: Path, within: float = 2.0) -> bytes:
    """A claimed file's bytes. kombu's writer creates the file, then locks it, then writes: wait
    (bounded) for its lock, and for the content to be there, before reading."""
    deadline = time.monotonic() + within
    while True:
        with open(path, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_SH)
            data = f.read()
            fcntl.flock(f, fcntl.LOCK_UN)
        if data or time.monotonic() > deadline:
            return data
        time.sleep(0.01)


@dataclass(frozen=True, slots=True)
class Folders:
    """The directories of one data folder."""

    data: Path

    @property
    def own(self) -> Path:
        return self.data / OWN

    @property
    def claims(self) -> Path:
        return self.own / "claims"

    @property
    def delayed(self) -> Path:
        return self.own / "delayed"

    @property
    def scratch(self) -> Path:
        return self.own / "tmp"

    def make(self) -> None:
        for folder in (self.data, self.claims, self.delayed, self.scratch):
            folder.mkdir(parents=True, exist_ok=True)


def _rewrite(
    src: Path, dst: Path, scratch: Path, change: Mapping[str, Any], drop: Iterable[str]
) -> None:
    """Move a message file from `src` to `dst`, changing headers on the way (written whole under
    `scratch` first, then renamed; `src` is removed last, so a crash leaves a copy, never none)."""
    _write_atomically(dst, rewrite_headers(src.read_bytes(), change, drop), scratch)
    src.unlink(missing_ok=True)


class FilesystemBroker(Broker):
    """`filesystem:///abs/dir`, `filesystem://relative/dir`, or `filesystem://` with the
    `data_folder` setting."""

    system: ClassVar[str] = "filesystem"
    supports_delay: ClassVar[bool] = True

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, options)
        safe = mask_url(url)
        self.settings = FILESYSTEM.resolve(self.options, url=url, masked=safe)
        parts = urlsplit(url)
        # filesystem:///abs/dir is absolute; filesystem://rel/dir is relative to the working
        # directory (as sqlite:// URLs are)
        path = unquote(parts.netloc + parts.path)
        folder = self.settings["data_folder"] or (path if path not in ("", "/") else None)
        if not folder:
            raise ConfigurationError(
                f"broker URL {safe!r} names no directory: use filesystem:///path/to/dir or set "
                "the data_folder setting (MILLPOND_FILESYSTEM__DATA_FOLDER)"
            )
        self.folders = Folders(Path(folder).expanduser().resolve())
        self.folders.make()
        data = str(self.folders.data)
        self.link = Link(
            url,
            safe_url=safe,
            transport="filesystem",
            transport_options={
                "data_folder_in": data,
                "data_folder_out": data,
                "control_folder": str(self.folders.own / "control"),
            },
            retry_timeout=float(self.settings["publish_retry_timeout"]),
        )

    def __repr__(self) -> str:
        return f"<FilesystemBroker {self.folders.data}>"

    def close(self) -> None:
        self.link.close()

    def declare(self, queues: Iterable[str]) -> None:
        """Queues are file names: this only makes sure the directories exist."""
        for queue in queues:
            if "/" in queue or "\0" in queue:
                raise ConfigurationError(f"queue name {queue!r} cannot be part of a file name")
        self.folders.make()

    def publish(self, queue: str, message: Message, *, eta: float | None = None) -> None:
        warn_unused_priority("the filesystem broker", message)
        if eta is not None and eta > time.time():
            name = f"{int(eta * 1000):016d}_{uuid.uuid4()}.{queue}.msg"
            payload = envelope.dumps(message, queue=queue).encode()
            _write_atomically(self.folders.delayed / name, payload, self.folders.scratch)
            return
        self.link.publish(queue, message)

    def consumer(self, queues: Sequence[str], prefetch: int) -> Consumer:
        return FilesystemConsumer(self, list(queues), prefetch)

    def _files(self, queue: str) -> list[Path]:
        data = self.folders.data
        return [data / n for n in sorted(os.listdir(data)) if queue_of(n) == queue]

    def purge(self, queue: str) -> int:
        count = 0
        for path in self._files(queue):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                count += 1
        return count

    def queue_length(self, queue: str) -> int:
        return len(self._files(queue))

    def dead_letters(self, queue: str, limit: int = 100) -> list[Message]:
        out: list[Message] = []
        for path in self._files(dead_letter_queue(queue))[:limit]:
            try:
                out.append(envelope.loads(path.read_bytes()))
            except (FileNotFoundError, MalformedMessage):
                continue
        return out

    def replay_dead_letters(self, queue: str, limit: int | None = None) -> int:
        moved = 0
        for path in self._files(dead_letter_queue(queue)):
            if limit is not None and moved >= limit:
                break
            try:
                _rewrite(path, self.folders.data / _kombu_name(queue), self.folders.scratch, {},
                         (DEATH_REASON, DELIVERY_COUNT))  # fmt: skip
            except FileNotFoundError:
                continue  # another process replayed it
            moved += 1
        return moved

    def promote_due(self) -> int:
        """Move the delayed messages that are due into the data folder; return how many."""
        now, moved = _now_ms(), 0
        try:
            names = sorted(os.listdir(self.folders.delayed))
        except FileNotFoundError:
            return 0
        for name in names:
            due, _, rest = name.partition("_")
            if not due.isdigit():
                continue
            if int(due) > now:
                break
            queue = queue_of(rest)
            if queue is None:
                continue
            with contextlib.suppress(FileNotFoundError):  # another consumer moved it first
                os.rename(self.folders.delayed / name, self.folders.data / _kombu_name(queue))
                moved += 1
        return moved

    def next_due(self) -> float | None:
        """Seconds since the epoch when the earliest delayed message is due, if any."""
        try:
            first = min((n for n in os.listdir(self.folders.delayed) if n[:1].isdigit()),
                        default=None)  # fmt: skip
        except FileNotFoundError:
            return None
        return None if first is None else int(first.partition("_")[0]) / 1000


class FilesystemConsumer(Consumer):
    """Claims messages by renaming them into a directory guarded by this process's flock."""

    def __init__(self, broker: FilesystemBroker, queues: list[str], prefetch: int) -> None:
        self.broker = broker
        self.folders = broker.folders
        self.queues = set(queues)
        self.prefetch = max(1, prefetch)
        self.poll = float(broker.settings["polling_interval"])
        self.recover_every = float(broker.settings["recover_interval"])
        self.id = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.dir = self.folders.claims / self.id
        self._lock_file = self._take_lease()
        self.dir.mkdir()
        self._held: dict[str, tuple[str, int]] = {}  # claimed file name -> (queue, count)
        self._next_recovery = 0.0
        self._closed = False

    def _take_lease(self) -> IO[bytes]:
        """The exclusive lock that says this consumer lives: taken on a file under a scratch
        name, then renamed into place, so nobody ever sees the lock file unlocked."""
        tmp = self.folders.scratch / f"{self.id}.lock"
        f = open(tmp, "wb")  # noqa: SIM115 - held open for the consumer's life
        fcntl.flock(f, fcntl.LOCK_EX)
        os.rename(tmp, self.folders.claims / f"{self.id}.lock")
        _LEASES.add(f)
        return f

    @property
    def connected(self) -> bool:
        return not self._closed

    # -- recovery --------------------------------------------------------------------------------
    def _recover(self) -> None:
        """Put back the claims of consumers whose lock can be taken: their process is gone."""
        claims = self.folders.claims
        for name in os.listdir(claims):
            if not name.endswith(".lock") or name == f"{self.id}.lock":
                continue
            try:
                f = open(claims / name, "rb")  # noqa: SIM115
            except FileNotFoundError:
                continue
            with f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its owner lives
                owner = claims / name[: -len(".lock")]
                restored = self._restore_dir(owner)
                if restored:
                    log.warning(
                        "filesystem: a consumer died holding %d message(s); they are back in "
                        "their queues",
                        restored,
                    )
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(owner)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(claims / name)

    def _restore_dir(self, owner: Path) -> int:
        restored = 0
        try:
            names = sorted(os.listdir(owner))
        except FileNotFoundError:
            return 0
        for name in names:
            path = owner / name
            try:
                count = delivery_count(json.loads(path.read_bytes()))
                _rewrite(path, self.folders.data / name, self.folders.scratch,
                         {DELIVERY_COUNT: count + 1}, ())  # fmt: skip
                restored += 1
            except FileNotFoundError:
                continue
            except ValueError:  # not JSON: hand it back as it is, the worker dead-letters it
                with contextlib.suppress(FileNotFoundError):
                    os.rename(path, self.folders.data / name)
        return restored

    def _maintain(self) -> None:
        self.broker.promote_due()
        now = time.monotonic()
        if now >= self._next_recovery:
            self._next_recovery = now + self.recover_every
            self._recover()

    # -- the consumer contract ---------------------------------------------------------------------
    def _claim(self, want: int) -> list[Delivery]:
        out: list[Delivery] = []
        if want <= 0:
            return out
        for name in sorted(os.listdir(self.folders.data)):
            queue = queue_of(name)
            if queue is None or queue not in self.queues:
                continue
            try:
                os.rename(self.folders.data / name, self.dir / name)
            except FileNotFoundError:
                continue  # another consumer claimed it first
            delivery = self._open(name, queue)
            if delivery is not None:
                out.append(delivery)
                if len(out) >= want:
                    break
        return out

    def _open(self, name: str, queue: str) -> Delivery | None:
        path = self.dir / name
        raw = _read_whole(path)
        try:
            message = envelope.loads(raw)
        except MalformedMessage as exc:
            log.warning("filesystem: dead-lettering undecodable message file %s: %s", name, exc)
            bad = Message(body=raw, headers={DEATH_REASON: f"undecodable message file: {exc}"},
                          content_type="application/octet-stream")  # fmt: skip
            payload = envelope.dumps(bad, queue=dead_letter_queue(queue)).encode()
            dead = self.folders.data / _kombu_name(dead_letter_queue(queue))
            _write_atomically(dead, payload, self.folders.scratch)
            path.unlink(missing_ok=True)
            return None
        delivery = delivered(message, queue, name)
        self._held[name] = (queue, delivery.delivery_count)
        return delivery

    def fetch(self, max_count: int, timeout: float, waker: Waker | None = None) -> list[Delivery]:
        def look() -> list[Delivery]:
            self._maintain()
            return self._claim(min(max_count, self.prefetch - len(self._held)))

        return poll_fetch(look, timeout, self.poll, waker, lambda: self._closed)

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            name = str(d.tag)
            self._held.pop(name, None)
            (self.dir / name).unlink(missing_ok=True)

    def reject(self, delivery: Delivery, *, requeue: bool, reason: str = "") -> None:
        name = str(delivery.tag)
        queue, count = self._held.pop(name, (delivery.queue, delivery.delivery_count))
        path = self.dir / name
        if requeue:
            _rewrite(path, self.folders.data / name, self.folders.scratch,
                     {DELIVERY_COUNT: count + 1}, ())  # fmt: skip
        else:
            dead = self.folders.data / _kombu_name(dead_letter_queue(queue))
            _rewrite(path, dead, self.folders.scratch, {DEATH_REASON: reason}, ())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._held.clear()
        self._restore_dir(self.dir)
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(self.dir)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.folders.claims / f"{self.id}.lock")
        self._lock_file.close()
