"""branchctl: the Python client and CLI of branchd (never imports branchd)."""

from branchctl.client import DEFAULT_URL, AsyncClient, Client
from branchctl.errors import ApiError, ConnectionFailed
from branchctl.models import App, Branch, Capacity, Instance, Stats

__all__ = [
    "DEFAULT_URL",
    "ApiError",
    "App",
    "AsyncClient",
    "Branch",
    "Capacity",
    "Client",
    "ConnectionFailed",
    "Instance",
    "Stats",
]
