"""branchctl's Celery commands (apps, queues, consumers, autoscale, stats)
against a small fake daemon speaking the Celery section of docs/api.md.

The fake runs aiohttp.web on 127.0.0.1 in a thread with its own event loop
and records every request (method, path, JSON body).
"""

from __future__ import annotations

import asyncio
import json
import shlex
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from branchctl.cli import main
from branchctl.cli.apps import rolls_by_default
from branchctl.client import AsyncClient, Client
from branchctl.errors import ApiError
from branchctl.models import App, Autoscale, Consumer, Instance, Queue, Stats
from click.testing import CliRunner, Result

APP_FIELDS = {
    "env",
    "defaults",
    "broker",
    "celery_app",
    "python",
    "pool",
    "args",
    "autoscale",
    "mingle_gossip",
}
QUEUE_FIELDS = {"exchange", "exchange_type", "routing_key", "options"}
EMBEDDED = "filesystem://"


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _instance(app: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
    kind = body.get("kind", "process")
    data: dict[str, Any] = {
        "app": app,
        "name": name,
        "kind": kind,
        "command": body.get("command", []),
        "env": {},
        "state": "running",
        "desired": "running",
        "pid": 4242,
        "restarts": 0,
        "uptime": 65.0,
        "startsecs": 30 if kind == "celery" else 1,
        "stopwaitsecs": 600 if kind == "celery" else 10,
        "branch": "b1",
        "created_at": 1700000000.0,
        "added_later": {"ignored": "by this client"},
    }
    if kind == "celery":
        data.update(
            command=["python", "-m", "celery", "-A", "shop.tasks", "worker", f"-n{name}@h"],
            node=f"{name}@h",
            queues=body.get("queues", ["celery"]),
            autoscale=body.get("autoscale"),
            concurrency=body.get("concurrency"),
            pool=body.get("pool", "prefork"),
            args=body.get("args", []),
            loglevel=body.get("loglevel", "INFO"),
            hung_after=body.get("hung_after", 60.0),
            memory_limit=body.get("memory_limit"),
        )
    return data


@dataclass
class Seen:
    method: str
    path: str
    body: Any


@dataclass
class CeleryDaemon:
    """The Celery routes of docs/api.md over in-memory state."""

    seen: list[Seen] = field(default_factory=list)
    apps: dict[str, dict[str, Any]] = field(default_factory=dict)
    queues: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    instances: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    live: dict[str, dict[str, int]] = field(default_factory=dict)
    url: str = ""

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._ready = threading.Event()

    def __enter__(self) -> CeleryDaemon:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        runner = web.AppRunner(self._app(), handle_signals=False)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        host, port = runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(runner.cleanup())
            self._loop.close()

    def requests(self) -> list[tuple[str, str, Any]]:
        return [(s.method, s.path, s.body) for s in self.seen]

    @property
    def writes(self) -> list[Seen]:
        """The requests that change something (a GET before them is a look, no change)."""
        return [s for s in self.seen if s.method != "GET"]

    # -- routes

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._record])
        r = app.router
        r.add_get("/v1/apps", self._apps)
        r.add_put("/v1/apps/{app}", self._put_app)
        r.add_get("/v1/apps/{app}", self._get_app)
        r.add_get("/v1/apps/{app}/queues", self._list_queues)
        r.add_get("/v1/apps/{app}/queues/{queue}", self._get_queue)
        r.add_get("/v1/apps/{app}/queues/{queue}/consumers", self._queue_consumers)
        r.add_put("/v1/apps/{app}/queues/{queue}", self._put_queue)
        r.add_delete("/v1/apps/{app}/queues/{queue}", self._delete_queue)
        r.add_get("/v1/apps/{app}/instances", self._list_instances)
        r.add_post("/v1/apps/{app}/instances", self._add_instance)
        r.add_get("/v1/apps/{app}/instances/{name}/queues", self._consumers)
        r.add_put("/v1/apps/{app}/instances/{name}/queues/{queue}", self._add_consumer)
        r.add_delete("/v1/apps/{app}/instances/{name}/queues/{queue}", self._remove_consumer)
        r.add_get("/v1/apps/{app}/instances/{name}/autoscale", self._autoscale)
        r.add_put("/v1/apps/{app}/instances/{name}/autoscale", self._set_autoscale)
        r.add_get("/v1/apps/{app}/instances/{name}/stats", self._stats)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        raw = await request.read()
        self.seen.append(Seen(request.method, request.path, json.loads(raw) if raw else None))
        try:
            response: web.StreamResponse = await handler(request)
        except web.HTTPNotFound:
            return _error(404, "not_found", f"no route {request.path}")
        return response

    def _find_app(self, request: web.Request) -> str | None:
        name = request.match_info["app"]
        return name if name in self.apps else None

    def _find_instance(self, request: web.Request) -> dict[str, Any] | None:
        app, name = request.match_info["app"], request.match_info["name"]
        return self.instances.get(app, {}).get(name)

    async def _apps(self, request: web.Request) -> web.Response:
        return web.json_response({"items": list(self.apps.values())})

    async def _put_app(self, request: web.Request) -> web.Response:
        name = request.match_info["app"]
        body = await request.json()
        unknown = set(body) - APP_FIELDS
        if unknown:
            return _error(422, "invalid", f"unknown fields: {sorted(unknown)}")
        created = name not in self.apps
        broker = body.get("broker")
        self.apps[name] = {
            "name": name,
            "env": body.get("env", {}),
            "defaults": body.get("defaults", {}),
            "created_at": 3.0,
            "broker": broker or EMBEDDED,
            "embedded_broker": broker is None,
            "celery_app": body.get("celery_app"),
            "python": body.get("python", "/usr/bin/python3"),
            "pool": body.get("pool", "prefork"),
            "args": body.get("args", []),
            "autoscale": body.get("autoscale"),
            "mingle_gossip": body.get("mingle_gossip", False),
        }
        self.queues.setdefault(name, {})
        self.instances.setdefault(name, {})
        return web.json_response(self.apps[name], status=201 if created else 200)

    async def _get_app(self, request: web.Request) -> web.Response:
        app = self._find_app(request)
        if app is None:
            return _error(404, "not_found", f"no app {request.match_info['app']!r}")
        return web.json_response(self.apps[app])

    async def _list_queues(self, request: web.Request) -> web.Response:
        app = self._find_app(request)
        if app is None:
            return _error(404, "not_found", f"no app {request.match_info['app']!r}")
        return web.json_response({"items": list(self.queues[app].values())})

    async def _get_queue(self, request: web.Request) -> web.Response:
        app, name = request.match_info["app"], request.match_info["queue"]
        queue = self.queues.get(app, {}).get(name)
        if queue is None:
            return _error(404, "not_found", f"no queue {name!r}")
        return web.json_response(queue)

    async def _queue_consumers(self, request: web.Request) -> web.Response:
        app, name = request.match_info["app"], request.match_info["queue"]
        items = [
            {"app": app, "name": i["name"], "branch": "b1", "state": "running"}
            for i in self.instances.get(app, {}).values()
            if name in i.get("queues", ())
        ]
        return web.json_response({"items": items})

    async def _put_queue(self, request: web.Request) -> web.Response:
        app = self._find_app(request)
        if app is None:
            return _error(404, "not_found", f"no app {request.match_info['app']!r}")
        name = request.match_info["queue"]
        body = await request.json()
        if set(body) - QUEUE_FIELDS:
            return _error(422, "invalid", "unknown fields")
        created = name not in self.queues[app]
        self.queues[app][name] = {
            "app": app,
            "name": name,
            "exchange": body.get("exchange", name),
            "exchange_type": body.get("exchange_type", "direct"),
            "routing_key": body.get("routing_key", name),
            "options": body.get("options", {}),
        }
        return web.json_response(self.queues[app][name], status=201 if created else 200)

    async def _delete_queue(self, request: web.Request) -> web.Response:
        app, name = request.match_info["app"], request.match_info["queue"]
        if self.queues.get(app, {}).pop(name, None) is None:
            return _error(404, "not_found", f"no queue {name!r}")
        return web.Response(status=204)

    async def _list_instances(self, request: web.Request) -> web.Response:
        app = self._find_app(request)
        if app is None:
            return _error(404, "not_found", f"no app {request.match_info['app']!r}")
        return web.json_response({"items": list(self.instances[app].values())})

    async def _add_instance(self, request: web.Request) -> web.Response:
        app = self._find_app(request)
        if app is None:
            return _error(404, "not_found", f"no app {request.match_info['app']!r}")
        body = await request.json()
        name = body.get("name", "gen-1")
        if name in self.instances[app]:
            return _error(409, "conflict", f"instance {name!r} exists")
        if body.get("kind") == "celery" and "command" in body:
            return _error(422, "invalid", "a celery instance takes no command")
        self.instances[app][name] = _instance(app, name, body)
        if body.get("autoscale"):
            self.live[name] = dict(body["autoscale"])
        return web.json_response(self.instances[app][name], status=201)

    def _consumer_items(self, app: str, instance: dict[str, Any]) -> dict[str, Any]:
        wanted = instance["queues"]
        names = sorted(set(wanted) | set(self.queues[app]))
        return {
            "items": [
                {
                    "name": q,
                    "wanted": q in wanted,
                    "declared": q in self.queues[app],
                    "live": q in wanted if instance["state"] == "running" else None,
                }
                for q in names
                if q in wanted
            ]
        }

    async def _consumers(self, request: web.Request) -> web.Response:
        instance = self._find_instance(request)
        if instance is None:
            return _error(404, "not_found", "no such instance")
        return web.json_response(self._consumer_items(request.match_info["app"], instance))

    async def _add_consumer(self, request: web.Request) -> web.Response:
        instance = self._find_instance(request)
        if instance is None:
            return _error(404, "not_found", "no such instance")
        if instance["name"] == "stuck":
            return _error(502, "control_failed", "the worker did not confirm add_consumer")
        queue = request.match_info["queue"]
        if queue not in instance["queues"]:
            instance["queues"].append(queue)
        return web.json_response(self._consumer_items(request.match_info["app"], instance))

    async def _remove_consumer(self, request: web.Request) -> web.Response:
        instance = self._find_instance(request)
        if instance is None:
            return _error(404, "not_found", "no such instance")
        queue = request.match_info["queue"]
        instance["queues"] = [q for q in instance["queues"] if q != queue]
        return web.json_response(self._consumer_items(request.match_info["app"], instance))

    def _autoscale_json(self, instance: dict[str, Any]) -> dict[str, Any]:
        bounds = instance["autoscale"] or {"min": None, "max": None}  # as branchd answers
        return {**bounds, "live": self.live.get(instance["name"])}

    async def _autoscale(self, request: web.Request) -> web.Response:
        instance = self._find_instance(request)
        if instance is None:
            return _error(404, "not_found", "no such instance")
        return web.json_response(self._autoscale_json(instance))

    async def _set_autoscale(self, request: web.Request) -> web.Response:
        instance = self._find_instance(request)
        if instance is None:
            return _error(404, "not_found", "no such instance")
        body = await request.json()
        if body["min"] > body["max"]:
            return _error(422, "invalid", "autoscale: min > max")
        if instance.get("concurrency") is not None and instance["autoscale"] is None:
            return _error(409, "restart_required", "fixed concurrency: restart it with a range")
        instance["autoscale"] = {"min": body["min"], "max": body["max"]}
        self.live[instance["name"]] = dict(instance["autoscale"])
        return web.json_response(self._autoscale_json(instance))

    async def _stats(self, request: web.Request) -> web.Response:
        instance = self._find_instance(request)
        if instance is None:
            return _error(404, "not_found", "no such instance")
        stats: dict[str, Any] = {
            "app": instance["app"],
            "name": instance["name"],
            "state": instance["state"],
            "pid": instance["pid"],
            "uptime": instance["uptime"],
            "restarts": 0,
            "exit_code": None,
            "cpu_percent": 12.5,
            "memory_rss": 150 * 1024 * 1024,
            "processes": 3,
        }
        if instance["kind"] == "celery":
            live = self.live.get(instance["name"], {"min": 1, "max": 1})
            stats["celery"] = {
                "node": instance["node"],
                "pool_size": 2,
                "stats": {
                    "pid": instance["pid"],
                    "total": {"shop.tasks.resize": 7, "shop.tasks.thumb": 12},
                    "pool": {
                        "implementation": "celery.concurrency.prefork:TaskPool",
                        "max-concurrency": live["max"],
                        "processes": [5001, 5002],
                    },
                    "autoscaler": {**live, "current": 2, "qty": 0},
                    "rusage": {"maxrss": 1},
                },
                "active": [{"id": "t1", "name": "shop.tasks.resize"}],
            }
        return web.json_response(stats)


@pytest.fixture
def daemon() -> Iterator[CeleryDaemon]:
    with CeleryDaemon() as fake:
        yield fake


def run(daemon: CeleryDaemon, *args: str) -> Result:
    env: dict[str, str | None] = {"BRANCHD_URL": None, "BRANCHD_TOKEN": None}
    result = CliRunner().invoke(main, ["--url", daemon.url, *args], env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def ok(daemon: CeleryDaemon, *args: str) -> Result:
    result = run(daemon, *args)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result


def record(text: str) -> dict[str, str]:
    """The 'key  value' lines of a record (the header line, if any, skipped)."""
    pairs = (line.split(None, 1) for line in text.splitlines() if "  " in line)
    return {p[0]: p[1] if len(p) > 1 else "" for p in pairs}


def sh(daemon: CeleryDaemon, line: str) -> Result:
    """Run a 'branchctl ...' shell line (quotes as in a shell), expecting success."""
    words = shlex.split(line, comments=True)
    assert words[0] == "branchctl"
    return ok(daemon, *words[1:])


FLOW = """
branchctl apps add shop --broker amqp://guest:guest@127.0.0.1:5672// --celery-app shop.tasks
branchctl queues add shop images --exchange media --type topic --routing-key 'image.#'
branchctl instances add shop --name w1 --queues default,images --autoscale 1,4
branchctl consumers add shop w1 thumbnails       # worker starts consuming, no restart
branchctl consumers remove shop w1 images
branchctl autoscale shop w1 2 8                  # min 2, max 8, no restart
branchctl stats shop w1                          # celery stats + process tree figures
"""


def flow(daemon: CeleryDaemon) -> list[Result]:
    """The user flow of the Celery section, as typed in a shell."""
    return [sh(daemon, line) for line in FLOW.strip().splitlines()]


# -- the whole flow -------------------------------------------------------------


def test_the_flow_sends_the_right_requests(daemon: CeleryDaemon) -> None:
    flow(daemon)
    assert daemon.requests() == [
        ("GET", "/v1/apps/shop", None),  # to say what a replace would reset
        (
            "PUT",
            "/v1/apps/shop",
            {
                "env": {},
                "defaults": {},
                "broker": "amqp://guest:guest@127.0.0.1:5672//",
                "celery_app": "shop.tasks",
            },
        ),
        (
            "PUT",
            "/v1/apps/shop/queues/images",
            {"exchange": "media", "exchange_type": "topic", "routing_key": "image.#"},
        ),
        (
            "POST",
            "/v1/apps/shop/instances",
            {
                "kind": "celery",
                "name": "w1",
                "queues": ["default", "images"],
                "autoscale": {"min": 1, "max": 4},
            },
        ),
        ("PUT", "/v1/apps/shop/instances/w1/queues/thumbnails", None),
        ("DELETE", "/v1/apps/shop/instances/w1/queues/images", None),
        ("PUT", "/v1/apps/shop/instances/w1/autoscale", {"min": 2, "max": 8}),
        ("GET", "/v1/apps/shop/instances/w1/stats", None),
    ]


def test_the_flow_prints_tables_and_figures(daemon: CeleryDaemon) -> None:
    app, queue, instance, added, removed, scaled, stats = (r.stdout for r in flow(daemon))
    assert app.startswith("created app 'shop'\n")
    assert record(app)["broker"] == "amqp://guest:guest@127.0.0.1:5672//"
    assert record(app)["celery_app"] == "shop.tasks"
    assert queue.startswith("created queue shop/images\n")
    assert record(queue)["exchange_type"] == "topic"
    assert record(queue)["routing_key"] == "image.#"
    fields = record(instance)
    assert (fields["kind"], fields["node"], fields["autoscale"]) == ("celery", "w1@h", "1..4")
    assert fields["queues"] == '["default","images"]'
    assert added.splitlines() == [
        "QUEUE       WANTED  DECLARED  LIVE",
        "default     true    false     true",
        "images      true    true      true",
        "thumbnails  true    false     true",
    ]
    assert removed.splitlines() == [
        "QUEUE       WANTED  DECLARED  LIVE",
        "default     true    false     true",
        "thumbnails  true    false     true",
    ]
    assert scaled == "2 8 (live: 2 8)\n"
    lines = stats.splitlines()
    assert lines[:9] == [
        "instance      shop/w1",
        "state         running",
        "pid           4242",
        "uptime        1m05s",
        "restarts      0",
        "exit_code     -",
        "cpu           12.5%",
        "memory        150.0 MiB",
        "processes     3",
    ]
    assert lines[9:] == [
        "node          w1@h",
        "pool          prefork, 2 processes (autoscale 2..8)",
        "active_tasks  1",
        "tasks_done    19 (shop.tasks.thumb 12, shop.tasks.resize 7)",
    ]


def test_instances_table_shows_celery_instances(daemon: CeleryDaemon) -> None:
    flow(daemon)
    ok(daemon, "apps", "add", "web")
    ok(daemon, "instances", "add", "web", "--name", "p1", "--", "sleep", "9")
    result = ok(daemon, "instances")
    assert result.stdout.splitlines() == [
        "APP   NAME  KIND     STATE    PID   UPTIME  RESTARTS",
        "shop  w1    celery   running  4242  1m05s   0",
        "web   p1    process  running  4242  1m05s   0",
    ]
    # a COMMAND without --kind sends no kind: the daemon's default (process)
    assert daemon.requests()[-4][2] == {"name": "p1", "command": ["sleep", "9"]}


# -- each command -----------------------------------------------------------------


def test_apps_add_celery_options_and_show(daemon: CeleryDaemon) -> None:
    sh(
        daemon,
        "branchctl apps add shop --python /srv/venv --pool threads --autoscale 0,3"
        " --arg=--max-tasks-per-child=10 --arg -Ofair --mingle-gossip",
    )
    assert daemon.writes[0].body == {
        "env": {},
        "defaults": {},
        "python": "/srv/venv",
        "pool": "threads",
        "args": ["--max-tasks-per-child=10", "-Ofair"],
        "autoscale": {"min": 0, "max": 3},
        "mingle_gossip": True,
    }
    replaced = ok(daemon, "apps", "add", "shop", "--no-mingle-gossip")
    assert daemon.writes[-1].body == {"env": {}, "defaults": {}, "mingle_gossip": False}
    assert "existed and was replaced; reset: python" in replaced.stderr
    shown = ok(daemon, "apps", "show", "shop").stdout.splitlines()
    assert shown[4:] == [
        "broker         filesystem:// (embedded; a producer's settings: branchctl apps "
        "celery-config shop)",
        "celery_app     -",
        "python         /usr/bin/python3",
        "pool           prefork",
        "args           []",
        "autoscale      -",
        "mingle_gossip  false",
    ]
    as_json = json.loads(ok(daemon, "apps", "show", "shop", "--json").stdout)
    assert as_json == daemon.apps["shop"]


def test_queues_list_show_remove(daemon: CeleryDaemon) -> None:
    ok(daemon, "apps", "add", "shop")
    ok(daemon, "queues", "add", "shop", "default")
    sh(
        daemon,
        "branchctl queues add shop images --exchange media --type topic --routing-key 'image.*'"
        " --option durable=false --option 'queue_arguments={\"x-max-priority\": 10}'"
        " --option 'note=plain text'",
    )
    assert daemon.writes[1].body == {}
    assert daemon.writes[2].body == {
        "exchange": "media",
        "exchange_type": "topic",
        "routing_key": "image.*",
        "options": {
            "durable": False,
            "queue_arguments": {"x-max-priority": 10},
            "note": "plain text",
        },
    }
    assert ok(daemon, "queues", "shop").stdout.splitlines() == [
        "NAME     EXCHANGE  TYPE    ROUTING_KEY",
        "default  default   direct  default",
        "images   media     topic   image.*",
    ]
    assert ok(daemon, "queues", "list", "shop").stdout == ok(daemon, "queues", "shop").stdout
    replaced = ok(daemon, "queues", "add", "shop", "default", "--routing-key", "d").stdout
    assert replaced.startswith("replaced queue shop/default\n")
    shown = ok(daemon, "queues", "show", "shop", "images").stdout
    assert record(shown)["options"].startswith('{"durable":false,')
    assert json.loads(ok(daemon, "--json", "queues", "shop").stdout) == {
        "items": list(daemon.queues["shop"].values())
    }
    assert ok(daemon, "queues", "remove", "shop", "images").stdout == "removed queue shop/images\n"
    assert daemon.seen[-1].method == "DELETE"
    assert ok(daemon, "queues", "remove", "shop", "default", "--json").stdout == ""
    result = run(daemon, "queues", "show", "shop", "images")
    assert (result.exit_code, result.stderr) == (1, "branchctl: not_found: no queue 'images'\n")


def test_instances_add_celery_options(daemon: CeleryDaemon) -> None:
    ok(daemon, "apps", "add", "shop")
    result = sh(
        daemon,
        "branchctl instances add shop --name w2 --concurrency 4 --pool solo --arg -E"
        " --loglevel DEBUG --hung-after 90 --memory-limit 512M --autostart",
    )
    assert daemon.seen[-1].body == {
        "kind": "celery",
        "name": "w2",
        "concurrency": 4,
        "pool": "solo",
        "args": ["-E"],
        "loglevel": "DEBUG",
        "hung_after": 90.0,
        "memory_limit": 512 * 1024**2,
        "autostart": True,
    }
    assert record(result.stdout)["memory_limit"] == "512.0 MiB"
    ok(daemon, "instances", "add", "shop", "--kind", "process", "--name", "p")
    assert daemon.seen[-1].body == {"kind": "process", "name": "p"}
    ok(daemon, "instances", "add", "shop", "--kind", "celery", "--memory-limit", "2G")
    assert daemon.seen[-1].body == {"kind": "celery", "memory_limit": 2 * 1024**3}
    data = json.loads(ok(daemon, "--json", "instances", "add", "shop", "--name", "w3").stdout)
    assert data == daemon.instances["shop"]["w3"]


@pytest.mark.parametrize(
    ("text", "size"),
    [("1048576", 1048576), ("512K", 524288), ("1.5g", 1536 * 1024**2), ("2GiB", 2 * 1024**3)],
)
def test_memory_limit_suffixes(daemon: CeleryDaemon, text: str, size: int) -> None:
    ok(daemon, "apps", "add", "shop")
    ok(daemon, "instances", "add", "shop", "--memory-limit", text)
    assert daemon.seen[-1].body["memory_limit"] == size


def test_consumers_list_and_json(daemon: CeleryDaemon) -> None:
    flow(daemon)
    assert ok(daemon, "consumers", "shop", "w1").stdout.splitlines()[0].split() == [
        "QUEUE",
        "WANTED",
        "DECLARED",
        "LIVE",
    ]
    daemon.instances["shop"]["w1"]["state"] = "stopped"
    assert ok(daemon, "consumers", "list", "shop", "w1").stdout.splitlines()[1:] == [
        "default     true    false     -",
        "thumbnails  true    false     -",
    ]
    data = json.loads(ok(daemon, "consumers", "add", "shop", "w1", "x", "--json").stdout)
    assert [c["name"] for c in data["items"]] == ["default", "thumbnails", "x"]


def test_autoscale_show_and_json(daemon: CeleryDaemon) -> None:
    flow(daemon)
    assert ok(daemon, "autoscale", "shop", "w1").stdout == "2 8 (live: 2 8)\n"
    assert json.loads(ok(daemon, "--json", "autoscale", "shop", "w1").stdout) == {
        "min": 2,
        "max": 8,
        "live": {"min": 2, "max": 8},
    }
    daemon.live.pop("w1")
    assert ok(daemon, "autoscale", "shop", "w1").stdout == "2 8 (live: -)\n"
    assert ok(daemon, "autoscale", "shop", "w1", "0", "0").stdout == "0 0 (live: 0 0)\n"


def test_autoscale_of_a_fixed_concurrency_worker(daemon: CeleryDaemon) -> None:
    ok(daemon, "apps", "add", "shop")
    ok(daemon, "instances", "add", "shop", "--name", "f1", "--concurrency", "2")
    # no range: readable, never "None None"
    assert ok(daemon, "autoscale", "shop", "f1").stdout == "none: fixed concurrency (live: -)\n"
    result = run(daemon, "autoscale", "shop", "f1", "1", "4")
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == (
        "branchctl: restart_required: fixed concurrency: restart it with a range\n"
    )


def test_stats_json_and_instances_stats(daemon: CeleryDaemon) -> None:
    flow(daemon)
    data = json.loads(ok(daemon, "stats", "shop", "w1", "--json").stdout)
    assert data["celery"]["stats"]["total"] == {"shop.tasks.resize": 7, "shop.tasks.thumb": 12}
    assert data["celery"]["active"] == [{"id": "t1", "name": "shop.tasks.resize"}]
    assert ok(daemon, "instances", "stats", "shop", "w1").stdout == (
        ok(daemon, "stats", "shop", "w1").stdout
    )


# -- errors ------------------------------------------------------------------------


def test_min_over_max_is_an_api_error_line_and_exit_1(daemon: CeleryDaemon) -> None:
    flow(daemon)
    result = run(daemon, "autoscale", "shop", "w1", "8", "2")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == "branchctl: invalid: autoscale: min > max\n"
    assert daemon.requests()[-1] == (
        "PUT",
        "/v1/apps/shop/instances/w1/autoscale",
        {"min": 8, "max": 2},
    )


def test_control_failed_is_exit_1(daemon: CeleryDaemon) -> None:
    ok(daemon, "apps", "add", "shop")
    ok(daemon, "instances", "add", "shop", "--name", "stuck")
    result = run(daemon, "consumers", "add", "shop", "stuck", "q")
    assert result.exit_code == 1
    assert result.stderr == ("branchctl: control_failed: the worker did not confirm add_consumer\n")


def test_not_found_and_conflict_are_exit_1(daemon: CeleryDaemon) -> None:
    assert run(daemon, "queues", "nope").stderr == "branchctl: not_found: no app 'nope'\n"
    ok(daemon, "apps", "add", "shop")
    ok(daemon, "instances", "add", "shop", "--name", "w1")
    result = run(daemon, "instances", "add", "shop", "--name", "w1")
    assert (result.exit_code, result.stderr) == (1, "branchctl: conflict: instance 'w1' exists\n")
    for args in (["consumers", "shop", "x"], ["autoscale", "shop", "x"], ["stats", "shop", "x"]):
        result = run(daemon, *args)
        assert (result.exit_code, result.stderr) == (1, "branchctl: not_found: no such instance\n")


@pytest.mark.parametrize(
    "args",
    [
        ["autoscale", "shop", "w1", "2"],
        ["autoscale", "shop", "w1", "-1", "4"],
        ["autoscale", "shop", "w1", "1", "x"],
        ["autoscale", "shop", "w1", "1", "2", "3"],
        ["autoscale", "shop"],
        ["apps", "add", "shop", "--autoscale", "4"],
        ["apps", "add", "shop", "--autoscale", "1,-4"],
        ["apps", "add", "shop", "--pool", "forks"],
        ["instances", "add", "shop", "--autoscale", "a,b"],
        ["instances", "add", "shop", "--memory-limit", "lots"],
        ["instances", "add", "shop", "--memory-limit", "0"],
        ["instances", "add", "shop", "--hung-after", "0"],
        ["instances", "add", "shop", "--concurrency", "0"],
        ["instances", "add", "shop", "--kind", "celery", "--", "sleep", "1"],
        ["instances", "add", "shop", "--kind", "thread"],
        ["queues", "add", "shop", "q", "--type", "round-robin"],
        ["queues", "add", "shop", "q", "--option", "durable"],
        ["queues", "add", "shop"],
        ["queues"],
        ["consumers", "add", "shop", "w1"],
        ["consumers"],
    ],
)
def test_usage_errors_are_exit_2_and_send_nothing(daemon: CeleryDaemon, args: list[str]) -> None:
    result = run(daemon, *args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert daemon.seen == []


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["apps", "add"],
        ["apps", "show"],
        ["queues"],
        ["queues", "list"],
        ["queues", "add"],
        ["queues", "show"],
        ["queues", "remove"],
        ["instances", "add"],
        ["instances", "update"],
        ["consumers"],
        ["consumers", "list"],
        ["consumers", "add"],
        ["consumers", "remove"],
        ["autoscale"],
        ["stats"],
        ["instances", "stats"],
    ],
)
def test_every_command_has_help(daemon: CeleryDaemon, args: list[str]) -> None:
    result = run(daemon, *args, "--help")
    assert result.exit_code == 0
    assert result.stdout.startswith("Usage: ")
    assert daemon.seen == []


# -- the clients ------------------------------------------------------------------


def test_sync_client(daemon: CeleryDaemon) -> None:
    with Client(daemon.url) as c:
        app, created = c.put_app("shop", celery_app="shop.tasks", autoscale=(1, 4), args=["-E"])
        assert created and isinstance(app, App)
        assert (app.celery_app, app.embedded_broker, app.broker) == ("shop.tasks", True, EMBEDDED)
        assert (app.autoscale, app.args) == ({"min": 1, "max": 4}, ("-E",))
        assert daemon.seen[-1].body == {
            "celery_app": "shop.tasks",
            "args": ["-E"],
            "autoscale": {"min": 1, "max": 4},
        }
        queue, created = c.put_queue("shop", "images", exchange_type="fanout", options={})
        assert created and isinstance(queue, Queue)
        assert (queue.exchange, queue.exchange_type, queue.routing_key) == (
            "images",
            "fanout",
            "images",
        )
        assert daemon.seen[-1].body == {"exchange_type": "fanout", "options": {}}
        assert c.put_queue("shop", "images")[1] is False
        assert [q.name for q in c.queues("shop")] == ["images"]
        assert c.get_queue("shop", "images").exchange_type == "direct"
        instance = c.add_instance("shop", kind="celery", name="w1", queues=["images"])
        assert isinstance(instance, Instance)
        assert (instance.kind, instance.node, instance.queues) == ("celery", "w1@h", ("images",))
        assert instance.hung_after == 60.0 and "added_later" in instance.raw
        consumers = c.add_consumer("shop", "w1", "more")
        assert all(isinstance(x, Consumer) for x in consumers)
        assert [(x.name, x.wanted, x.declared, x.live) for x in consumers] == [
            ("images", True, True, True),
            ("more", True, False, True),
        ]
        assert [x.name for x in c.remove_consumer("shop", "w1", "images")] == ["more"]
        assert [x.name for x in c.consumers("shop", "w1")] == ["more"]
        scale = c.set_autoscale("shop", "w1", 2, 3)
        assert isinstance(scale, Autoscale)
        assert (scale.min, scale.max, scale.live) == (2, 3, {"min": 2, "max": 3})
        assert c.autoscale("shop", "w1") == scale
        with pytest.raises(ApiError) as info:
            c.set_autoscale("shop", "w1", 3, 2)
        assert (info.value.status, info.value.code) == (422, "invalid")
        stats = c.stats("shop", "w1")
        assert isinstance(stats, Stats) and stats.celery is not None
        assert stats.celery["node"] == "w1@h"
        c.delete_queue("shop", "images")
        assert c.queues("shop") == []


async def test_async_client(daemon: CeleryDaemon) -> None:
    async with AsyncClient(daemon.url) as c:
        app, created = await c.put_app(
            "shop", broker="redis://127.0.0.1:6379/0", pool="solo", mingle_gossip=False
        )
        assert created and (app.broker, app.embedded_broker) == ("redis://127.0.0.1:6379/0", False)
        assert daemon.seen[-1].body == {
            "broker": "redis://127.0.0.1:6379/0",
            "pool": "solo",
            "mingle_gossip": False,
        }
        _, created = await c.put_queue("shop", "q", routing_key="k")
        assert not created or daemon.seen[-1].body == {"routing_key": "k"}
        await c.add_instance("shop", kind="celery", name="w1", autoscale={"min": 1, "max": 2})
        assert [x.name for x in await c.add_consumer("shop", "w1", "q")] == ["celery", "q"]
        assert (await c.autoscale("shop", "w1")).live == {"min": 1, "max": 2}
        assert (await c.set_autoscale("shop", "w1", 0, 5)).max == 5
        await c.delete_queue("shop", "q")
        assert await c.queues("shop") == []


def test_models_tolerate_unknown_and_null_fields() -> None:
    app = App.from_json({"name": "a", "autoscale": None, "args": None, "new": 1})
    assert (app.autoscale, app.args, app.broker) == (None, (), None)
    scale = Autoscale.from_json({"min": 1, "max": 2, "live": None, "new": True})
    assert scale.live is None and scale.raw["new"] is True
    consumer = Consumer.from_json({"name": "q", "wanted": True, "declared": False, "live": None})
    assert consumer.live is None
    queue = Queue.from_json({"app": "a", "name": "q", "options": None, "extra": []})
    assert queue.options == {}
    with pytest.raises(ValueError):
        Autoscale.from_json({"max": 2})
    with pytest.raises(ValueError):
        Instance.from_json({"app": "a", "name": "n", "state": "running", "queues": "abc"})


@pytest.mark.parametrize(
    ("action", "kinds", "rolls"),
    [
        ("restart", ["celery", "celery"], True),  # workers: never all down at once
        ("restart", ["celery", "process"], False),  # a mixed app: as asked
        ("restart", ["process"], False),  # supervisord's group restart: all at once
        ("restart", [], False),
        ("start", ["celery"], False),  # starting takes no worker away
        ("stop", ["celery"], False),
    ],
)
def test_an_app_of_celery_workers_restarts_rolling_by_default(
    action: str, kinds: list[str], rolls: bool
) -> None:
    assert rolls_by_default(action, kinds) is rolls
