"""Forward first: before a route's local handler runs, the forwarder says
whether another branch must answer the request (nomad's ``forward()`` at the
top of each endpoint, done once here as a middleware).

Today every branch is a cluster of one: :class:`LocalOnly` answers "handle it
here" to everything. The cluster's forwarder (membership's directory, a hop
header so that a request is never forwarded twice) plugs in behind the same
Protocol; the local handlers and the ``Backend`` stay local.
"""

from __future__ import annotations

from typing import Protocol

from aiohttp import web


class Forwarder(Protocol):
    async def forward(self, request: web.Request) -> web.StreamResponse | None:
        """Another branch's answer to ``request``, or None to handle it here."""
        ...


class LocalOnly:
    """A cluster of one: everything is local."""

    async def forward(self, request: web.Request) -> web.StreamResponse | None:
        return None
