"""`python -m millpond` is the `millpond` command (early patching included)."""

from millpond._bootstrap import main

main()
