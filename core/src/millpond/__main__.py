"""`python -m millpond` is the `millpond` command (early patching included)."""

from millpond.cli.bootstrap import main

main()
