"""The gevent suite runs in its own interpreter (dev.py GREEN_SUITES): patch before anything else.

pytest imports this file before any test module of the directory, so everything the tests import
afterwards (millpond, the broker clients, OpenTelemetry) sees the cooperative socket, select, time
and threading modules, as it does in a worker started by the `millpond` command.
"""

import sys

if "eventlet" in sys.modules:
    raise RuntimeError(
        "eventlet is already loaded in this pytest process: the gevent and eventlet suites "
        "monkey-patch the interpreter and must run in separate pytest processes "
        "(`python -m pytest plugins/pool-gevent/tests`, then plugins/pool-eventlet/tests; "
        "dev.py test does)"
    )

from millpond_pool_gevent.patch import patch

patch()
