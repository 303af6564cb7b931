"""The settings sections of the kombu brokers: `[sqs]`, `[filesystem]` and `[kombu]`.

One declaration per kind of transport, whichever way an option is given: the section in
`millpond.toml`, `MILLPOND_SQS__VISIBILITY_TIMEOUT=60` in the environment, `Millpond(sqs={...})`,
or a URL query parameter (`sqs://k:s@host:port?region=eu-west-1`). Each is published under the
`millpond.settings` entry-point group once per URL scheme it serves, which is how the core finds it
for a broker URL. The generic `[kombu]` section serves every other kombu virtual transport
(zookeeper://, mongodb://, ...). This module imports nothing from kombu or boto3, so the core can
validate the settings without them installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from millpond.config.options import Section, declared, setting

#: SQS's own limits: a message's DelaySeconds and a long poll's WaitTimeSeconds
SQS_MAX_DELAY = 900
SQS_MAX_WAIT = 20
#: SQS's longest visibility timeout (12 hours)
SQS_MAX_VISIBILITY = 43200


@dataclass(frozen=True)
class _Publishing:
    """The setting every kombu section has (a dataclass base: its field comes first)."""

    publish_retry_timeout: float = setting(
        20.0,
        "Seconds a publish keeps retrying while the transport is unreachable before it raises "
        "PublishError.",
        minimum=0,
    )


@dataclass(frozen=True)
class SqsSettings(_Publishing):
    """The [sqs] section: each field declares one setting (`SQS` is derived from them)."""

    region: str = setting("us-east-1", "AWS region of the queues (kombu's `region`).")
    is_secure: bool = setting(
        True,
        "Talk HTTPS to the endpoint named in the URL's host (off for a local endpoint such as "
        "moto or ElasticMQ on http://).",
    )
    queue_name_prefix: str = setting(
        "",
        "Prefix of every SQS queue name (kombu's `queue_name_prefix`; must match the Celery "
        "side when sharing).",
    )
    visibility_timeout: float = setting(
        30.0,
        "Seconds a received message stays invisible to other workers. A live worker extends it "
        "every third of this while the task runs, so long tasks never run twice; a killed "
        "worker's messages come back after this.",
        minimum=1,
        maximum=SQS_MAX_VISIBILITY,
    )
    queue_visibility_timeout: int = setting(
        1800,
        "VisibilityTimeout attribute of the queues millpond creates (kombu's default; what "
        "Celery workers on the same queue get, since they do not extend it).",
        minimum=0,
        maximum=SQS_MAX_VISIBILITY,
    )
    wait_time_seconds: int = setting(
        10,
        "Long-poll wait of one ReceiveMessage call (0..20): longer means fewer requests on idle"
        " queues.",
        minimum=0,
        maximum=SQS_MAX_WAIT,
    )
    message_group_id: str = setting(
        "default",
        "FIFO queues: MessageGroupId of a message whose producer named none (a message property"
        " `MessageGroupId` wins).",
    )
    dead_letter_after: int | None = setting(
        None,
        "Also set an SQS redrive policy on declared queues: SQS itself moves a message to "
        "`<queue>.dead` after this many receives (unset: only millpond dead-letters, after "
        "max_deliveries, with a reason).",
        minimum=1,
        maximum=1000,
    )
    creation_attributes: Mapping[str, Any] = setting(
        {},
        "Extra CreateQueue attributes of the queues millpond creates (kombu's `sqs-creation-"
        "attributes`), e.g. KmsMasterKeyId.",
    )


SQS = Section(
    "sqs",
    "Amazon SQS broker (kombu's SQS transport)",
    declared(SqsSettings),
    hints={
        "sqs-creation-attributes": "use creation_attributes",
        "predefined_queues": "not supported yet: millpond resolves queues by name; give the "
        "account's queues names that match (queue_name_prefix helps)",
        "polling_interval": "millpond long-polls each queue in its own thread; tune "
        "wait_time_seconds instead",
        "transport_options": "give each option by its own name in the [sqs] section",
    },
)


@dataclass(frozen=True)
class FilesystemSettings(_Publishing):
    """The [filesystem] section: each field declares one setting (`FILESYSTEM` is derived from them)."""

    data_folder: str | None = setting(
        None,
        "Directory holding the messages (kombu's data_folder_in and data_folder_out, which "
        "Celery must set to this same directory); `filesystem:///path` in the URL says the "
        "same.",
    )
    polling_interval: float = setting(
        0.1,
        "Seconds between two looks at the directory while its queues are empty.",
        minimum=0.005,
    )
    recover_interval: float = setting(
        1.0,
        "Seconds between two looks for the claimed messages of consumers that died (they come "
        "back at once when found).",
        minimum=0.05,
    )


FILESYSTEM = Section(
    "filesystem",
    "File-system broker (kombu's filesystem transport)",
    declared(FilesystemSettings),
    hints={
        "data_folder_in": "millpond reads and writes one directory: set data_folder",
        "data_folder_out": "millpond reads and writes one directory: set data_folder",
        "store_processed": "not supported: acknowledged messages are deleted",
        "transport_options": "give each option by its own name in the [filesystem] section",
    },
)


@dataclass(frozen=True)
class KombuSettings(_Publishing):
    """The [kombu] section: each field declares one setting (`KOMBU` is derived from them)."""

    transport_options: Mapping[str, Any] = setting(
        {},
        "kombu transport_options handed to the transport as they are (see kombu's documentation"
        " of that transport).",
    )
    polling_interval: float = setting(
        0.1,
        "Seconds between two looks at each queue while they are empty.",
        minimum=0.005,
    )
    allow_message_loss: bool = setting(
        False,
        "All but zookeeper:// remove a message when it is fetched: a worker killed with "
        "messages in hand loses them. The worker refuses to start on them unless this is on "
        "(say you accept the loss). zookeeper:// keeps fetched messages in flight under the "
        "worker's session and never needs it.",
    )
    recover_interval: float = setting(
        1.0,
        "zookeeper://: seconds between two looks for the in-flight messages of workers whose "
        "Zookeeper session ended (they go back to their queues when found), and for due delayed"
        " messages (a fetching worker also looks at each poll).",
        minimum=0.05,
    )


KOMBU = Section(
    "kombu",
    "Other kombu virtual transports (zookeeper://, mongodb://, consul://, ...)",
    declared(KombuSettings),
)
