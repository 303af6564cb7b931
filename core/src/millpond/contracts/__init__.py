"""What plugins implement: the broker, result backend, pool and hooks contracts."""
