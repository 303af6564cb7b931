"""millpond's control plane: remote control, inspect and revoke (the pidbox node in each worker,
its commands and the `app.control` client), Celery's task and worker events (`-E`), and the
`millpond inspect`, `control` and `events` commands.

The core reaches it only through entry points: `millpond.components` (the worker's part),
`millpond.clients` (`app.control`), `millpond.hooks` (events), `millpond.settings` (`[control]`,
`[events]`) and `millpond.commands` (the CLI). `millpond` depends on this package and this
package on `millpond`, so `pip install millpond` brings both.
"""
