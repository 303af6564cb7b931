"""The benchmark harness: millpond against Celery on the same broker, pool and machine, interleaved.

Run it with `python3 dev.py bench` (see README.md here and docs/benchmarks.md).
"""
