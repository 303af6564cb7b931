"""docs/sqs.md runs as written: its Python blocks, against a `millpond worker` of the example shop
on SQS (a moto server on a free loopback port), with results in a sqlite file."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.e2e.docs_runner import DOCS, clean_env, guide_worker, run_guide

pytestmark = [pytest.mark.e2e]


def test_the_sqs_guide_runs_against_a_millpond_worker(tmp_path: Path) -> None:
    pytest.importorskip("moto", reason="moto is in the dev group: python3 dev.py env")
    from millpond_broker_kombu.testing import MotoServer

    queue = f"docs-sqs-{uuid.uuid4().hex[:10]}"
    with MotoServer() as moto:
        env = clean_env(
            MILLPOND_BROKER_URL=moto.url,
            MILLPOND_SQS__IS_SECURE="false",
            MILLPOND_SQS__WAIT_TIME_SECONDS="1",
            MILLPOND_RESULT_BACKEND=f"sqlite://{tmp_path / 'results.db'}",
            MILLPOND_QUEUES=queue,
            MILLPOND_DEFAULT_QUEUE=queue,
        )
        args = ["-A", "examples.shop:app", "-P", "threads", "-c", "8"]
        with guide_worker(args, env, tmp_path / "worker.log") as log:
            run_guide(DOCS / "sqs.md", env, worker_log=log)
