"""branchctl: the Python client and CLI of branchd (never imports branchd)."""
