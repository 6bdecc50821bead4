"""branchctl queues depth and apps autoscale: usage errors before any request,
and the table, against a small aiohttp stand-in for the daemon."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from branchctl.cli import main
from click.testing import CliRunner

DEPTH = {"queue": "default", "ready": 40, "in_flight": 6, "consumers": 1, "at": 1.0,
         "running": 2, "unacked": 9}  # fmt: skip


@pytest.mark.parametrize(
    "args",
    [
        ["apps", "autoscale", "shop", "--on-depth", "default"],  # not all four
        ["apps", "autoscale", "shop", "--on-depth", "q", "--per-worker", "0", "--min", "1",
         "--max", "2"],
        ["apps", "autoscale", "shop", "--on-depth", "q", "--per-worker", "5", "--min", "3",
         "--max", "2"],
        ["apps", "autoscale", "shop", "--off", "--min", "1"],
        ["apps", "autoscale", "shop", "--down-after", "-1"],
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args: list[str]) -> None:
    result = CliRunner().invoke(main, ["--url", "http://127.0.0.1:9", *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


async def test_depth_table_and_policy() -> None:
    seen: list[tuple[str, str, Any]] = []

    async def depth(request: web.Request) -> web.Response:
        seen.append((request.method, request.path, None))
        high = {**DEPTH, "queue": "high", "ready": 0, "unanswered": 1}
        return web.json_response({"items": [DEPTH, high]})

    async def patch(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append((request.method, request.path, body))
        return web.json_response({"name": "shop", "env": {}, "defaults": {}, **body})

    app = web.Application()
    app.router.add_get("/v1/apps/shop/depth", depth)
    app.router.add_patch("/v1/apps/shop", patch)
    async with TestServer(app, host="127.0.0.1") as server:
        url = str(server.make_url(""))

        def run(*args: str) -> Any:
            import asyncio

            return asyncio.get_running_loop().run_in_executor(
                None, lambda: CliRunner().invoke(main, ["--url", url, "--token", "t", *args])
            )

        table = await run("queues", "depth", "shop")
        assert table.exit_code == 0, table.output
        lines = table.output.splitlines()
        assert lines[0].split() == ["QUEUE", "READY", "IN_FLIGHT", "RUNNING", "CONSUMERS"]
        assert lines[1].split() == ["default", "40", "6", "2", "1"]
        assert lines[2].split() == ["high", "0", ">=6", "2", "1"]  # one did not answer
        assert lines[-2] == "unacked (all queues of the Redis database): 9"
        assert lines[-1].startswith(">=: 1 worker(s) did not say in time what they hold")
        set_ = await run(
            "apps", "autoscale", "shop", "--on-depth", "default", "--per-worker", "20",
            "--min", "1", "--max", "12", "--json",
        )  # fmt: skip
        assert set_.exit_code == 0, set_.output
        assert json.loads(set_.output)["scale"]["max"] == 12
        assert seen[-1][2] == {
            "scale": {"on": "default", "per_worker": 20, "min": 1, "max": 12}
        }
        off = await run("apps", "autoscale", "shop", "--off")
        assert off.exit_code == 0 and off.output.strip() == "off"
        assert seen[-1][2] == {"scale": None}
