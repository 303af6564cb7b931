"""RabbitMQ (AMQP 0-9-1) broker for millpond: `amqp://`, `amqps://` and `pyamqp://` URLs.

See docs/rabbitmq.md for the options, the delay design and the operational notes.

The public names are imported on first use (PEP 562), so the core can read the settings section
(`millpond_broker_amqp.section`) to validate `[amqp]` without importing py-amqp.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from millpond import lazy_export

if TYPE_CHECKING:
    from millpond_broker_amqp.broker import AmqpBroker
    from millpond_broker_amqp.consumer import AmqpConsumer
    from millpond_broker_amqp.rpc import RpcResultBackend
    from millpond_broker_amqp.settings import AmqpConfig

__all__ = ["AmqpBroker", "AmqpConfig", "AmqpConsumer", "RpcResultBackend"]

_HOMES = {
    "AmqpBroker": "millpond_broker_amqp.broker",
    "AmqpConfig": "millpond_broker_amqp.settings",
    "AmqpConsumer": "millpond_broker_amqp.consumer",
    "RpcResultBackend": "millpond_broker_amqp.rpc",
}


def __getattr__(name: str) -> Any:
    return lazy_export(globals(), _HOMES, name)
