"""`python -m millpond_cli` is the `millpond` command (early patching included)."""

from millpond_cli.bootstrap import main

main()
