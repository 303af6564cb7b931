"""docs/rate-limits.md runs as written: its Python blocks against a `millpond worker` of
examples/ratelimits.py on Redis, on a queue of the test's own; and the example in the docs is the
example in examples/."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest

from tests.e2e.docs_runner import DOCS, clean_env, forget_redis_queue, guide_worker, run_guide
from tests.e2e.harness import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

DOC = DOCS / "rate-limits.md"
REDIS_URL = "redis://127.0.0.1:6379/0"


def test_the_docs_example_is_the_example_file() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    example = (ROOT / "examples" / "ratelimits.py").read_text()
    body = example[example.index("import time") :]
    assert body in blocks, "docs/rate-limits.md shows examples/ratelimits.py as it is"


def test_the_rate_limits_page_runs_against_a_millpond_worker(tmp_path: Path) -> None:
    queue = f"docs-ratelimits-{uuid.uuid4().hex[:10]}"
    env = clean_env(
        MILLPOND_BROKER_URL=REDIS_URL, MILLPOND_QUEUES=queue, MILLPOND_DEFAULT_QUEUE=queue
    )
    args = ["-A", "examples.ratelimits:app", "-P", "threads", "-c", "4"]
    try:
        with guide_worker(args, env, tmp_path / "worker.log") as log:
            printed = run_guide(DOC, env, module="docs", worker_log=log)
        assert "geocode started at" in printed
    finally:
        forget_redis_queue(REDIS_URL, queue, "millpond:ratelimit:examples.ratelimits.send_sms")
