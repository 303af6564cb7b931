"""What millpond declares on RabbitMQ: work queues shaped like Celery's, and the delay levels.

Work queues are declared exactly as Celery 5 declares them (a durable queue with no extra
arguments, bound to a durable exchange of the same name, direct unless the option exchange_type
says topic, with the queue name as routing key),
so either side can declare first without a PRECONDITION_FAILED. Dead-lettering is done by the
consumer republishing (see `consumer`), not with a dead-letter exchange argument, for the same
reason.

Delays are held by RabbitMQ in a fixed ladder of "binary delay levels" (the NServiceBus design):
level k is a durable queue whose messages all live exactly `RESOLUTION_MS * 2**k` ms, then are
dead-lettered to level k-1. A message's delay, in units of `RESOLUTION_MS`, is written in binary in
its routing key (one word per level, highest first); each level's topic exchange sends it into
that level's queue when its bit is 1 and straight on to the next level when it is 0. Because every
message in one level queue has the same TTL, the queue expires in order and nothing waits behind a
longer delay (the head-of-line problem of per-message TTLs). The last hop is a headers exchange
that routes on `millpond-delay-target`, the destination queue (a headers exchange ignores
headers whose names start with "x-", so this one must not). RabbitMQ caps a TTL at 2**32-1 ms,
which bounds the ladder at 26 levels (about 77 days); longer delays take more than one trip.

On quorum queues delays go through Celery's native delayed delivery instead (`native_delay`), so a
Celery worker runs a millpond producer's countdowns and the reverse.
"""

from __future__ import annotations

import math
from typing import Any, Final

import amqp
from amqp import exceptions as amqp_exc

from millpond.contracts.broker import dead_letter_queue
from millpond.exceptions import AccessDenied, BrokerError
from millpond_broker_amqp import native_delay
from millpond_broker_amqp.settings import AmqpConfig

RESOLUTION_MS: Final = 100
LEVELS: Final = 26
#: the longest delay one trip through the ladder holds, in seconds
MAX_DELAY: Final = ((1 << LEVELS) - 1) * RESOLUTION_MS / 1000
DELAY_PREFIX: Final = "millpond.delay"
DELIVER_EXCHANGE: Final = "millpond.delay.deliver"
#: header naming the queue a delayed message goes to when its time comes
DELAY_TARGET: Final = "millpond-delay-target"
#: header with the requested delivery time (seconds since the epoch) of a delayed message
DELAY_ETA: Final = "x-millpond-eta"
_MAX_NAME: Final = 255 - len(".dead")


def level_name(level: int) -> str:
    return f"{DELAY_PREFIX}.{level:02d}"


def check_queue_name(name: str, error: type[Exception] = BrokerError) -> None:
    """Refuse names RabbitMQ would refuse later with a less helpful message."""
    if not isinstance(name, str) or not name:
        raise error(f"queue name must be a non-empty string, got {name!r}")
    if len(name.encode()) > _MAX_NAME:
        raise error(
            f"queue name {name[:40]!r}... is {len(name.encode())} bytes; AMQP allows {_MAX_NAME} "
            "(255 minus the '.dead' suffix of its dead-letter queue)"
        )
    if name.startswith("amq."):
        raise error(f"queue name {name!r} starts with 'amq.', which RabbitMQ reserves for itself")


def queue_arguments(settings: AmqpConfig, *, dead: bool = False) -> dict[str, Any] | None:
    """Arguments exactly as Celery passes them (none for a plain classic queue)."""
    args: dict[str, Any] = {}
    if settings.quorum:
        args["x-queue-type"] = "quorum"
    if settings.max_priority is not None and not dead:
        args["x-max-priority"] = settings.max_priority
    return args or None


def declare_queue(channel: amqp.Channel, name: str, settings: AmqpConfig) -> None:
    """The queue, its Celery-style exchange and binding, its dead-letter queue and its binding on
    the delay ladder's last hop; on quorum queues also its binding for Celery's native delayed
    delivery (see `native_delay`), which is where their delays go. Idempotent."""
    check_queue_name(name)
    try:
        channel.exchange_declare(name, settings.exchange_type, durable=True, auto_delete=False)
        channel.queue_declare(
            name, durable=True, auto_delete=False, arguments=queue_arguments(settings)
        )
        channel.queue_bind(name, name, name)
        channel.queue_declare(
            dead_letter_queue(name),
            durable=True,
            auto_delete=False,
            arguments=queue_arguments(settings, dead=True),
        )
        channel.exchange_declare(DELIVER_EXCHANGE, "headers", durable=True, auto_delete=False)
        channel.queue_bind(
            name, DELIVER_EXCHANGE, "", arguments={"x-match": "all", DELAY_TARGET: name}
        )
        if settings.quorum:
            native_delay.bind_queue(channel, name, settings.exchange_type)
    except amqp_exc.PreconditionFailed as exc:
        raise BrokerError(
            f"queue or exchange {name!r} already exists on RabbitMQ with other settings "
            f"({exc.reply_text}); set the broker options queue_type / max_priority / "
            f"exchange_type to match it, or delete it (rabbitmqctl delete_queue {name}) so "
            "millpond can re-create it"
        ) from exc
    except amqp_exc.AccessRefused as exc:
        raise AccessDenied(
            f"RabbitMQ refused to declare queue {name!r} ({exc.reply_text}); the user needs "
            f"configure, write and read permissions on the queue, its exchange {name!r}, its "
            f"dead-letter queue {dead_letter_queue(name)!r} and the exchanges "
            f"{DELIVER_EXCHANGE!r} and {native_delay.DELIVERY_EXCHANGE!r} (rabbitmqctl "
            "set_permissions -p VHOST USER CONFIGURE WRITE READ, each a regex); retrying cannot help"
        ) from exc


def declare_levels(channel: amqp.Channel, top: int) -> None:
    """Delay levels 0..top (lower levels first: each level forwards into the one below)."""
    channel.exchange_declare(DELIVER_EXCHANGE, "headers", durable=True, auto_delete=False)
    for level in range(top + 1):
        name = level_name(level)
        below = level_name(level - 1) if level else DELIVER_EXCHANGE
        skip = ["*"] * (LEVELS - 1 - level)
        channel.exchange_declare(name, "topic", durable=True, auto_delete=False)
        channel.queue_declare(
            name,
            durable=True,
            auto_delete=False,
            arguments={
                "x-message-ttl": RESOLUTION_MS << level,
                "x-dead-letter-exchange": below,
            },
        )
        channel.queue_bind(name, name, ".".join([*skip, "1", "#"]))
        channel.exchange_bind(below, name, ".".join([*skip, "0", "#"]))


def delay_route(delay: float) -> tuple[int, str] | None:
    """`(entry level, routing key)` for a delay in seconds; None when it is due already.

    Delays are rounded up to the resolution (a message is never released early) and capped at
    `MAX_DELAY`; the consumer sends a message that arrives before its eta round again.
    """
    units = math.ceil(delay * 1000 / RESOLUTION_MS - 1e-9)
    if units <= 0:
        return None
    units = min(units, (1 << LEVELS) - 1)
    key = ".".join("1" if units >> k & 1 else "0" for k in range(LEVELS - 1, -1, -1))
    return units.bit_length() - 1, key
