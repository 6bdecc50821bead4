"""branchctl: the command line of branchd, over its HTTP API.

Exit codes: 0 ok, 1 the API answered an error or could not be reached (one
line on stderr), 2 a usage error."""

from branchctl.cli import apps, events, importing, instances, logs, queues  # noqa: F401  (they add their commands)
from branchctl.cli.root import main

__all__ = ["main"]
