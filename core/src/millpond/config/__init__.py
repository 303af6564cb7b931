"""One settings system (declarations, loading, validation) and the plugin loader."""
