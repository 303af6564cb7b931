"""`millpond_cli.logs.configure`: structlog and stdlib logging set up for a process the CLI owns.

It changes process-wide state (structlog's configuration, the root logger), so it runs in a fresh
interpreter; tests/observability/test_logs.py sees it at work in a real worker.
"""

from __future__ import annotations

import json
import subprocess
import sys

CONFIGURE = """
import io, json, logging, sys
from millpond_cli import logs

class Tty(io.StringIO):
    def isatty(self):
        return True

root = logging.getLogger()
before = list(root.handlers), root.level
out = {}
stream = io.StringIO()
logs.configure("INFO", "auto", stdlib=False, stream=stream)
out["root_untouched"] = (list(root.handlers), root.level) == before
ours = logging.getLogger("millpond")
out["ours_handlers"] = [h.get_name() for h in ours.handlers]
out["ours_propagate"] = ours.propagate
logging.getLogger("millpond.broker.redis").warning("redis: %s failed", "fetch")
import structlog
structlog.get_logger("millpond.test").info("hello", n=1)
out["lines"] = [json.loads(x) for x in stream.getvalue().splitlines()]
out["auto_tty_json"] = logs.use_json("auto", Tty())
out["auto_pipe_json"] = logs.use_json("auto", io.StringIO())
out["forced_json_on_tty"] = logs.use_json("json", Tty())
logs.configure("DEBUG", "json", stdlib=True, stream=stream)
out["root_has_ours"] = [h.get_name() for h in root.handlers].count("millpond")
out["root_level"] = root.level
out["ours_after"] = [h.get_name() for h in ours.handlers], ours.propagate
logs.configure("DEBUG", "json", stdlib=True, stream=stream)
out["root_has_ours_twice"] = [h.get_name() for h in root.handlers].count("millpond")
user = logging.StreamHandler(io.StringIO())
root.handlers = [user]
logs.configure("DEBUG", "json", stdlib=True, stream=stream)
out["user_root_kept"] = root.handlers == [user]
print(json.dumps(out))
"""


def test_configure_keeps_root_alone_and_routes_millponds_own_stdlib_loggers() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CONFIGURE], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["root_untouched"] is True
    assert out["ours_handlers"] == ["millpond"]
    assert out["ours_propagate"] is False
    redis_line, hello = out["lines"]
    assert redis_line == {
        **redis_line,
        "event": "redis: fetch failed",
        "level": "warning",
        "logger": "millpond.broker.redis",
    }
    assert hello == {**hello, "event": "hello", "n": 1, "logger": "millpond.test"}
    assert out["auto_tty_json"] is False
    assert out["auto_pipe_json"] is True
    assert out["forced_json_on_tty"] is True
    assert out["root_has_ours"] == 1
    assert out["root_level"] == 10
    assert out["ours_after"] == [[], True]  # the root handler writes them, once
    assert out["root_has_ours_twice"] == 1  # configuring again does not stack handlers
    assert out["user_root_kept"] is True  # a root logger with handlers of its own is not ours
