"""Claims: short-lived, named locks and a little state, held by the broker the app already has.

Replicas of a scheduler (`millpond beat`) agree on who publishes each tick, and remember what was
published, with the app's own infrastructure (Redis `SET NX PX`, a row in the sqlite file). A
broker that can hold claims returns them from `Broker.claims()`, keeping these semantics, from any
thread and after `os.fork()` like `Broker.publish`:

* `acquire(key, owner, ttl)` is atomic: it succeeds when nobody holds `key` (or the holder's time
  ran out) or `owner` does (extended to `ttl` from now); two owners never hold one key at once.
* A claim is forgotten `ttl` seconds after its last successful `acquire`, whatever becomes of the
  holder (a SIGKILLed holder's claims run out).
* `state` is a small string map per namespace, kept until overwritten; no transaction with the
  claims: callers write it after the claim that guards it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds a claim, and for how many more seconds (as the claims store counts)."""

    owner: str
    remaining: float


class Claims(ABC):
    """Named leases and a string map per namespace; see the module docstring for the contract."""

    #: False where a claim ends with its holder's connection (RabbitMQ's exclusive queues), not
    #: at its ttl: callers need not keep claims that only fence against that holder
    outlives_holder: ClassVar[bool] = True

    @abstractmethod
    def acquire(self, key: str, owner: str, ttl: float) -> bool:
        """Take `key` for `owner` for `ttl` seconds, or extend it; whether `owner` holds it now.
        Raises `BrokerError` when the store cannot be reached (then assume nothing is held)."""

    @abstractmethod
    def release(self, key: str, owner: str) -> None:
        """Give `key` up if `owner` holds it (a no-op otherwise), so a successor need not wait."""

    @abstractmethod
    def holder(self, key: str) -> Holder | None: ...

    @abstractmethod
    def load_state(self, namespace: str) -> dict[str, str]:
        """Every field stored under `namespace` (empty when none)."""

    @abstractmethod
    def save_state(self, namespace: str, values: Mapping[str, str]) -> None:
        """Store these fields under `namespace`, keeping the others."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections this object opened itself (the broker's own are the broker's)."""
