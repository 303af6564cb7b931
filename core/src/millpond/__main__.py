"""`python -m millpond` is the `millpond` command: it runs the console script millpond-cli declares.

The command line is a distribution of its own (millpond-cli, which millpond depends on), a client
of the core like any plugin, so the core never imports it: this module reads the `millpond` script
from that distribution's metadata (one distribution's, not a scan of every installed one) and
calls it, as the script would be. Nothing else is imported first, so the script's early
monkey-patching still runs before the rest of millpond (see `millpond_cli.bootstrap`).
"""

import sys
from importlib.metadata import PackageNotFoundError, distribution

try:
    scripts = list(
        distribution("millpond-cli").entry_points.select(group="console_scripts", name="millpond")
    )
except PackageNotFoundError:
    scripts = []
if not scripts:
    sys.exit("millpond: the `millpond` command is not installed: pip install millpond-cli")
scripts[0].load()()
