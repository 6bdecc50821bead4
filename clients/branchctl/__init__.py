"""branchctl: the Python client and CLI of branchd (never imports branchd)."""

from branchctl.client import DEFAULT_URL, AsyncClient, Client, find_url
from branchctl.errors import ApiError, ConnectionFailed, NoAnswer
from branchctl.models import (
    ActionItem,
    App,
    Autoscale,
    Branch,
    Capacity,
    Consumer,
    Instance,
    Member,
    Queue,
    Stats,
)

__all__ = [
    "DEFAULT_URL",
    "ActionItem",
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
    "Member",
    "NoAnswer",
    "Queue",
    "Stats",
    "find_url",
]
