"""The eventlet suite runs in its own interpreter (dev.py GREEN_SUITES): patch before anything else.

pytest imports this file before any test module of the directory, so everything the tests import
afterwards (millpond, the broker clients, OpenTelemetry) sees the cooperative socket, select, time
and threading modules, as it does in a worker started by the `millpond` command.
"""

import sys

if "gevent" in sys.modules:
    raise RuntimeError(
        "gevent is already loaded in this pytest process: the gevent and eventlet suites "
        "monkey-patch the interpreter and must run in separate pytest processes "
        "(`python -m pytest plugins/pool-gevent/tests`, then plugins/pool-eventlet/tests; "
        "dev.py test does)"
    )

from millpond_pool_eventlet.patch import patch

patch()
