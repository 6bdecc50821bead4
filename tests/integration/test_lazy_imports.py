"""A branch without Celery apps does not load what only Celery apps need
(issue 10, part 9): kombu and its transports are about 5 MiB of the daemon's
resident memory, jsonschema about 3 MiB more until a body comes that
api/precheck.py cannot vouch for.

Each check runs a real daemon (``Daemon.run``, port 0, its own state dir) in a
fresh interpreter and reads that interpreter's ``sys.modules``; the last one
runs ``python -m branchd`` and reads the libraries it maps.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Branchd

ROOT = Path(__file__).resolve().parents[2]

#: Loaded when the first Celery app talks to a broker (celery/remote.py's
#: _kombu, celery/urls.py), never by a branch without one. celery itself runs
#: in the workers only.
CELERY_ONLY = ("kombu", "amqp", "yaml", "billiard", "vine", "celery")
#: Loaded when zeroconf discovery starts (cluster/discovery.py), never by a
#: branch on one box: ifaddr comes with zeroconf.
ON_DISCOVERY = ("zeroconf", "ifaddr")
#: Loaded for the first body precheck cannot vouch for (api/routes.py's _validator).
ON_FIRST_BODY = ("jsonschema", "referencing", "rpds", "jsonschema_specifications")
#: Loaded where they are used: a config file, an unknown transport's message.
ON_USE = ("tomllib", "difflib")

SCRIPT = """
import asyncio, json, sys

import aiohttp

from branchd.config import load
from branchd.daemon import Daemon, Exit

WATCHED = json.loads(sys.argv[2])


def loaded():
    return sorted(m for m in sys.modules if m.partition(".")[0] in WATCHED)


async def main():
    daemon = Daemon(load({"state_dir": sys.argv[1], "bind": "127.0.0.1:0"}, {}))
    run = asyncio.create_task(daemon.run())
    while daemon.url is None:
        if run.done():
            run.result()
        await asyncio.sleep(0.01)
    seen = {}
    async with aiohttp.ClientSession(daemon.url) as http:
        for path in ("/v1/apps", "/v1/branch", "/v1/openapi.json"):
            async with http.get(path) as reply:
                assert reply.status == 200, (path, reply.status)
        seen["reads"] = loaded()
        async with http.put("/v1/apps/web", json={}) as reply:
            assert reply.status == 201, await reply.text()
        body = {"name": "s1", "command": [sys.executable, "-c", "import time; time.sleep(60)"]}
        async with http.post("/v1/apps/web/instances", json=body) as reply:
            assert reply.status == 201, await reply.text()
        async with http.get("/v1/apps/web/instances") as reply:
            assert reply.status == 200
        seen["writes"] = loaded()
        async with http.post("/v1/apps/web/instances", json={"name": "bad name"}) as reply:
            assert reply.status == 422, await reply.text()
        seen["invalid"] = loaded()
    daemon.request_exit(Exit.STOP)
    await run
    print(json.dumps(seen))


asyncio.run(main())
"""


def _loaded_by_a_daemon(tmp_path: Path, watched: tuple[str, ...]) -> dict[str, list[str]]:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "state"), json.dumps(watched)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_a_branch_without_celery_apps_loads_neither_kombu_nor_jsonschema_until_needed(
    tmp_path: Path,
) -> None:
    seen = _loaded_by_a_daemon(tmp_path, CELERY_ONLY + ON_DISCOVERY + ON_FIRST_BODY + ON_USE)
    # started, served reads: none of them
    assert seen["reads"] == []
    # a plain app and a process declared (valid bodies): still none of them
    assert seen["writes"] == []
    # an invalid body: jsonschema words the error (which also shows the watch
    # works), and still nothing of Celery's
    tops = {m.partition(".")[0] for m in seen["invalid"]}
    assert "jsonschema" in tops, seen["invalid"]
    assert not tops & set(CELERY_ONLY + ON_DISCOVERY + ON_USE), seen["invalid"]


def test_the_discovery_module_loads_zeroconf_only_when_its_service_starts() -> None:
    script = """
import asyncio, json, sys
from branchd.cluster.discovery import Announcement, ZeroconfDiscovery
from branchd.errors import ConfigError

def loaded():
    return sorted(m for m in sys.modules if m.partition(".")[0] in sys.argv[1:])

async def main():
    me = Announcement("b1", "0.1.0", 8080, 7946, 1)
    service = ZeroconfDiscovery(me, "203.0.113.77", print)
    made = loaded()
    try:
        await service.start()
    except ConfigError:
        pass
    await service.close()
    return {"made": made, "refused": loaded()}

print(json.dumps(asyncio.run(main())))
"""
    done = subprocess.run(
        [sys.executable, "-c", script, *ON_DISCOVERY],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout)
    assert seen["made"] == []
    # refused to start on an address no interface has (ifaddr said so)
    assert not any(m.startswith("zeroconf") for m in seen["refused"]), seen


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/<pid>/maps")
def test_the_daemon_maps_no_cplusplus_runtime(branchd_factory: Callable[..., Branchd]) -> None:
    # frozenlist's compiled FrozenList (aiohttp's signal lists) is C++: it
    # mapped libstdc++ and libgcc_s, 0.8 MiB of the daemon's resident memory;
    # branchd/__main__.py asks for the pure Python one.
    b = branchd_factory()
    assert b.ok("GET", "/v1/ping") == {"ok": True}  # up, and answering through aiohttp
    maps = Path(f"/proc/{b.pid}/maps").read_text()
    mapped = {line.split()[-1].rpartition("/")[2] for line in maps.splitlines() if "/" in line}
    assert not {m for m in mapped if m.startswith(("libstdc++", "_frozenlist"))}, sorted(mapped)
