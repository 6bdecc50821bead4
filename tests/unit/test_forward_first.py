"""The HTTP edge asks its forwarder before any local handler (forward first)."""

from __future__ import annotations

from typing import cast

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from branchd.api.app import make_app
from branchd.api.backend import Local
from branchd.views import BranchRecord, Capacity

RECORD = BranchRecord("b1", "h", "0", 0.0, "x:1", Capacity(1, (0.0, 0.0, 0.0), 0, 0, 0))


class Elsewhere:
    """Instances of app 'far' live on another branch: their answers come from it."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def forward(self, request: web.Request) -> web.StreamResponse | None:
        self.asked.append(request.path)
        if request.path.startswith("/v1/apps/far/"):
            return web.json_response({"from": "b2"})
        return None


async def test_the_forwarder_answers_first_and_the_rest_stays_local() -> None:
    forwarder = Elsewhere()
    app = make_app(
        cast(Local, object()),  # never reached for a forwarded request
        token=None,
        max_body=1024,
        branch=lambda: RECORD,
        forwarder=forwarder,
    )
    async with TestClient(TestServer(app)) as client:
        far = await client.get("/v1/apps/far/instances/w1")
        assert (far.status, await far.json()) == (200, {"from": "b2"})
        here = await client.get("/v1/branch")
        assert (await here.json())["id"] == "b1"
    assert forwarder.asked == ["/v1/apps/far/instances/w1", "/v1/branch"]
