"""Runs a prefork pool in its own process, exporting spans over OTLP like a real worker.

Used by test_prefork_telemetry.py: OpenTelemetry installs one tracer provider per process, and
the test process already has an in-memory one, so the OTLP path is exercised here instead.

    python -m prefork_driver  # from this directory '{"jobs": 50, "max_tasks_per_child": 1}'

Prints one JSON line: each job's task id, traceparent (its `process` span), state and result.
"""

from __future__ import annotations

import json
import sys

from millpond.testing import tasks
from millpond.testing.pool_kit import Outcomes, Runner, kit_executor, make_job
from millpond_cli import logs
from millpond_pool_prefork import PreforkPool
from millpond_tracing import otel as observability


def main() -> None:
    config = json.loads(sys.argv[1])
    logs.configure("INFO", "json")
    assert observability.configure_tracing("prefork-driver"), "tracing is off: no OTLP endpoint"
    outcomes = Outcomes()
    options = {"kill_grace": 0.5, "max_tasks_per_child": config.get("max_tasks_per_child")}
    pool = PreforkPool(
        config.get("concurrency", 2), outcomes, options, execution=kit_executor(tasks.app)
    )
    pool.start()
    jobs = [make_job("traced", i, i) for i in range(config["jobs"])]
    jobs += [make_job("log", "hello from a child"), make_job("sleep", 60.0, time_limit=0.3)]
    results = Runner(pool, outcomes, 30).run_all(jobs, timeout=60)
    pool.stop(30)
    observability.flush()
    observability.shutdown()
    print(
        json.dumps(
            [
                {
                    "task_id": j.task_id,
                    "task_name": j.task_name,
                    "traceparent": (j.carrier or {}).get("traceparent"),
                    "state": o.state,
                    "result": o.result,
                }
                for j, o in zip(jobs, results, strict=True)
            ]
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
