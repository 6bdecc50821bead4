"""branchctl: the Python client and CLI of branchd (never imports branchd)."""

from branchctl.client import DEFAULT_URL, AsyncClient, Client, find_url
from branchctl.errors import ApiError, ConnectionFailed
from branchctl.models import App, Autoscale, Branch, Capacity, Consumer, Instance, Queue, Stats

__all__ = [
    "DEFAULT_URL",
    "ApiError",
    "App",
    "AsyncClient",
    "Autoscale",
    "Branch",
    "Capacity",
    "Client",
    "ConnectionFailed",
    "Consumer",
    "Instance",
    "Queue",
    "Stats",
    "find_url",
]
