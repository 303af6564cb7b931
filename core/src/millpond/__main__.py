"""`python -m millpond` is the `millpond` command: it runs the console script millpond-cli declares.

The command line is a distribution of its own (millpond-cli, which millpond depends on), a client
of the core like any plugin, so the core never imports it: this module finds the installed
`millpond` script through the standard library's metadata and calls it, as the script would be.
Nothing else is imported first, so the script's early monkey-patching still runs before the rest
of millpond (see `millpond_cli.bootstrap`).
"""

import sys
from importlib.metadata import entry_points

scripts = list(entry_points(group="console_scripts", name="millpond"))
if not scripts:
    sys.exit("millpond: the `millpond` command is not installed: pip install millpond-cli")
scripts[0].load()()
