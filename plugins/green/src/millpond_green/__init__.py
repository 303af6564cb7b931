"""The green-pool base shared by millpond's gevent and eventlet pools (see `millpond_green.base`)."""
