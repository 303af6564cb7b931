"""Amazon SQS, the file system, Zookeeper and kombu's other virtual transports as millpond brokers.

    MILLPOND_BROKER_URL=sqs://AKIA...:secret@ millpond worker -A app
    MILLPOND_BROKER_URL=filesystem:///var/spool/millpond millpond worker -A app

Messages are written by kombu itself, in the layout Celery uses on the same transport, so Celery
and millpond share queues. See docs/brokers.md, docs/sqs.md.

The public names are imported on first use (PEP 562), so the core can read the settings sections
(`millpond_broker_kombu.section`) without importing kombu or boto3.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from millpond import lazy_export

if TYPE_CHECKING:
    from millpond_broker_kombu.filesystem import FilesystemBroker, FilesystemConsumer
    from millpond_broker_kombu.generic import KombuBroker, KombuConsumer
    from millpond_broker_kombu.sqs import SqsBroker, SqsConsumer
    from millpond_broker_kombu.zookeeper import ZookeeperBroker, ZookeeperConsumer

__all__ = [
    "FilesystemBroker",
    "FilesystemConsumer",
    "KombuBroker",
    "KombuConsumer",
    "SqsBroker",
    "SqsConsumer",
    "ZookeeperBroker",
    "ZookeeperConsumer",
]
__version__ = "0.1.0"

_HOMES = {
    "FilesystemBroker": "millpond_broker_kombu.filesystem",
    "FilesystemConsumer": "millpond_broker_kombu.filesystem",
    "KombuBroker": "millpond_broker_kombu.generic",
    "KombuConsumer": "millpond_broker_kombu.generic",
    "SqsBroker": "millpond_broker_kombu.sqs",
    "SqsConsumer": "millpond_broker_kombu.sqs",
    "ZookeeperBroker": "millpond_broker_kombu.zookeeper",
    "ZookeeperConsumer": "millpond_broker_kombu.zookeeper",
}


def __getattr__(name: str) -> Any:
    return lazy_export(globals(), _HOMES, name)
