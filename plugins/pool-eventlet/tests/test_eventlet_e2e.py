"""End to end: `millpond worker --pool eventlet --concurrency 500` on RabbitMQ, 2,000 sleeping
tasks, checked through the OTLP spans it exports and the JSON log lines it writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from millpond.testing.harness import AMQP_URL
from millpond_green.kit import check_end_to_end

pytestmark = [pytest.mark.green, pytest.mark.e2e, pytest.mark.slow, pytest.mark.amqp]


def test_2000_tasks_on_rabbitmq_with_trace_and_log_context(tmp_path: Path) -> None:
    figures = check_end_to_end("eventlet", AMQP_URL, tmp_path)
    print(f"eventlet on RabbitMQ: {figures}")
