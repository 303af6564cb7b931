"""The README's first command: a real worker on the embedded broker, running real tasks.

Starts `millpond worker` as a separate process on a fresh sqlite:// broker (no server needed), sends
it the example shop's tasks from this process, prints each result as it completes, then stops the
worker with SIGTERM (a warm shutdown) and checks that it exited cleanly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="millpond-demo-"))
    os.environ["MILLPOND_BROKER_URL"] = f"sqlite://{workdir / 'broker.sqlite3'}"
    os.environ.pop("MILLPOND_RESULT_BACKEND", None)
    sys.path.insert(0, str(ROOT))
    from examples.shop import add, app, charge_card, order_total, price_line, refund, resize_image
    from millpond import chord

    print(f"demo: broker {os.environ['MILLPOND_BROKER_URL']} (embedded, no server)")
    cmd = [
        sys.executable,
        "-m",
        "millpond",
        "worker",
        "-A",
        "examples.shop:app",
        "-P",
        "threads",
        "-c",
        "4",
        "--log-format",
        "console",
        "-l",
        "INFO",
    ]
    print("demo: starting", " ".join(["millpond", *cmd[3:]]), flush=True)
    worker = subprocess.Popen(cmd, cwd=ROOT)
    try:
        results = [("add(2, 3)", add.delay(2, 3))]
        results += [
            (f"resize_image({n!r}, 640)", resize_image.delay(n, 640))
            for n in ("cat.png", "dog.png", "owl.png")
        ]
        results.append(("charge_card('A-17', 12.5)", charge_card.delay("A-17", 12.5)))
        results.append(("refund('B-3')", refund.delay("B-3")))
        results.append(
            ("chain add(1, 2) | add(10) | add(100)", (add.s(1, 2) | add.s(10) | add.s(100))())
        )
        lines = [("pen", 3), ("notebook", 2), ("ink", 1)]
        total = chord((price_line.s(sku, q) for sku, q in lines), order_total.s())()
        results.append(("chord of 3 price_line -> order_total", total))
        print(f"demo: sent {len(results)} tasks; results as they complete:", flush=True)
        deadline = time.monotonic() + 60
        pending = dict(results)
        while pending:
            if time.monotonic() > deadline:
                print(f"demo: FAILED: no result after 60 s for {', '.join(pending)}")
                return 1
            if worker.poll() is not None:
                print(f"demo: FAILED: the worker exited early with code {worker.returncode}")
                return 1
            for label, handle in list(pending.items()):
                if handle.ready():
                    del pending[label]
                    try:
                        print(f"  ✓ {label} -> {handle.get(timeout=1)!r}", flush=True)
                    except Exception as exc:
                        print(f"  ✗ {label} raised {type(exc).__name__}: {exc}", flush=True)
            time.sleep(0.05)
        print("demo: all results in; sending SIGTERM for a warm shutdown", flush=True)
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=30)
        print(f"demo: worker exited with code {code}", flush=True)
        return 0 if code == 0 else 1
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        app.close()


if __name__ == "__main__":
    sys.exit(main())
