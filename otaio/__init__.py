"""I/O adapters: the one place each external I/O library is touched."""
