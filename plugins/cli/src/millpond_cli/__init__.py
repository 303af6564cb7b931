"""millpond-cli: the `millpond` command, a client of the core.

`bootstrap` is the console script (`millpond`, and `python -m millpond` / `python -m millpond_cli`):
it monkey-patches the interpreter for a green pool before anything else is imported, then runs
`main`, the core commands (worker, send, result, purge, queue-stats, dlq, plugins, config,
new-pool) and the ones plugins add through `millpond.commands` (`main.load_from_args` gives a
plugin command the settings and app from the common flags). `parser` declares every flag,
`celery_compat` what Celery's command lines and variables need beyond them, `logs` sets up
structlog and stdlib logging for the processes the commands own, `scaffold` writes a pool plugin
package from `templates/pool`, `settings_docs` generates docs/settings.md.
Importing this package imports nothing but itself.
"""
