"""Claims: short-lived, named locks and a little state, held by the broker the app already has.

Why in the broker: a scheduler that runs on several replicas (`millpond beat`) must agree on who
publishes each tick, and must remember what it published, with nothing but the infrastructure the
app already runs. Redis has `SET NX PX`; the embedded sqlite broker has a row in its file; each
broker plugin that can hold a claim implements this contract and returns it from `Broker.claims()`.

The semantics every implementation keeps:

* `acquire(key, owner, ttl)` is atomic: it succeeds when nobody holds `key` (or the holder's time
  ran out), or when `owner` already holds it (then it is extended to `ttl` from now). Two owners
  never both hold one key at the same time, as the server's clock counts.
* A claim is forgotten `ttl` seconds after its last successful `acquire`, whatever happens to the
  process that took it (a SIGKILLed holder frees its claims when they run out).
* `state` is a small string map per namespace, kept until overwritten: the last tick of each
  periodic entry, for example. It is not a transaction with the claims; callers write the state
  after the claim that guards it.

Every method is safe from any thread and after `os.fork()`, like `Broker.publish`.
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

    #: whether a claim outlives its holder's process until its ttl runs out (Redis, sqlite); a
    #: broker whose claims end with the holder's connection (RabbitMQ's exclusive queues) says
    #: False, and callers need not keep claims that only fence against that holder
    outlives_holder: ClassVar[bool] = True

    @abstractmethod
    def acquire(self, key: str, owner: str, ttl: float) -> bool:
        """Take `key` for `owner` for `ttl` seconds, or extend it if `owner` holds it already.

        Returns whether `owner` holds it now. Raises `BrokerError` when the store cannot be
        reached (the caller must then assume it holds nothing).
        """

    @abstractmethod
    def release(self, key: str, owner: str) -> None:
        """Give `key` up if `owner` holds it (a no-op otherwise), so a successor need not wait."""

    @abstractmethod
    def holder(self, key: str) -> Holder | None:
        """Who holds `key` now, or None."""

    @abstractmethod
    def load_state(self, namespace: str) -> dict[str, str]:
        """Every field stored under `namespace` (empty when none)."""

    @abstractmethod
    def save_state(self, namespace: str, values: Mapping[str, str]) -> None:
        """Store these fields under `namespace`, keeping the others."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections this object opened itself (the broker's own are the broker's)."""
