"""Celery's native delayed delivery (Celery 5.5+, kombu's `native_delayed_delivery`), shared.

With quorum queues Celery cannot hold countdowns in a worker's memory for long (quorum queues
redeliver unacked messages past the consumer timeout and have no global QoS), so it keeps them in
RabbitMQ: 28 durable queues `celery_delayed_0` .. `celery_delayed_27`, level k holding every
message exactly 2**k seconds (`x-message-ttl`) and then dead-lettering it into level k-1's topic
exchange (level 0 into the topic exchange `celery_delayed_delivery`). A delayed message is
published to `celery_delayed_27` with a routing key that writes its delay in whole seconds as 28
binary words, highest first, then the queue's routing key (`0.0.....1.0.1.celery`); each level's
exchange sends it into its queue when its word is 1 and on to the next exchange when it is 0. At
the end `celery_delayed_delivery` routes it by the trailing routing key back to its queue.

millpond declares this topology exactly as kombu does (the same names, types, arguments and
bindings), so a Celery worker and a millpond worker, or a Celery producer and a millpond producer,
share one set of queues: whichever declares first, the other's declare agrees. A queue is bound
for the last hop the way Celery's worker binds it when the queue's exchange is a topic exchange
(the only kind Celery's delayed delivery supports); with millpond's default direct exchange the
queue itself is bound to `celery_delayed_delivery` with an exact pattern, so millpond's delays
work without any change to the queue's own exchange.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

import amqp

from millpond.exceptions import PublishError

#: bits in the routing key, hence levels (kombu's MAX_NUMBER_OF_BITS_TO_USE)
BITS: Final = 28
#: the longest delay the topology holds, in seconds (about 8.5 years)
MAX_DELAY: Final = (1 << BITS) - 1
DELIVERY_EXCHANGE: Final = "celery_delayed_delivery"


LEVEL_PREFIX: Final = "celery_delayed_"


def level_name(level: int) -> str:
    """kombu's name of delay level `level` (a queue and a topic exchange of that name)."""
    return f"{LEVEL_PREFIX}{level}"


def came_through(headers: Mapping[str, Any]) -> bool:
    """Whether a delivered message was dead-lettered out of a delay level (its `x-death`
    trail names a `celery_delayed_*` queue)."""
    first = headers.get("x-first-death-queue")
    if isinstance(first, bytes):
        first = first.decode("utf-8", "replace")
    return isinstance(first, str) and first.startswith(LEVEL_PREFIX)


#: where every delayed message is published
ENTRY_EXCHANGE: Final = level_name(BITS - 1)


def declare_topology(channel: amqp.Channel, queue_type: str) -> None:
    """Every level's exchange and queue and the bindings between them, as kombu's
    `declare_native_delayed_delivery_exchanges_and_queues(connection, queue_type)` declares them
    (Celery's worker calls it with `broker_native_delayed_delivery_queue_type`, quorum by
    default). Idempotent; a mismatch with an existing declaration is a channel error."""
    routing_key = "1.#"
    for level in range(BITS - 1, -1, -1):
        name = level_name(level)
        channel.exchange_declare(name, "topic", durable=True, auto_delete=False)
        arguments: dict[str, object] = {
            "x-queue-type": queue_type,
            "x-overflow": "reject-publish",
            "x-message-ttl": (1 << level) * 1000,
            "x-dead-letter-exchange": level_name(level - 1) if level else DELIVERY_EXCHANGE,
        }
        if queue_type == "quorum":
            arguments["x-dead-letter-strategy"] = "at-least-once"
        channel.queue_declare(
            name, durable=True, exclusive=False, auto_delete=False, arguments=arguments
        )
        channel.queue_bind(name, name, routing_key)
        routing_key = "*." + routing_key
    routing_key = "0.#"
    for level in range(BITS - 1, 0, -1):
        # a 0 at this level skips its queue: straight on to the next level's exchange
        channel.exchange_bind(
            destination=level_name(level - 1), source=level_name(level), routing_key=routing_key
        )
        routing_key = "*." + routing_key
    channel.exchange_declare(DELIVERY_EXCHANGE, "topic", durable=True, auto_delete=False)
    channel.exchange_bind(
        destination=DELIVERY_EXCHANGE, source=level_name(0), routing_key=routing_key
    )


def bind_queue(channel: amqp.Channel, queue: str, exchange_type: str) -> None:
    """Bind `queue` (routing key = its name) for the last hop out of `celery_delayed_delivery`.

    A topic exchange is bound as Celery's worker binds it (kombu's
    `bind_queue_to_native_delayed_delivery_exchange`): the exchange to `celery_delayed_delivery`
    and the queue to the exchange, both with `#.<queue>`. Celery skips direct exchanges (its
    delays then fall back to the worker's memory); millpond binds such a queue directly, with
    28 one-word wildcards before the name, so a queue `b` never also gets `a.b`'s messages.
    """
    channel.exchange_declare(DELIVERY_EXCHANGE, "topic", durable=True, auto_delete=False)
    if exchange_type == "topic":
        key = f"#.{queue}"
        channel.exchange_bind(destination=queue, source=DELIVERY_EXCHANGE, routing_key=key)
        channel.queue_bind(queue, queue, key)
    else:
        channel.queue_bind(queue, DELIVERY_EXCHANGE, "*." * BITS + queue)


def routing_key(delay: float, queue: str) -> str | None:
    """The routing key that holds a message `delay` seconds before it reaches `queue`, or None
    when it is due already.

    Delays are rounded up to whole seconds (Celery truncates them; a message must never be
    released early), and one longer than the topology holds raises `PublishError`.
    """
    seconds = math.ceil(delay - 1e-6)
    if seconds <= 0:
        return None
    if seconds > MAX_DELAY:
        raise PublishError(
            f"a delay of {delay:.0f} s is longer than RabbitMQ's native delayed delivery on quorum "
            f"queues can hold ({MAX_DELAY} s = 2**{BITS}-1 s, about 8.5 years: Celery's "
            f"{BITS} celery_delayed_* levels); send it later, or schedule it with beat"
        )
    return ".".join(f"{seconds:0{BITS}b}") + f".{queue}"
