"""Chords under SIGKILL: 200 chords of 10 header tasks each, drained by two workers, one killed
at random moments and restarted each time. Every body must run exactly once and nothing may be
lost: the result backend hands the completed join to one worker only (a claim that lapses if that
worker dies before sending the body), a header task redelivered after a kill returns its part
once, and a redelivered message whose task already finished is not run again but returns its
part again.

The killed worker runs header tasks only (the bodies go to a queue of their own that only the
steady worker serves): a body killed half-way through its own run would run again, as any task
does (at least once), and that is not what this test is about. What it tests is the join: the
worker running the last header task killed at any moment, before or after it stored its result,
returned its part, claimed the join, sent the body, or acknowledged."""

from __future__ import annotations

import random
import signal
from collections.abc import Callable
from typing import Any

import pytest

from millpond import Millpond, chord
from millpond.testing.harness import wait_until
from tests.faults.harness import Rig

pytestmark = [pytest.mark.fault, pytest.mark.e2e, pytest.mark.slow]

CHORDS, PARTS, KILLS = 200, 10, 4
PART = "tests.faults.app.chord_part"
BODY = "tests.faults.app.chord_body"


@pytest.mark.parametrize("broker", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_every_chord_body_runs_exactly_once_while_a_worker_is_killed(
    make_rig: Callable[..., Rig], broker: str
) -> None:
    # (on Redis the broker is also the result backend, joining on Celery's keys)
    leases = {"MILLPOND_SQLITE__LEASE_TIMEOUT": "2", "MILLPOND_SQLITE__HEARTBEAT_INTERVAL": "0.3"}
    rig = make_rig(broker, MILLPOND_IGNORE_RESULT="false", **(leases if broker == "sqlite" else {}))
    app = Millpond("chord-producer", broker_url=rig.broker_url, default_queue=rig.queue)
    bodies_queue = f"{rig.queue}-bodies"
    app.broker.declare([rig.queue, bodies_queue])
    part, body = app.signature(PART), app.signature(BODY)
    results = []
    for n in range(CHORDS):
        header = [part.clone((n * PARTS + i,)) for i in range(PARTS)]
        expected = sum(n * PARTS + i for i in range(PARTS))
        chord_body = body.clone(kwargs={"expected": expected}).set(queue=bodies_queue)
        results.append(chord(header, chord_body)())
    steady = rig.spawn("threads", 4, "-Q", f"{rig.queue},{bodies_queue}").wait_ready()
    victim = rig.spawn("threads", 4).wait_ready()
    shuffle = random.Random(CHORDS)
    total = CHORDS * PARTS
    for kill in range(KILLS):
        target = (kill + 1) * total // (KILLS + 2) + shuffle.randrange(total // (KILLS * 4))
        rig.ledger.wait_progress(target, 120, kind="part", alive=rig.alive(steady))
        victim.signal(signal.SIGKILL)
        victim.wait(10)
        victim = rig.spawn("threads", 4).wait_ready()
    bodies = [r.id for r in results]
    try:
        wait_until(
            lambda: len(rig.ledger.counts("body")) >= CHORDS or rig.alive(steady, victim)(),
            60,
            f"{CHORDS} chord bodies to run",
        )
    except AssertionError:
        raise AssertionError(_stuck(app, results, rig)) from None
    assert [r.get(timeout=60) for r in results] == [
        sum(n * PARTS + i for i in range(PARTS)) for n in range(CHORDS)
    ]
    report = rig.ledger.report(f"{CHORDS} chords x {PARTS} on {broker}, {KILLS} kills", bodies,
                               kind="body")  # fmt: skip
    print(report)
    assert not report.missing, report
    assert not report.duplicates, report
    for worker in (steady, victim):
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0, worker.text()[-3000:]
    app.close()


def _stuck(app: Millpond, results: list[Any], rig: Rig) -> str:
    """What the chords whose body never ran look like: their header tasks' states and the join."""
    ran = rig.ledger.counts("body")
    lines = [f"{CHORDS - len(ran)} chord bodies did not run:"]
    for result in results:
        if result.id in ran:
            continue
        header = result.parent
        states = [r.state for r in header.results]
        join = None
        if rig.broker_url.startswith("sqlite://"):
            import sqlite3

            db = sqlite3.connect(rig.broker_url.removeprefix("sqlite://"))
            join = db.execute(
                "SELECT size, claimed_until, done, (SELECT COUNT(*) FROM chord_parts p WHERE "
                "p.group_id = c.group_id) FROM chords c WHERE group_id = ?",
                (header.id,),
            ).fetchone()
            db.close()
        lines.append(f"  body {result.id} state {result.state}; header {states}; join {join}")
    return "\n".join(lines)
