"""branchctl (client and CLI) against a small fake daemon speaking docs/api.md.

The fake runs aiohttp.web on 127.0.0.1 in a thread with its own event loop;
the real end-to-end tests against a live branchd live elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest
from aiohttp import web
from branchctl.cli import instances as cli_instances
from branchctl.cli import main
from branchctl.cli.common import BranchctlCommand, BranchctlGroup, Options
from branchctl.cli.root import _status_text
from branchctl.client import DEFAULT_URL, AsyncClient, Client, find_url
from branchctl.errors import ApiError, ConnectionFailed
from branchctl.models import Branch, Instance
from branchctl.render import duration, table
from click.testing import CliRunner, Result


def instance_json(app: str, name: str, **over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "app": app,
        "name": name,
        "kind": "process",
        "command": ["celery", "-A", "proj", "worker"],
        "env": {},
        "cwd": None,
        "user": None,
        "autorestart": "on-failure",
        "exitcodes": [0],
        "startsecs": 1,
        "startretries": 3,
        "stopsignal": "TERM",
        "stopwaitsecs": 10,
        "autostart": True,
        "log_max_bytes": 10485760,
        "log_backups": 5,
        "state": "stopped",
        "desired": "stopped",
        "pid": None,
        "restarts": 0,
        "exit_code": None,
        "started_at": None,
        "uptime": None,
        "stop_step": None,
        "reason": None,
        "branch": "b1",
        "created_at": 1700000000.0,
        "added_in_api_v1_1": {"ignored": "by old clients"},
    }
    data.update(over)
    return data


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


@dataclass
class FakeDaemon:
    """A few routes of docs/api.md over canned data; records what it was asked."""

    token: str | None = None
    seen: list[Seen] = field(default_factory=list)
    apps: dict[str, dict[str, Any]] = field(default_factory=dict)
    instances: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    url: str = ""
    #: What an action answers, then what each later GET of that instance
    #: answers (changes to apply, in order; None: it is gone). Key: (name, action).
    scripts: dict[tuple[str, str], list[dict[str, Any] | None]] = field(default_factory=dict)
    _pending: dict[str, list[dict[str, Any] | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.apps = {
            "web": {"name": "web", "env": {"A": "1"}, "defaults": {}, "created_at": 1.0},
            "idle": {"name": "idle", "env": {}, "defaults": {}, "created_at": 2.0},
        }
        self.instances = {
            "web": [
                instance_json("web", "w1", state="running", pid=4242, uptime=3725.4, restarts=2),
                instance_json("web", "w2"),
            ],
            "idle": [],
        }
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._ready = threading.Event()

    # -- lifecycle

    def __enter__(self) -> FakeDaemon:
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

    # -- routes

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/v1/ping", self._ping)
        app.router.add_get("/v1/apps", self._apps)
        app.router.add_put("/v1/apps/{app}", self._put_app)
        app.router.add_patch("/v1/apps/{app}", self._patch_app)
        app.router.add_get("/v1/apps/{app}/instances", self._list)
        app.router.add_post("/v1/apps/{app}/instances", self._add)
        app.router.add_get("/v1/apps/{app}/instances/{name}", self._get)
        app.router.add_post("/v1/apps/{app}/instances/{name}/stop", self._stop)
        for action in ("start", "restart"):
            app.router.add_post(f"/v1/apps/{{app}}/instances/{{name}}/{action}", self._action)
        app.router.add_delete("/v1/apps/{app}/instances/{name}", self._delete)
        app.router.add_get("/v1/apps/{app}/instances/{name}/logs", self._logs)
        app.router.add_get("/v1/proxy-error", self._proxy_error)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        raw = await request.read()
        self.seen.append(
            Seen(
                request.method,
                request.path,
                dict(request.query),
                dict(request.headers),
                json.loads(raw) if raw else None,
            )
        )
        bearer = request.headers.get("Authorization")
        if self.token and request.path != "/v1/ping" and bearer != f"Bearer {self.token}":
            return _error(401, "unauthorized", "missing or bad token")
        try:
            response: web.StreamResponse = await handler(request)
        except web.HTTPNotFound:
            return _error(404, "not_found", f"no route {request.path}")
        return response

    async def _ping(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def _apps(self, request: web.Request) -> web.Response:
        return web.json_response({"items": list(self.apps.values())})

    async def _put_app(self, request: web.Request) -> web.Response:
        name = request.match_info["app"]
        body = await request.json()
        created = name not in self.apps
        self.apps[name] = {"name": name, "env": {}, "defaults": {}, "created_at": 3.0, **body}
        return web.json_response(self.apps[name], status=201 if created else 200)

    async def _patch_app(self, request: web.Request) -> web.Response:
        name = request.match_info["app"]
        if name not in self.apps:
            return _error(404, "not_found", f"no app {name!r}")
        merged = {**self.apps[name], **await request.json()}
        self.apps[name] = {k: v for k, v in merged.items() if v is not None}
        return web.json_response(self.apps[name])

    async def _list(self, request: web.Request) -> web.Response:
        app = request.match_info["app"]
        if app not in self.instances:
            return _error(404, "not_found", f"no app {app!r}")
        return web.json_response({"items": self.instances[app]})

    def _find(self, request: web.Request) -> dict[str, Any] | None:
        app, name = request.match_info["app"], request.match_info["name"]
        return next((i for i in self.instances.get(app, []) if i["name"] == name), None)

    def _play(self, request: web.Request, action: str) -> dict[str, Any] | None:
        """Apply the first step of the action's script; queue the rest for the GETs."""
        found = self._find(request)
        assert found is not None
        steps = list(self.scripts[(found["name"], action)])
        found.update(steps.pop(0) or {})
        self._pending[found["name"]] = steps
        return found

    async def _action(self, request: web.Request) -> web.Response:
        return web.json_response(self._play(request, request.path.rpartition("/")[2]))

    async def _delete(self, request: web.Request) -> web.Response:
        found = self._play(request, "delete")
        return web.json_response(found, status=202)

    async def _get(self, request: web.Request) -> web.Response:
        found = self._find(request)
        steps = self._pending.get(request.match_info["name"])
        if found is not None and steps:
            step = steps.pop(0)
            if step is None:
                self.instances[found["app"]].remove(found)
                found = None
            else:
                found.update(step)
        if found is None:
            return _error(404, "not_found", f"no instance {request.match_info['name']!r}")
        return web.json_response(found)

    async def _add(self, request: web.Request) -> web.Response:
        app = request.match_info["app"]
        body = await request.json()
        created = {**instance_json(app, "gen-1"), **body}
        self.instances.setdefault(app, []).append(created)
        return web.json_response(created, status=201)

    async def _stop(self, request: web.Request) -> web.Response:
        if request.match_info["name"] == "slow":  # answers after any short --timeout
            await asyncio.sleep(1.0)
        found = self._find(request)
        assert found is not None
        if (found["name"], "stop") in self.scripts:
            return web.json_response(self._play(request, "stop"))
        found.update(state="stopped", pid=None, uptime=None, stop_step="signal")
        return web.json_response(found)

    async def _logs(self, request: web.Request) -> web.StreamResponse:
        stream = request.query.get("stream", "stdout")
        if request.query.get("follow") != "1":
            return web.Response(text=f"{stream} 1\n{stream} 2\n", content_type="text/plain")
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await response.prepare(request)
        for chunk in (b"old line\n", b"new \xc3", b"\xa9line\n"):  # a UTF-8 char split in two
            await response.write(chunk)
            await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    async def _proxy_error(self, request: web.Request) -> web.Response:
        return web.Response(status=502, text="<html>Bad Gateway</html>", content_type="text/html")


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


@pytest.fixture
def daemon() -> Iterator[FakeDaemon]:
    with FakeDaemon() as fake:
        yield fake


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def run(daemon: FakeDaemon | str, *args: str, **env: str | None) -> Result:
    url = daemon if isinstance(daemon, str) else daemon.url
    environ: dict[str, str | None] = {
        "BRANCHD_URL": None,
        "BRANCHD_TOKEN": None,
        "BRANCHD_TOKEN_FILE": None,
        # (no token file of this user's own daemon is read)
        "BRANCHD_STATE_DIR": "/nonexistent/branchd-state",
        **env,
    }
    result = CliRunner().invoke(main, ["--url", url, *args], env=environ)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


# -- the CLI ------------------------------------------------------------------


def test_instances_table_over_all_apps(daemon: FakeDaemon) -> None:
    result = run(daemon, "instances")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "APP  NAME  KIND     STATE    PID   UPTIME  RESTARTS",
        "web  w1    process  running  4242  1h02m   2",
        "web  w2    process  stopped  -     -       0",
    ]
    assert [s.path for s in daemon.seen] == [
        "/v1/apps",
        "/v1/apps/web/instances",
        "/v1/apps/idle/instances",
    ]


def test_instances_of_one_app_as_json(daemon: FakeDaemon) -> None:
    result = run(daemon, "--json", "instances", "web")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"items": daemon.instances["web"]}
    assert [s.path for s in daemon.seen] == ["/v1/apps/web/instances"]
    # --json also works after the command
    assert json.loads(run(daemon, "instances", "web", "--json").stdout) == json.loads(result.stdout)


def test_not_found_is_exit_1_and_one_stderr_line(daemon: FakeDaemon) -> None:
    result = run(daemon, "instances", "show", "web", "x")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == "branchctl: not_found: no instance 'x'\n"


def test_connection_refused_is_exit_1_and_a_clear_line(closed_port: int) -> None:
    url = f"http://127.0.0.1:{closed_port}"
    result = run(url, "ping")
    assert result.exit_code == 1
    assert result.stderr == (
        f"branchctl: connection_failed: cannot reach branchd at {url}: Connection refused\n"
    )


def run_found(*args: str, **env: str | None) -> Result:
    """branchctl with no --url and no BRANCHD_URL: it must find the daemon itself."""
    environ: dict[str, str | None] = {
        "BRANCHD_URL": None,
        "BRANCHD_TOKEN": None,
        "BRANCHD_STATE_DIR": None,
        "XDG_STATE_HOME": None,
        **env,
    }
    return CliRunner().invoke(main, list(args), env=environ)


def test_finds_the_daemon_by_the_url_file_of_its_state_dir(
    daemon: FakeDaemon, tmp_path: Path
) -> None:
    (tmp_path / "branchd.url").write_text(daemon.url + "\n")
    result = run_found("ping", BRANCHD_STATE_DIR=str(tmp_path))
    assert (result.exit_code, result.stdout) == (0, "ok\n"), result.output
    assert [s.path for s in daemon.seen] == ["/v1/ping"]


def test_finds_the_daemon_in_the_default_state_dir(daemon: FakeDaemon, tmp_path: Path) -> None:
    # The daemon's own default: $XDG_STATE_HOME/branchd, else ~/.local/state/branchd.
    home_dir = tmp_path / "home" / ".local" / "state" / "branchd"
    home_dir.mkdir(parents=True)
    (home_dir / "branchd.url").write_text(daemon.url + "\n")
    assert run_found("ping", HOME=str(tmp_path / "home")).exit_code == 0
    xdg_dir = tmp_path / "xdg" / "branchd"
    xdg_dir.mkdir(parents=True)
    (xdg_dir / "branchd.url").write_text(daemon.url + "\n")
    assert (
        run_found("ping", HOME="/nonexistent", XDG_STATE_HOME=str(tmp_path / "xdg")).exit_code == 0
    )
    assert len(daemon.seen) == 2


def test_url_option_and_variable_win_over_the_url_file(
    daemon: FakeDaemon, tmp_path: Path, closed_port: int
) -> None:
    (tmp_path / "branchd.url").write_text(f"http://127.0.0.1:{closed_port}\n")
    env = {"BRANCHD_STATE_DIR": str(tmp_path)}
    assert run_found("--url", daemon.url, "ping", **env).exit_code == 0
    assert run_found("ping", BRANCHD_URL=daemon.url, **env).exit_code == 0
    # the stale file is named, so that the user knows where that URL came from
    stale = run_found("ping", **env)
    assert stale.exit_code == 1
    assert stale.stderr == (
        f"branchctl: connection_failed: cannot reach branchd at http://127.0.0.1:{closed_port}: "
        f"Connection refused (URL read from {tmp_path / 'branchd.url'})\n"
    )


def test_no_url_file_means_the_default_url(tmp_path: Path) -> None:
    assert find_url({"BRANCHD_STATE_DIR": str(tmp_path)}) == (DEFAULT_URL, None)
    (tmp_path / "branchd.url").write_text("\n")
    assert find_url({"BRANCHD_STATE_DIR": str(tmp_path)}) == (DEFAULT_URL, None)
    assert find_url({"HOME": str(tmp_path / "nobody")}) == (DEFAULT_URL, None)


@pytest.mark.parametrize(
    "args",
    [
        ["--bogus", "ping"],
        ["instances", "show", "web"],
        ["logs", "web", "w1", "--lines", "many"],
        ["instances", "add", "web", "--autorestart", "sometimes"],
        ["apps", "add", "web", "--env", "NOEQUALS"],
        ["instances", "add", "web", "--startretries", "0", "--", "x"],
        ["instances", "add", "web", "--startretries", "never", "--", "x"],
        ["instances", "add", "web", "--umask", "9", "--", "x"],
        ["instances", "add", "web", "--umask", "1000", "--", "x"],
        ["instances", "add", "web", "--memory-max", "lots", "--", "x"],
        ["instances", "add", "web", "--cpu-max", "0", "--", "x"],
        ["instances", "add", "web", "--pids-max", "0", "--", "x"],
        ["instances", "set", "web", "w1", "--no-env-file", "--env-file", "/a.env"],
        ["instances", "set", "web", "w1"],
    ],
)
def test_usage_errors_are_exit_2(daemon: FakeDaemon, args: list[str]) -> None:
    result = run(daemon, *args)
    assert result.exit_code == 2
    assert daemon.seen == []


def test_add_instance_with_env_files_umask_and_retries_forever(daemon: FakeDaemon) -> None:
    result = run(
        daemon,
        "instances", "add", "web", "--name", "api", "--env-file", "/etc/api.env",
        "--env-file", "-/etc/local.env", "--umask", "0027", "--startretries", "FOREVER",
        "--", "./api",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (seen,) = daemon.seen
    assert seen.body == {
        "name": "api",
        "command": ["./api"],
        "env_file": ["/etc/api.env", "-/etc/local.env"],
        "umask": "0027",
        "startretries": "forever",
    }


def test_set_cgroup_limits(daemon: FakeDaemon) -> None:
    result = run(
        daemon,
        "instances", "add", "web", "--name", "api", "--memory-max", "512MiB", "--cpu-max",
        "0.5", "--pids-max", "64", "--", "./api",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (seen,) = daemon.seen
    assert seen.body == {
        "name": "api",
        "command": ["./api"],
        "memory_max": 512 << 20,
        "cpu_max": 0.5,
        "pids_max": 64,
    }


def test_add_instance_sends_the_argv_after_double_dash(daemon: FakeDaemon) -> None:
    result = run(
        daemon,
        "instances",
        "add",
        "web",
        "--name",
        "s",
        "--env",
        "X=a=b",
        "--startsecs",
        "0",
        "--stopsignal",
        "sigint",
        "--no-autostart",
        "--",
        "python",
        "-c",
        "print(1)",
    )
    assert result.exit_code == 0, result.output
    (seen,) = daemon.seen
    assert (seen.method, seen.path) == ("POST", "/v1/apps/web/instances")
    assert seen.body == {
        "name": "s",
        "command": ["python", "-c", "print(1)"],
        "env": {"X": "a=b"},
        "startsecs": 0.0,
        "stopsignal": "INT",
        "autostart": False,
    }  # and nothing else: the app's defaults apply to what is not given
    assert "command" in result.stdout and '["python","-c","print(1)"]' in result.stdout


def test_token_is_sent_as_bearer_header() -> None:
    with FakeDaemon(token="s3cret") as daemon:
        assert run(daemon, "apps").exit_code == 1
        assert run(daemon, "--token", "s3cret", "apps").exit_code == 0
        assert run(daemon, "apps", BRANCHD_TOKEN="s3cret").exit_code == 0
        headers = [s.headers.get("Authorization") for s in daemon.seen]
    assert headers == [None, "Bearer s3cret", "Bearer s3cret"]


def test_apps_add_parses_defaults_as_json_when_it_can(daemon: FakeDaemon) -> None:
    result = run(
        daemon,
        "apps",
        "add",
        "api",
        "--env",
        "BROKER=redis://",
        "--default",
        "startsecs=0",
        "--default",
        'command=["celery", "worker"]',
        "--default",
        "cwd=/srv",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("created app 'api'\n")
    assert next(s.body for s in daemon.seen if s.method == "PUT") == {
        "env": {"BROKER": "redis://"},
        "defaults": {"startsecs": 0, "command": ["celery", "worker"], "cwd": "/srv"},
    }
    assert run(daemon, "apps", "add", "api").stdout.startswith("replaced app 'api'\n")


def test_apps_table(daemon: FakeDaemon) -> None:
    lines = run(daemon, "apps").stdout.splitlines()
    assert lines[0].split() == ["NAME", "ENV", "DEFAULTS", "CREATED"]
    assert [line.split()[:3] for line in lines[1:]] == [["web", "A", "-"], ["idle", "-", "-"]]


def test_stop_prints_the_state(daemon: FakeDaemon) -> None:
    result = run(daemon, "instances", "stop", "web", "w1")
    assert result.exit_code == 0, result.output
    assert result.stdout == "web/w1: stopped\n"
    # the instance first (its stopwaitsecs bounds the wait), then the stop
    assert [(s.method, s.path) for s in daemon.seen] == [
        ("GET", "/v1/apps/web/instances/w1"),
        ("POST", "/v1/apps/web/instances/w1/stop"),
    ]


def test_logs(daemon: FakeDaemon) -> None:
    result = run(daemon, "logs", "web", "w1", "-n", "7", "--stderr")
    assert result.exit_code == 0, result.output
    assert result.stdout == "stderr 1\nstderr 2\n"
    assert daemon.seen[0].query == {"stream": "stderr", "tail": "7"}


def test_logs_follow_prints_as_it_streams(daemon: FakeDaemon) -> None:
    result = run(daemon, "logs", "web", "w1", "-f")
    assert result.exit_code == 0, result.output
    assert result.stdout == "old line\nnew \u00e9line\n"
    assert daemon.seen[0].query == {"stream": "stdout", "tail": "50", "follow": "1"}


# -- the clients ----------------------------------------------------------------


def test_sync_client(daemon: FakeDaemon) -> None:
    with Client(daemon.url) as client:
        assert client.ping() is True
        instance = client.get_instance("web", "w1")
        assert isinstance(instance, Instance)
        assert (instance.state, instance.pid, instance.command[0]) == ("running", 4242, "celery")
        assert "added_in_api_v1_1" in instance.raw  # unknown fields are kept, not refused
        app, created = client.put_app("new", env={"K": "V"})
        assert created and app.env == {"K": "V"}
        with pytest.raises(ApiError) as info:
            client.get_instance("web", "nope")
        assert (info.value.status, info.value.code) == (404, "not_found")
        chunks = list(client.follow_logs("web", "w1", tail=3))
        assert "".join(chunks) == "old line\nnew \u00e9line\n"


def test_sync_client_can_leave_a_stream_early(daemon: FakeDaemon) -> None:
    with Client(daemon.url) as client:
        chunks = client.follow_logs("web", "w1")
        assert next(chunks) == "old line\n"
        chunks.close()
        assert client.ping()


async def test_async_client(daemon: FakeDaemon, closed_port: int) -> None:
    async with AsyncClient(daemon.url + "/") as client:
        assert [i.name for i in await client.instances()] == ["w1", "w2"]
        with pytest.raises(ApiError) as info:
            await client._json("GET", "/v1/proxy-error")
        assert (info.value.status, info.value.code) == (502, "http_502")
        assert "Bad Gateway" in info.value.message
    async with AsyncClient(f"127.0.0.1:{closed_port}") as client:
        with pytest.raises(ConnectionFailed) as failed:
            await client.ping()
        assert failed.value.url == f"http://127.0.0.1:{closed_port}"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (0, "0s"), (12.9, "12s"), (185, "3m05s"), (3725, "1h02m"), (90000, "1d01h")],
)
def test_duration(seconds: float | None, text: str) -> None:
    assert duration(seconds) == text


def test_table_pads_columns_and_strips_trailing_blanks() -> None:
    assert table(("A", "LONG"), [("xyz", None), ("", "1")]) == "A    LONG\nxyz  -\n     1"


# -- --json and typos (issue 12, item 14) ----------------------------------------


def _commands(
    group: click.Group, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    """Every command and group below ``group``, by the words that name it."""
    for name, command in group.commands.items():
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


#: The root's options (with its --json), from which it builds the options object.
GLOBAL_OPTIONS = ("--url", "--token", "--timeout")
#: No --json after these: 'celery' passes every word after APP to Celery (its
#: inspect has a --json of its own), 'daemon' is only a group of 'exit'.
WITHOUT_JSON = {("celery",), ("daemon",), ("cluster",), ("cluster", "keys")}


def test_every_command_gets_the_shared_options_from_its_class() -> None:
    commands = dict(_commands(main))
    leaves = {path for path, c in commands.items() if not isinstance(c, click.Group)}
    assert {("logs",), ("instances", "restart"), ("daemon", "exit"), ("stats",)} <= leaves
    root_opts = [o for p in main.params for o in p.opts]
    assert all(root_opts.count(o) == 1 for o in (*GLOBAL_OPTIONS, "--json")), root_opts
    runner = CliRunner()
    for path, command in commands.items():
        shared = BranchctlGroup if isinstance(command, click.Group) else BranchctlCommand
        assert isinstance(command, shared), path
        opts = [o for p in command.params for o in p.opts]
        # declared once, on the root: not again on a command
        assert not set(GLOBAL_OPTIONS) & set(opts), path
        assert opts.count("--json") == (0 if path in WITHOUT_JSON else 1), path
        result = runner.invoke(main, [*path, "-h"], prog_name="branchctl")
        assert result.exit_code == 0 and result.stdout.startswith(
            f"Usage: branchctl {' '.join(path)} "
        ), (path, result.output)


def test_a_command_of_the_shared_class_gets_the_options_object() -> None:
    got: list[Options] = []

    @click.group(cls=BranchctlGroup)
    @click.pass_context
    def root(ctx: click.Context) -> None:
        ctx.obj = Options(url="http://branch", token=None, timeout=1.0, json=False)

    @root.group()
    def group() -> None:
        pass

    @group.command()
    def leaf(opts: Options) -> None:
        got.append(opts)

    assert CliRunner().invoke(root, ["group", "leaf"]).exit_code == 0
    assert CliRunner().invoke(root, ["group", "leaf", "--json"]).exit_code == 0
    assert [o.json for o in got] == [False, True]
    assert {o.url for o in got} == {"http://branch"}
    assert isinstance(group, BranchctlGroup) and isinstance(leaf, BranchctlCommand)


def test_json_after_the_subcommand(daemon: FakeDaemon) -> None:
    result = run(daemon, "instances", "show", "web", "w1", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["name"] == "w1"
    # logs prints the log as it is, with or without --json, wherever it is given
    assert run(daemon, "logs", "web", "w1", "--json").stdout == "stdout 1\nstdout 2\n"


@pytest.mark.parametrize(
    ("args", "close"),
    [
        (["instances", "lst"], "list"),
        (["instances", "shwo", "web", "w1"], "show"),
        (["instances", "stpo", "web", "w1"], "stop"),
        (["apps", "lst"], "list"),
        (["apps", "shw", "web"], "show"),
    ],
)
def test_a_typo_in_a_group_suggests_the_command(
    daemon: FakeDaemon, args: list[str], close: str
) -> None:
    result = run(daemon, *args)
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"branchctl: No such command {args[1]!r}. Did you mean {close!r}? "
        f"(see 'branchctl {args[0]} --help')\n"
    )
    assert "no app" not in result.stderr


def test_an_app_named_like_a_typo_is_still_listed(daemon: FakeDaemon) -> None:
    daemon.instances["shop"] = [instance_json("shop", "s1")]  # 'shop' is close to 'show'
    result = run(daemon, "instances", "shop")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1].split()[:2] == ["shop", "s1"]
    # a bad option after it is the user's error, not a typo of 'show'
    result = run(daemon, "instances", "shop", "--bogus")
    assert result.exit_code == 2 and "No such option '--bogus'" in result.stderr, result.stderr
    # and a word close to nothing is still an app that does not exist
    result = run(daemon, "instances", "ghost")
    assert (result.exit_code, result.stderr) == (1, "branchctl: not_found: no app 'ghost'\n")


# -- waiting for stops and starts (issue 12, items 10 and 14) ----------------------

RUNNING = {"state": "running", "pid": 4242, "reason": None}
STOPPING = {"state": "stopping", "pid": 4242}
STOPPED = {"state": "stopped", "pid": None, "stop_step": "signal"}


def test_stop_waits_for_the_stop_and_shows_what_it_waits_for(daemon: FakeDaemon) -> None:
    daemon.scripts[("w1", "stop")] = [STOPPING, STOPPING, STOPPING, STOPPED]
    result = run(daemon, "instances", "stop", "web", "w1")
    assert result.exit_code == 0, result.output
    assert result.stdout == "web/w1: stopped\n"
    # one line per change, not one per poll
    assert result.stderr == (
        "web/w1: stopping (pid 4242): up to 10s (stopwaitsecs), then SIGKILL\n"
    )
    stops = [s for s in daemon.seen if s.path.endswith("/stop")]
    assert [(s.method, s.query) for s in stops] == [("POST", {"wait": "false"})]
    assert [s.path for s in daemon.seen].count("/v1/apps/web/instances/w1") == 1 + 3


def test_stop_no_wait_answers_at_once(daemon: FakeDaemon) -> None:
    daemon.scripts[("w1", "stop")] = [STOPPING, STOPPED]
    result = run(daemon, "instances", "stop", "web", "w1", "--no-wait")
    assert (result.exit_code, result.stdout, result.stderr) == (
        0,
        "web/w1: stopping (pid 4242)\n",
        "",
    )
    assert [(s.method, s.path) for s in daemon.seen] == [("POST", "/v1/apps/web/instances/w1/stop")]


def test_a_stop_longer_than_its_stopwaitsecs_is_a_timeout_not_a_connection_error(
    daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_instances, "WAIT_GRACE", 0.0)
    fast = {**STOPPING, "stopwaitsecs": 0.2, "startsecs": 0}
    daemon.scripts[("w1", "stop")] = [fast] + [{}] * 1000
    result = run(daemon, "instances", "stop", "web", "w1")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        "branchctl: timeout: web/w1 is still stopping after 0.2s; branchd goes on with it "
        "(see 'branchctl instances show web w1')"
    )
    assert "cannot reach" not in result.stderr


def test_no_answer_in_time_is_not_blamed_on_the_connection(daemon: FakeDaemon) -> None:
    daemon.instances["web"].append(instance_json("web", "slow"))
    result = run(daemon, "--timeout", "0.2", "instances", "stop", "web", "slow", "--no-wait")
    assert result.exit_code == 1
    assert result.stderr == (
        f"branchctl: timeout: branchd at {daemon.url} did not answer within 0.2s; "
        "it may still be working\n"
    )


@pytest.mark.parametrize("action", ["start", "restart"])
@pytest.mark.parametrize(
    ("end", "code", "last"),
    [
        (RUNNING, 0, None),
        (
            {"state": "backoff", "pid": None, "reason": "exited too quickly (code 1)"},
            1,
            "branchctl: not_started: web/w1 is backoff: exited too quickly (code 1)",
        ),
        (
            {"state": "fatal", "pid": None, "reason": "gave up after 3 failed start(s)"},
            1,
            "branchctl: not_started: web/w1 is fatal: gave up after 3 failed start(s)",
        ),
    ],
)
def test_start_and_restart_wait_for_the_outcome(
    daemon: FakeDaemon, action: str, end: dict[str, Any], code: int, last: str | None
) -> None:
    starting = {"state": "starting", "pid": 4343}
    first = STOPPING if action == "restart" else starting
    daemon.scripts[("w1", action)] = [first, starting, starting, end]
    result = run(daemon, "instances", action, "web", "w1")
    assert result.exit_code == code, result.output
    assert result.stdout.startswith(f"web/w1: {end['state']}")
    lines = result.stderr.splitlines()
    assert "web/w1: starting (pid 4343)" in lines
    assert lines[-1:] == ([last] if last else ["web/w1: starting (pid 4343)"])
    # --no-wait: exit 0 whatever comes next
    daemon.scripts[("w1", action)] = [first, end]
    assert run(daemon, "instances", action, "web", "w1", "--no-wait").exit_code == 0


def test_remove_waits_until_it_is_gone(daemon: FakeDaemon) -> None:
    daemon.scripts[("w1", "delete")] = [STOPPING, STOPPING, None]
    result = run(daemon, "instances", "remove", "web", "w1")
    assert result.exit_code == 0, result.output
    assert result.stdout == "removed instance web/w1\n"
    assert result.stderr.startswith("web/w1: stopping (pid 4242)")
    deletes = [s for s in daemon.seen if s.method == "DELETE"]
    assert [s.query for s in deletes] == [{"wait": "false"}]
    assert run(daemon, "instances", "show", "web", "w1").exit_code == 1


def test_daemon_status_of_a_branch_in_a_cluster() -> None:
    b = Branch.from_json(
        {
            "id": "b1",
            "hostname": "m1",
            "version": "0.1.0",
            "started_at": time.time() - 3600,
            "api_url": "http://10.0.0.1:8400",
            "pid": 4242,
            "state_dir": "/var/lib/branchd",
            "supervision": "process-group",
            "instance_states": {"stopped": 0, "running": 3, "fatal": 1},
            "cluster": {"members": {"alive": 2, "suspect": 1}},
        }
    )
    text = _status_text(b, "http://127.0.0.1:8400")
    lines = dict(line.split(None, 1) if " " in line else (line, "") for line in text.splitlines())
    assert lines["pid"].strip() == "4242"
    assert lines["url"].strip() == "http://10.0.0.1:8400"
    assert lines["instances"].strip() == "4: 3 running, 1 fatal"
    assert lines["cluster"].strip() == "3 branch(es): 2 alive, 1 suspect"
    assert lines["uptime"].strip().startswith("1h")


def test_limits_of_an_app_and_an_instance(daemon: FakeDaemon) -> None:
    result = run(
        daemon,
        "apps", "add", "shop", "--celery-app", "shop.tasks", "--time-limit", "300",
        "--soft-time-limit", "270", "--max-tasks-per-child", "1000",
        "--max-memory-per-child", "512MiB", "--prefetch-multiplier", "1",
        "--rate-limit", "shop.tasks.resize=600/m", "--task-time-limit", "shop.tasks.encode=3600",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert daemon.seen[-1].body == {
        "env": {},
        "defaults": {},
        "celery_app": "shop.tasks",
        "time_limit": 300.0,
        "soft_time_limit": 270.0,
        "max_tasks_per_child": 1000,
        "max_memory_per_child": 512 << 20,
        "prefetch_multiplier": 1,
        "task_overrides": {
            "shop.tasks.resize": {"rate_limit": "600/m"},
            "shop.tasks.encode": {"time_limit": 3600.0},
        },
    }
    result = run(
        daemon,
        "instances", "add", "web", "--name", "w9", "--kind", "celery", "--disable-prefetch",
        "--rate-limit", "t.a=5/s", "--task-soft-time-limit", "t.a=10", "--rate-limit", "t.b=",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert daemon.seen[-1].body == {
        "kind": "celery",
        "name": "w9",
        "disable_prefetch": True,
        "task_overrides": {
            "t.a": {"rate_limit": "5/s", "soft_time_limit": 10.0},
            "t.b": {"rate_limit": None},  # (TASK=: removed)
        },
    }


def test_reset_of_one_prefetch_form_with_the_other(daemon: FakeDaemon) -> None:
    """What the refusal of a --disable-prefetch over a stored multiplier says
    to run: both in one patch, the multiplier dropped."""
    daemon.apps["shop"] = {"name": "shop", "env": {}, "defaults": {}, "created_at": 3.0}
    daemon.apps["shop"]["prefetch_multiplier"] = 1
    result = run(
        daemon, "apps", "set", "shop", "--reset", "prefetch_multiplier", "--disable-prefetch"
    )
    assert result.exit_code == 0, result.output
    patch = next(s for s in daemon.seen if s.method == "PATCH")
    assert patch.body == {"disable_prefetch": True, "prefetch_multiplier": None}


@pytest.mark.parametrize(
    "args",
    [
        ["apps", "set", "shop", "--rate-limit", "shop.tasks.resize"],
        ["apps", "set", "shop", "--rate-limit", "shop.tasks.resize=fast"],
        ["instances", "set", "web", "w1", "--task-time-limit", "t=-3"],
        ["instances", "set", "web", "w1", "--max-memory-per-child", "lots"],
    ],
)
def test_bad_limits_are_usage_errors(daemon: FakeDaemon, args: list[str]) -> None:
    result = run(daemon, *args)
    assert result.exit_code == 2, result.output
    assert daemon.seen == []
