"""Remote control: the pidbox node in the worker and the commands it answers (see registry)."""
