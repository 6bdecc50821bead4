"""Forward first: before a route's local handler runs, the directory says
which branch must answer the request, and the forwarder carries it there
(nomad's ``forward()`` at the top of each endpoint, done once here as a
middleware).

Each route has a scope: what it is about decides who answers it. Today every
branch is a cluster of one: :class:`LocalDirectory` answers "this branch" to
everything, so the forwarder is never asked. The cluster's directory
(membership, the owner of each instance, the placement of new ones) and its
forwarder (an HTTP hop with a header so that a request is never forwarded
twice) plug in behind the same Protocols; the local services stay local.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from aiohttp import web

from branchd.errors import BranchUnreachable


class Scope(StrEnum):
    """Who answers a route."""

    #: This branch's own things (ping, its record, its exit, the document).
    BRANCH = "branch"
    #: Declarations (apps, queues): every branch will hold them all (replicated).
    DECLARATION = "declaration"
    #: A new instance: the branch with spare capacity places it.
    PLACEMENT = "placement"
    #: One instance: the branch that owns it.
    INSTANCE = "instance"
    #: A listing of instances: gathered from the branches that own them.
    GATHER = "gather"
    #: One named branch's own switch (drain, undrain): that branch.
    MEMBER = "member"


@dataclass(frozen=True)
class Target:
    """What a request is about: its route's scope and the names in its path."""

    scope: Scope
    app: str | None = None
    name: str | None = None
    branch: str | None = None


#: The other listings of an app that a cluster gathers from every live branch.
GATHERED = frozenset({"/v1/apps/{app}/stats", "/v1/apps/{app}/queues/{queue}/consumers"})


def scope_of(method: str, path: str) -> Scope:
    """A route's scope, from its method and path template."""
    if path.startswith("/v1/branches/{id}/"):
        return Scope.MEMBER
    if not path.startswith("/v1/apps"):
        return Scope.BRANCH
    if path.startswith("/v1/apps/{app}/instances/{name}"):
        return Scope.INSTANCE
    if path == "/v1/apps/{app}/instances":
        return Scope.PLACEMENT if method == "POST" else Scope.GATHER
    if path in GATHERED:
        return Scope.GATHER
    return Scope.DECLARATION


class Directory(Protocol):
    def owner(self, target: Target) -> str | None:
        """The id of the branch that must answer, or None for this branch."""
        ...


class Forwarder(Protocol):
    async def forward(self, request: web.Request, branch: str) -> web.StreamResponse:
        """``branch``'s answer to ``request``."""
        ...


class LocalDirectory:
    """A cluster of one: this branch answers everything."""

    def owner(self, target: Target) -> str | None:
        return None


class NoForwarder:
    """No other branch to reach (a cluster of one)."""

    async def forward(self, request: web.Request, branch: str) -> web.StreamResponse:
        raise BranchUnreachable(f"branch {branch!r} answers this; no other branch can be reached")




class Owners(Protocol):
    """Who holds what, as the cluster knows it (``ClusterService``)."""

    @property
    def self_id(self) -> str: ...
    def owner_of(self, app: str, name: str) -> str | None: ...


class ClusterDirectory:
    """The owner of a named instance is the live branch whose record lists
    it; everything else is answered here (declarations are everyone's;
    placement and gathered listings come with the next steps)."""

    def __init__(self, owners: Owners) -> None:
        self._owners = owners

    def owner(self, target: Target) -> str | None:
        if target.scope is Scope.MEMBER:
            mine = (None, "self", self._owners.self_id)
            return None if target.branch in mine else target.branch
        if target.scope is not Scope.INSTANCE or not target.app or not target.name:
            return None
        owner = self._owners.owner_of(target.app, target.name)
        return None if owner in (None, self._owners.self_id) else owner

