"""The HTTP edge asks its directory before any local handler (forward first):
each route's target (its scope and names) goes to the directory, and what
another branch owns goes to the forwarder."""

from __future__ import annotations

from typing import cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from branchd.api.app import make_app
from branchd.api.backend import Local
from branchd.api.forward import ClusterDirectory, NoForwarder, Scope, Target, scope_of
from branchd.api.routes import ROUTES
from branchd.errors import BranchUnreachable
from branchd.views import BranchRecord, Capacity

RECORD = BranchRecord("b1", "h", "0", 0.0, "x:1", Capacity(1, (0.0, 0.0, 0.0), 0, 0, 0))


class Elsewhere:
    """Instances of app 'far' live on branch b2; new instances are placed on b3."""

    def __init__(self) -> None:
        self.asked: list[Target] = []

    def owner(self, target: Target) -> str | None:
        self.asked.append(target)
        if target.scope == Scope.INSTANCE and target.app == "far":
            return "b2"
        if target.scope == Scope.PLACEMENT:
            return "b3"
        return None


class Carrier:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    async def forward(self, request: web.Request, branch: str) -> web.StreamResponse:
        self.sent.append((request.path, branch))
        return web.json_response({"from": branch})


async def test_the_directory_is_asked_first_and_the_rest_stays_local() -> None:
    directory, carrier = Elsewhere(), Carrier()
    app = make_app(
        cast(Local, object()),  # never reached for a forwarded request
        token=None,
        max_body=1024,
        branch=lambda: RECORD,
        directory=directory,
        forwarder=carrier,
    )
    async with TestClient(TestServer(app)) as client:
        far = await client.get("/v1/apps/far/instances/w1/stats")
        assert (far.status, await far.json()) == (200, {"from": "b2"})
        placed = await client.post("/v1/apps/near/instances", json={})
        assert (placed.status, await placed.json()) == (200, {"from": "b3"})
        here = await client.get("/v1/branch")
        assert (await here.json())["id"] == "b1"
        missing = await client.get("/v1/nothing")  # no route: answered here, not asked
        assert missing.status == 404
    assert directory.asked == [
        Target(Scope.INSTANCE, "far", "w1"),
        Target(Scope.PLACEMENT, "near", None),
        Target(Scope.BRANCH),
    ]
    assert carrier.sent == [
        ("/v1/apps/far/instances/w1/stats", "b2"),
        ("/v1/apps/near/instances", "b3"),
    ]


def test_every_route_has_the_scope_its_path_says() -> None:
    scopes = {(r.method, r.path): scope_of(r.method, r.path) for r in ROUTES}
    assert scopes[("GET", "/v1/ping")] == Scope.BRANCH
    assert scopes[("POST", "/v1/daemon/exit")] == Scope.BRANCH
    assert scopes[("PUT", "/v1/apps/{app}")] == Scope.DECLARATION
    assert scopes[("DELETE", "/v1/apps/{app}/queues/{queue}")] == Scope.DECLARATION
    assert scopes[("POST", "/v1/apps/{app}/instances")] == Scope.PLACEMENT
    assert scopes[("GET", "/v1/apps/{app}/instances")] == Scope.GATHER
    assert scopes[("GET", "/v1/apps/{app}/stats")] == Scope.GATHER
    assert scopes[("GET", "/v1/apps/{app}/queues/{queue}/consumers")] == Scope.GATHER
    instance_routes = [p for m, p in scopes if p.startswith("/v1/apps/{app}/instances/{name}")]
    assert len(instance_routes) > 10
    assert all(scopes[(m, p)] == Scope.INSTANCE for m, p in scopes if p in instance_routes)


async def test_a_cluster_of_one_cannot_forward() -> None:
    with pytest.raises(BranchUnreachable):
        await NoForwarder().forward(cast(web.Request, object()), "b9")


class _Owners:
    self_id = "me"

    def owner_of(self, app: str, name: str) -> str | None:
        return {("web", "w1"): "b2", ("web", "mine"): "me"}.get((app, name))


@pytest.mark.parametrize(
    ("target", "owner"),
    [
        (Target(Scope.INSTANCE, "web", "w1"), "b2"),  # held by another: forwarded there
        (Target(Scope.INSTANCE, "web", "mine"), None),  # ours: answered here
        (Target(Scope.INSTANCE, "web", "nobody"), None),  # nobody's: a 404 here
        (Target(Scope.DECLARATION, "web"), None),
        (Target(Scope.PLACEMENT, "web"), None),
        (Target(Scope.GATHER, "web"), None),
        (Target(Scope.BRANCH), None),
    ],
)
def test_the_cluster_directory_sends_an_instance_to_its_holder(
    target: Target, owner: str | None
) -> None:
    assert ClusterDirectory(_Owners()).owner(target) == owner
