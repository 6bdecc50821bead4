"""Listings take turns on the event loop (issue 11, item 10): a ping sent
behind many listing requests is answered before they all are."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

from aiohttp.test_utils import TestClient, TestServer

from branchd.api.app import make_app
from branchd.api.backend import Local
from branchd.views import BranchRecord, Capacity

RECORD = BranchRecord("b1", "h", "0", 0.0, "x:1", Capacity(1, (0.0, 0.0, 0.0), 0, 0, 0))


class SlowInstances:
    """A listing that holds the loop (as 200 instances do) and counts its answers."""

    def __init__(self) -> None:
        self.built = 0

    async def list_instances(self, app: str | None = None) -> list[Any]:
        time.sleep(0.01)  # synchronous work, as building views and JSON is
        self.built += 1
        return []


class FakeLocal:
    def __init__(self) -> None:
        self.instances = SlowInstances()


async def _ping_behind_listings(listings_at_once: int) -> tuple[int, int]:
    local = FakeLocal()
    app = make_app(
        cast(Local, local),
        token=None,
        max_body=1024,
        branch=lambda: RECORD,
        listings_at_once=listings_at_once,
    )
    async with TestClient(TestServer(app)) as client:
        listings = [
            asyncio.ensure_future(client.get("/v1/apps/web/instances")) for _ in range(30)
        ]
        await asyncio.sleep(0)  # the listing requests go out first
        ping = await client.get("/v1/ping")
        assert ping.status == 200
        built_at_ping = local.instances.built
        for done in await asyncio.gather(*listings):
            assert done.status == 200
    return built_at_ping, local.instances.built


async def test_a_ping_does_not_wait_for_every_listing() -> None:
    built_at_ping, built = await _ping_behind_listings(1)
    assert built == 30
    assert built_at_ping < built // 2, built_at_ping

