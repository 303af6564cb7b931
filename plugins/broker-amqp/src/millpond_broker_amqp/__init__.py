"""RabbitMQ (AMQP 0-9-1) broker for millpond: `amqp://`, `amqps://` and `pyamqp://` URLs.

See docs/rabbitmq.md for the options, the delay design and the operational notes.
"""

from millpond_broker_amqp.broker import AmqpBroker
from millpond_broker_amqp.consumer import AmqpConsumer
from millpond_broker_amqp.rpc import RpcResultBackend
from millpond_broker_amqp.settings import AmqpSettings

__all__ = ["AmqpBroker", "AmqpConsumer", "AmqpSettings", "RpcResultBackend"]
