"""The store: the group-commit append path, the read path, and their I/O-free rules."""
