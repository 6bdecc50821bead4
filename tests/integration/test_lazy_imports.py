"""A branch without Celery apps does not load what only Celery apps need
(issue 10, part 9): kombu and its transports are about 5 MiB of the daemon's
resident memory, jsonschema about 3 MiB more until a body comes that
api/precheck.py cannot vouch for.

Each check runs a real daemon (``Daemon.run``, port 0, its own state dir) in a
fresh interpreter and reads that interpreter's ``sys.modules``; the last one
runs ``python -m branchd`` and reads the libraries it maps.

aiohttp's client side (about 4 MiB) loads when a branch first calls another
(branchd/lazy_aiohttp.py, installed by the daemon's entry point): a branch on
its own, over HTTP or HTTPS, serving reads, writes, the event stream and the
metrics, never loads it. A clustered branch's peer calls (which load it) are
the cluster and forwarding tests' (tests/integration/test_cluster.py,
test_forwarding.py: their daemons run ``python -m branchd``).
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
    return sorted(m for m in sys.modules if m.partition(".")[0] in WATCHED or m in WATCHED)


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
        async with http.post("/v1/apps/web/stop") as reply:
            assert reply.status == 200, await reply.text()
        seen["app_action"] = loaded()
        async with http.put("/v1/apps/jobs", json={"celery_app": "tasks"}) as reply:
            assert reply.status == 201, await reply.text()
        seen["celery_app"] = loaded()
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
    # a Celery app declared builds branchd's Celery layer, not kombu (a broker link does)
    tops = {m.partition(".")[0] for m in seen["celery_app"]}
    assert not tops & set(CELERY_ONLY), seen["celery_app"]


#: branchd's Celery layer (workers service, runtime operations, depth reads
#: and scaler, remote control: about 1 MiB), built by branchd/local.py's
#: CeleryLayer at the first Celery app, instance or route. An app's view reads
#: only celery/urls.py (its broker_url and backend_for).
CELERY_LAYER = tuple(
    f"branchd.celery.{m}"
    for m in (
        "workers", "ops", "runtime", "scaler", "depth", "ready", "remote", "outage",
        "drain", "stall", "argv", "fs_transport", "worker_loader", "stub",
    )
)  # fmt: skip


def test_a_branch_without_celery_apps_never_loads_the_celery_layer(tmp_path: Path) -> None:
    seen = _loaded_by_a_daemon(tmp_path, CELERY_LAYER)
    assert seen["reads"] == [] and seen["writes"] == [] and seen["invalid"] == [], seen
    # the first Celery app declared builds it (which also shows the watch works);
    # no worker yet, and still no kombu (its first broker link loads it)
    layer = set(seen["celery_app"])
    assert {"branchd.celery.workers", "branchd.celery.scaler", "branchd.celery.remote"} <= layer
    assert "branchd.celery.stub" not in layer, layer


#: What a branch of plain processes does not import at its start nor for its
#: reads and writes (issue 10, part 9): the embedded broker's folders, the
#: Celery config's linter, the workers' limits. The first Celery app loads
#: them (its check, the layer it builds). api/schemas.py spells lint's
#: severities out, declarations.py holds prefetch_clash, celery/urls.py an
#: app view's broker_url and backend_for.
PLAIN_DEFERRED = tuple(f"branchd.celery.{m}" for m in ("broker", "lint", "limits"))
#: An app-wide action's or count create's runner and its plan (local.py's
#: Groups builds it at the first; model.py holds Action and the limits the API
#: checks, api/schemas.py spells the outcomes out).
ON_FIRST_ACTION = ("branchd.process.actions", "branchd.process.groups")
#: The dashboard reads its files without it (0.14 MiB); jsonschema's
#: specifications load it with the first body precheck cannot vouch for.
RESOURCES = ("importlib.resources",)
#: Needed by none of these requests: the API's service Protocols (for the type
#: checker; a cluster's moves import them), placement (a cluster's: views.py
#: holds need_for, which a branch's record counts its slots by) and the env
#: file parser (the first start of an instance that names env files), the
#: metrics' scrape (the first GET /metrics; api/meters.py counts from the start).
NEVER_PLAIN = (
    "branchd.api.backend",
    "branchd.placement",
    "branchd.process.envfile",
    "branchd.api.metrics",
)


def test_a_plain_branch_defers_what_only_celery_apps_or_a_cluster_need(
    tmp_path: Path,
) -> None:
    seen = _loaded_by_a_daemon(tmp_path, PLAIN_DEFERRED + ON_FIRST_ACTION + RESOURCES + NEVER_PLAIN)
    assert seen["reads"] == [] and seen["writes"] == [], seen
    # an invalid body: jsonschema (which also shows the watch works), nothing of ours
    assert seen["invalid"] == list(RESOURCES), seen["invalid"]
    # the first app action builds its runner
    assert set(seen["app_action"]) == {*ON_FIRST_ACTION, *RESOURCES}, seen["app_action"]
    # the first Celery app loads the rest
    everything = {*PLAIN_DEFERRED, *ON_FIRST_ACTION, *RESOURCES}
    assert set(seen["celery_app"]) == everything, seen["celery_app"]


#: aiohttp's client side: loaded by the first peer call, forward or probe
#: (aiohttp.client_exceptions is the server's too).
CLIENT_SIDE = ("aiohttp.client", "aiohttp.connector", "aiohttp.cookiejar", "aiohappyeyeballs")
#: branchctl's; the daemon parses its options with argparse (aiohttp.web's anyway).
NEVER = ("click",)

ALONE = """
import asyncio, http.client, json, ssl, sys

import branchd.__main__  # the entry point: what it sets before aiohttp loads

from branchd.config import load
from branchd.daemon import Daemon, Exit

state, tls = sys.argv[1], json.loads(sys.argv[2])


def client_side():
    names = json.loads(sys.argv[3])
    return sorted(m for m in sys.modules if m.partition(".")[0] in names or m in names)


def calls(url, token):
    host, port = url.rpartition("/")[2].rsplit(":", 1)
    if tls:
        conn = http.client.HTTPSConnection(
            host, int(port), timeout=10, context=ssl._create_unverified_context()
        )
    else:
        conn = http.client.HTTPConnection(host, int(port), timeout=10)

    def call(method, path, body=None):
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        conn.request(method, path, None if body is None else json.dumps(body), headers)
        reply = conn.getresponse()
        if path == "/v1/events":  # a stream: its first event, then leave
            line = reply.fp.readline()
            conn.close()
            return reply.status, line
        return reply.status, reply.read()

    out = [call("GET", p)[0] for p in ("/v1/apps", "/v1/branch", "/v1/openapi.json")]
    out.append(call("PUT", "/v1/apps/web", {})[0])
    body = {"name": "s1", "command": [sys.executable, "-c", "import time; time.sleep(60)"]}
    out.append(call("POST", "/v1/apps/web/instances", body)[0])
    out.append(call("GET", "/v1/apps/web/instances")[0])
    status, metrics = call("GET", "/metrics")
    out.append(status)
    assert b"branchd_" in metrics, metrics[:200]
    status, first = call("GET", "/v1/events")
    out.append(status)
    assert first, "no event"
    return out


async def main():
    flags = {"state_dir": state, "bind": "127.0.0.1:0", **tls}
    config = load(flags, {})
    daemon = Daemon(config)
    run = asyncio.create_task(daemon.run())
    while daemon.url is None:
        if run.done():
            run.result()
        await asyncio.sleep(0.01)
    started = client_side()
    statuses = await asyncio.to_thread(calls, daemon.url, config.api.token)
    daemon.request_exit(Exit.STOP)
    await run
    print(json.dumps({"url": daemon.url, "started": started, "served": client_side(),
                      "statuses": statuses}))

asyncio.run(main())
"""


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_branch_on_its_own_never_loads_aiohttps_client_side_nor_click(
    tmp_path: Path, scheme: str
) -> None:
    tls = {}
    if scheme == "https":
        from tests.integration.test_tls_roles import make_certificate

        cert, key = make_certificate(tmp_path)
        tls = {"tls_cert": str(cert), "tls_key": str(key)}
    argv = [str(tmp_path / "state"), json.dumps(tls), json.dumps(CLIENT_SIDE + NEVER)]
    done = subprocess.run(
        [sys.executable, "-c", ALONE, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["url"].startswith(f"{scheme}://")
    assert seen["statuses"] == [200, 200, 200, 201, 201, 200, 200, 200], seen
    assert seen["started"] == [] and seen["served"] == [], seen


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
