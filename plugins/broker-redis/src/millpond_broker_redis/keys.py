"""Where everything lives in Redis, in one place.

Queues use kombu's layout so Celery and millpond share them: a queue is a list named after it,
producers LPUSH and consumers pop from the right (RPOP/BRPOP), so the right end is the front. kombu
emulates priorities with one list per priority step, `<queue>\\x06\\x16<step>` (step 0 is the plain
list) and serves lower steps first.

Everything else is millpond's own bookkeeping under `millpond:`, which kombu never reads:

* `millpond:delayed:<queue>`  sorted set of delayed messages scored by eta (epoch seconds); members
  are `<step>:<envelope>`.
* `millpond:counts:<queue>`   hash sha1(envelope) -> deliveries so far, for messages that went back
  to the queue after a delivery (absent for first deliveries, which is the common, free case).
* `millpond:unacked:<consumer>` hash tag -> `<count>:<len(queue)>:<step>:<queue><envelope>`: the
  messages a consumer holds.
* `millpond:lease:<consumer>`  a key whose TTL is the consumer's lease; its heartbeat refreshes it.
* `millpond:consumers`        set of consumer ids that may hold messages (what the restorer scans).
* `millpond:restore-gate`     a short-lived key so restorers run at most once a second in total.
* `millpond:bell:<queue>`     pub/sub channel rung when a delayed message becomes the earliest.
* `millpond:ratelimit:<task>` hash {tokens, stamp}: a global rate limit's token bucket, shared by
  every worker (stamp in Redis's clock); it expires once it would be full again.
* `millpond:serving:<queue>`  sorted set of the consumers serving the queue, scored by when their
  lease ends (ms, Redis's clock): a producer with `delays = auto` holds a delay in Redis only
  while some millpond worker is there to release it.

On Redis Cluster (`redis-cluster://`) every key of one queue must live in one hash slot, or the
scripts above could not touch them together. `Layout` names them so: the queue's name, wherever it
appears in a key, is its hash tag `{<queue>}` (a dead-letter queue `<queue>.dead` shares its
queue's tag: `{<queue>}.dead`), and what the single-server layout keeps once for all queues (the
consumers set, the restore gate, a consumer's unacked hash and lease) is kept per queue, under the
queue's tag, with the consumer known there as `{<queue>}:<consumer>`. The scripts do not change: they
are handed the tagged name as the queue. So a cluster queue `orders` is the list `{orders}`, with
`millpond:delayed:{orders}`, `millpond:unacked:{orders}:<consumer>` and so on; kombu knows none of
these names (and has no cluster transport), so Celery cannot share a cluster queue. Chords use
`celery-taskset-meta-{<group id>}...`, one slot per chord.

Results and chords use Celery's Redis result layout, so either side reads and joins the other's:

* `celery-task-meta-<task id>`        a task's result (JSON), also PUBLISHed on a channel of that name.
* `celery-taskset-meta-<group id>`    a saved group (`GroupResult.save`): `{"result": <as_tuple>}`.
* `celery-taskset-meta-<group id>.s`  a chord's size: how many header parts the join waits for.
* `celery-taskset-meta-<group id>.t`  parts added at run time (Celery's `add_to_chord`), added to `.s`.
* `celery-taskset-meta-<group id>.j`  sorted set of returned parts, each the JSON of
                                      `[1, task id, state, result]`, scored by the part's group index
                                      (`+inf` when it has none), so they read back in header order.
* `celery-taskset-meta-<group id>.d`  set of `<task id>:<score>` already in `.j`: a part returned
                                      twice (a redelivered header task) counts once.
* `celery-taskset-meta-<group id>.c`  the join's claim: a random token with an expiry, held by the
                                      one caller that sends the body; `done` (with an expiry) once
                                      the body went out, so late copies of a part are ignored.
"""

from __future__ import annotations

from bisect import bisect
from dataclasses import dataclass
from typing import Final

from millpond.contracts.broker import dead_letter_queue
from millpond.exceptions import ConfigurationError

SEP: Final = "\x06\x16"
PREFIX: Final = "millpond:"
CONSUMERS: Final = PREFIX + "consumers"
RESTORE_GATE: Final = PREFIX + "restore-gate"
RESULT_PREFIX: Final = "celery-task-meta-"
GROUP_PREFIX: Final = "celery-taskset-meta-"
#: how long a `counts` hash lives after its last write; a count older than this is forgotten (the
#: message was most likely taken by a Celery worker, which does not clear it).
COUNTS_TTL: Final = 7 * 24 * 3600
MAX_QUEUE_NAME: Final = 1024


def check_queue(queue: str) -> str:
    """A queue name that is safe in kombu's layout; anything else is a clear error."""
    if not isinstance(queue, str) or not queue:
        raise ConfigurationError(f"queue name must be a non-empty string, got {queue!r}")
    if SEP in queue:
        raise ConfigurationError(
            f"queue name {queue!r} contains kombu's separator \\x06\\x16; choose another name"
        )
    if len(queue) > MAX_QUEUE_NAME:
        raise ConfigurationError(
            f"queue name of {len(queue)} characters is too long (at most {MAX_QUEUE_NAME})"
        )
    return queue


def step_for(priority: object, steps: tuple[int, ...]) -> int:
    """kombu's mapping of a message priority (0..9, clamped) onto a priority step."""
    try:
        value = int(priority)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        value = 0
    value = min(max(value, 0), 9)
    return steps[bisect(steps, value) - 1]


def list_key(queue: str, step: int) -> str:
    return f"{queue}{SEP}{step}" if step else queue


def list_keys(queue: str, steps: tuple[int, ...]) -> list[str]:
    return [list_key(queue, s) for s in steps]


def dead_key(queue: str) -> str:
    return dead_letter_queue(queue)


def delayed_key(queue: str) -> str:
    return f"{PREFIX}delayed:{queue}"


def counts_key(queue: str) -> str:
    return f"{PREFIX}counts:{queue}"


def unacked_key(consumer_id: str) -> str:
    return f"{PREFIX}unacked:{consumer_id}"


def lease_key(consumer_id: str) -> str:
    return f"{PREFIX}lease:{consumer_id}"


def serving_key(queue: str) -> str:
    return f"{PREFIX}serving:{queue}"


def bell_channel(queue: str) -> str:
    return f"{PREFIX}bell:{queue}"


def result_key(task_id: str) -> str:
    return f"{RESULT_PREFIX}{task_id}"


def group_key(group_id: str, suffix: str = "") -> str:
    """A saved group's key (no suffix) or one of its chord's keys (`.j`, `.t`, `.s`, `.d`, `.c`)."""
    return f"{GROUP_PREFIX}{group_id}{suffix}"


def rate_limit_key(name: str) -> str:
    """The token bucket of a global rate limit (a task's name)."""
    return f"{PREFIX}ratelimit:{name}"


@dataclass(frozen=True, slots=True)
class Layout:
    """Key names for one deployment: kombu's names on a single server or a sentinel-managed one;
    hash-tagged per queue on Redis Cluster (see the module's docstring)."""

    cluster: bool = False

    def check(self, queue: str) -> str:
        """`check_queue`, plus: on a cluster the name may not hold braces, which would change
        its hash tag (and so split its keys across slots)."""
        check_queue(queue)
        if self.cluster and ("{" in queue or "}" in queue):
            raise ConfigurationError(
                f"queue name {queue!r} contains '{{' or '}}'; on Redis Cluster a queue's name is "
                "its keys' hash tag, so it may not hold braces: choose another name"
            )
        return queue

    def queue(self, queue: str) -> str:
        """The name the queue goes by in keys (and in the scripts): itself, or its hash tag."""
        if not self.cluster:
            return queue
        dead = dead_letter_queue("")
        if queue.endswith(dead) and len(queue) > len(dead):
            return self.queue(queue[: -len(dead)]) + dead
        return "{" + queue + "}"

    def tag(self, queue: str) -> str:
        """The part of every key of this queue that decides its slot ("" on one server)."""
        if not self.cluster:
            return ""
        name = self.queue(queue)
        return name[: name.index("}") + 1]

    def consumers(self, queue: str) -> str:
        return f"{CONSUMERS}:{self.tag(queue)}" if self.cluster else CONSUMERS

    def restore_gate(self, queue: str) -> str:
        return f"{RESTORE_GATE}:{self.tag(queue)}" if self.cluster else RESTORE_GATE

    def member(self, queue: str, consumer: str) -> str:
        """The id a consumer goes by among a queue's keys (its unacked hash and lease)."""
        return f"{self.tag(queue)}:{consumer}" if self.cluster else consumer

    def group(self, group_id: str, suffix: str = "") -> str:
        """A chord's keys, in one slot on a cluster."""
        if self.cluster:
            return f"{GROUP_PREFIX}{{{group_id}}}{suffix}"
        return group_key(group_id, suffix)
