"""`python -m millpond` runs the `millpond` console script of millpond-cli, a client of the core
like any plugin (so the core never imports it). The script is read from that one distribution's
metadata and nothing else is imported first, so its early monkey-patching still comes first.
"""

import sys
from importlib.metadata import PackageNotFoundError, distribution

try:
    (script,) = distribution("millpond-cli").entry_points.select(
        group="console_scripts", name="millpond"
    )
except (PackageNotFoundError, ValueError):  # ValueError: it declares no such script
    sys.exit("millpond: the `millpond` command is not installed: pip install millpond-cli")
script.load()()
