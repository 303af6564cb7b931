"""The producer side: the app, tasks, results."""
