"""Profile a millpond worker subprocess with cProfile and report its cost per task.

The worker runs as `python -m cProfile -o <file> -m millpond worker ...`; SIGTERM makes it shut down
warm and exit through `sys.exit`, which cProfile catches before writing the file. cProfile sees
only the main thread, which is where the consumer loop runs (and, with the solo pool, the tasks),
so this is the hot path as the loop experiences it; helper threads (heartbeats) are not included.
Absolute timings are inflated by the profiler (roughly 2x for this kind of code): read the shares.
"""

from __future__ import annotations

import io
import pstats
import sys
from pathlib import Path


def wrap(argv: list[str], out: Path) -> list[str]:
    """`argv` (a `millpond worker` command) run under cProfile, writing `out`."""
    rest = argv[1:] if argv[0].endswith("millpond") else argv[3:]  # script, or python -m millpond
    return [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "millpond", *rest]


def _where(func: tuple[str, int, str]) -> str:
    filename, line, name = func
    if filename == "~":
        return name
    parts = Path(filename).parts
    for anchor in ("site-packages", "src", "lib"):
        if anchor in parts:
            idx = len(parts) - 1 - parts[::-1].index(anchor)
            filename = "/".join(parts[idx + 1 :])
            break
    return f"{filename}:{line}({name})"


def summary(path: Path, tasks: int, top: int = 25) -> str:
    """The `top` functions by own time, with microseconds per task, and the cumulative view."""
    stats = pstats.Stats(str(path))
    raw = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values())
    rows = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    lines = [
        f"profile {path.name}: {total:.3f} s of own time in the main thread, {tasks} tasks "
        f"({total / max(tasks, 1) * 1e6:.1f} µs/task under the profiler)",
        "",
        "| own µs/task | share | calls/task | cumulative µs/task | function |",
        "|---:|---:|---:|---:|---|",
    ]
    for func, (_cc, ncalls, tottime, cumtime, _callers) in rows:
        lines.append(
            f"| {tottime / tasks * 1e6:.1f} | {tottime / total:.1%} | {ncalls / tasks:.2f} | "
            f"{cumtime / tasks * 1e6:.1f} | `{_where(func)}` |"
        )
    buf = io.StringIO()
    cumulative = pstats.Stats(str(path), stream=buf)
    cumulative.sort_stats("cumulative").print_stats(30)
    lines += ["", "cumulative (pstats):", "```", buf.getvalue().strip(), "```"]
    return "\n".join(lines)
