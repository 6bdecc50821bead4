"""The HTTP API of docs/api.md against a real daemon: every route, good and bad input.

Every reply goes through ``Api.call``, which fails the test on a 5xx or a
traceback on the wire; each test also checks the daemon logged no unexpected
error (the errors middleware logs those before answering 500).
"""

from __future__ import annotations

import itertools
import json
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

from tests.conftest import SLEEPER, Branchd, Reply, wait_for

PY = sys.executable
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
TICKER = (
    "import sys, time, itertools\n"
    "for i in itertools.count():\n"
    "    print('tick', i, flush=True)\n"
    "    print('err', i, file=sys.stderr, flush=True)\n"
    "    time.sleep(0.05)"
)


class Api:
    """A Branchd client that refuses 5xx answers and tracebacks."""

    def __init__(self, b: Branchd) -> None:
        self.b = b

    def call(self, method: str, path: str, body: Any = None, **kw: Any) -> Reply:
        reply = self.b.call(method, path, body, **kw)
        assert reply.status < 500, (method, path, reply.status, reply.text)
        assert "Traceback" not in reply.text, reply.text
        return reply

    def ok(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        reply = self.call(method, path, body)
        assert reply.status == status, (method, path, reply.status, reply.text)
        if status == 204:
            assert reply.text == ""
        elif not path.endswith("/logs") and "/logs?" not in path:
            assert reply.headers["Content-Type"].startswith("application/json")
        return reply.body

    def err(
        self, method: str, path: str, body: Any = None, *, status: int, code: str, **kw: Any
    ) -> Reply:
        reply = self.call(method, path, body, **kw)
        assert reply.status == status, (method, path, body, reply.status, reply.text)
        assert_error(reply, code)
        return reply

    def check_log(self) -> None:
        text = self.b.log()
        assert "unexpected error" not in text, text
        assert "Unhandled exception" not in text, text


def assert_error(reply: Reply, code: str) -> None:
    assert reply.headers["Content-Type"].startswith("application/json"), reply.headers
    assert isinstance(reply.body, dict) and set(reply.body) == {"error"}, reply.text
    error = reply.body["error"]
    assert set(error) == {"code", "message"}, reply.text
    assert error["code"] == code, reply.text
    assert isinstance(error["message"], str) and error["message"], reply.text


@pytest.fixture
def api(branchd: Branchd) -> Iterator[Api]:
    a = Api(branchd)
    yield a
    a.check_log()


def make_app(api: Api, app: str = "web", **body: Any) -> dict[str, Any]:
    api.call("PUT", f"/v1/apps/{app}", body)
    return api.ok("GET", f"/v1/apps/{app}")  # type: ignore[no-any-return]


def make_instance(api: Api, name: str, app: str = "web", **fields: Any) -> dict[str, Any]:
    fields.setdefault("command", SLEEPER)
    return api.ok(  # type: ignore[no-any-return]
        "POST", f"/v1/apps/{app}/instances", {"name": name, **fields}, status=201
    )


INST = "/v1/apps/web/instances/w1"


# branch ---------------------------------------------------------------------


def test_ping_branch_and_branches(api: Api) -> None:
    assert api.ok("GET", "/v1/ping") == {"ok": True}
    branch = api.ok("GET", "/v1/branch")
    assert set(branch) >= {"id", "hostname", "version", "started_at", "address", "capacity"}
    assert branch["address"].startswith("127.0.0.1:")
    cap = branch["capacity"]
    assert cap["cpus"] >= 1 and len(cap["load"]) == 3
    assert 0 < cap["memory_free"] <= cap["memory_total"]
    assert cap["instances"] == 0
    branches = api.ok("GET", "/v1/branches")["items"]
    assert len(branches) == 1 and branches[0]["id"] == branch["id"]
    # a cluster of one lists itself, with the membership's fields beside its record
    # (less what the answering daemon says of itself: GET /v1/branch only)
    daemon_only = {"pid", "state_dir", "supervision", "instance_states", "cluster"}
    # (and less the names: its instances and its running workers)
    assert set(branches[0]) == (set(branch) - {"instances", "running"} - daemon_only) | {
        "state", "incarnation", "self", "age", "since"
    }
    assert branch["cluster"] is None  # (supervision: as root, cgroups; test_cgroups.py)
    assert branch["supervision"] in ("cgroup-v2", "cgroup-v1-hybrid", "process-group")
    assert set(branch["instance_states"]) == {
        "stopped", "waiting", "starting", "running", "backoff", "stopping", "exited", "fatal"
    }
    assert branches[0]["state"] == "alive" and branches[0]["self"] is True
    make_app(api)
    make_instance(api, "w1", autostart=False)
    assert api.ok("GET", "/v1/branch")["capacity"]["instances"] == 1
    assert api.ok("GET", "/v1/branch")["instance_states"]["stopped"] == 1
    me = api.ok("GET", "/v1/branches/self")
    assert me["id"] == branch["id"] and me["instances"] == ["web/w1"]
    assert me["running"] == []  # (no Celery worker runs here)
    assert api.ok("GET", f"/v1/branches/{branch['id']}") == me
    assert api.call("GET", "/v1/branches/nobody").status == 404
    # no cluster: leaving it, and its keys, are a conflict that says why
    left = api.call("POST", "/v1/branches/self/leave")
    assert left.status == 409 and "not in a cluster" in left.body["error"]["message"]
    assert api.call("GET", "/v1/cluster/keys").status == 409
    doc = api.ok("GET", "/v1/openapi.json")
    assert doc["openapi"].startswith("3.1")


# apps -----------------------------------------------------------------------


def test_listings_name_env_variables_but_never_show_their_values(api: Api) -> None:
    secret = {"DATABASE_URL": "postgres://u:pw@db/x", "API_KEY": "k-123"}
    api.ok("PUT", "/v1/apps/web", {"env": secret}, status=201)
    make_instance(api, "w1", env={"TOKEN": "t-456"}, autostart=False)
    listed_app = api.ok("GET", "/v1/apps")["items"][0]
    assert listed_app["env"] == {"DATABASE_URL": "**", "API_KEY": "**"}
    listed = api.ok("GET", "/v1/apps/web/instances")["items"][0]
    assert listed["env"] == {"TOKEN": "**"}
    listing = api.call("GET", "/v1/apps/web/instances").text + api.call("GET", "/v1/apps").text
    assert "k-123" not in listing and "t-456" not in listing and "pw@" not in listing
    # the answer about one of them has them (the token holder asked for that one)
    assert api.ok("GET", "/v1/apps/web")["env"] == secret
    assert api.ok("GET", "/v1/apps/web/instances/w1")["env"] == {"TOKEN": "t-456"}


def test_app_create_replace_get_list_delete(api: Api) -> None:
    assert api.ok("GET", "/v1/apps") == {"items": []}
    created = api.ok("PUT", "/v1/apps/web", {"env": {"A": "1"}}, status=201)
    assert created["name"] == "web" and created["env"] == {"A": "1"}
    assert created["defaults"] == {} and created["created_at"] > 0
    replaced = api.ok(
        "PUT", "/v1/apps/web", {"env": {"B": "2"}, "defaults": {"startsecs": 0.5}}, status=200
    )
    assert replaced["env"] == {"B": "2"} and replaced["defaults"] == {"startsecs": 0.5}
    assert replaced["created_at"] == created["created_at"]
    assert api.ok("GET", "/v1/apps/web") == replaced
    # an empty body is {}: an app with no env and no defaults
    bare = api.call("PUT", "/v1/apps/bare", raw=b"")
    assert bare.status == 201 and bare.body["env"] == {} and bare.body["defaults"] == {}
    assert [a["name"] for a in api.ok("GET", "/v1/apps")["items"]] == ["bare", "web"]
    assert api.ok("DELETE", "/v1/apps/bare", status=204) is None
    api.err("GET", "/v1/apps/bare", status=404, code="not_found")
    api.err("DELETE", "/v1/apps/bare", status=404, code="not_found")
    assert [a["name"] for a in api.ok("GET", "/v1/apps")["items"]] == ["web"]


def test_delete_app_stops_and_removes_its_instances(api: Api) -> None:
    make_app(api)
    make_instance(api, "w1", startsecs=0.1)
    pid = api.b.wait_state("web", "w1", "running")["pid"]
    api.ok("DELETE", "/v1/apps/web", status=204)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    api.err("GET", INST, status=404, code="not_found")
    # the name is free again
    make_app(api, "other")
    make_instance(api, "w1", app="other", autostart=False)


# instances ------------------------------------------------------------------


def test_instance_lifecycle(api: Api) -> None:
    make_app(api, defaults={"command": SLEEPER, "startsecs": 0.1})
    # no body at all: everything from the app's defaults, a generated name
    reply = api.call("POST", "/v1/apps/web/instances", raw=b"")
    assert reply.status == 201, reply.text
    gen = reply.body["name"]
    assert NAME_RE.fullmatch(gen) and gen.startswith("web-")
    assert reply.headers["Location"] == f"/v1/apps/web/instances/{gen}"
    assert reply.body["command"] == SLEEPER and reply.body["startsecs"] == 0.1

    reply = api.call("POST", "/v1/apps/web/instances", {"name": "w1", "stopwaitsecs": 5})
    assert reply.status == 201, reply.text
    assert reply.headers["Location"] == INST
    inst = reply.body
    assert inst["app"] == "web" and inst["kind"] == "process" and inst["desired"] == "running"
    assert inst["autorestart"] == "on-failure" and inst["exitcodes"] == [0]
    assert inst["stopwaitsecs"] == 5 and inst["branch"] == api.ok("GET", "/v1/branch")["id"]
    assert api.ok("GET", reply.headers["Location"])["name"] == "w1"

    names = [i["name"] for i in api.ok("GET", "/v1/apps/web/instances")["items"]]
    assert sorted(names) == sorted([gen, "w1"])
    running = api.b.wait_state("web", "w1", "running")
    assert running["pid"] and running["uptime"] is not None

    stats = api.ok("GET", INST + "/stats")
    assert stats["name"] == "w1" and stats["pid"] == running["pid"]
    assert stats["processes"] == 1 and stats["memory_rss"] > 0 and stats["cpu_percent"] >= 0

    patched = api.ok("PATCH", INST, {"stopsignal": "INT", "env": {"X": "y"}})
    assert patched["stopsignal"] == "INT" and patched["env"] == {"X": "y"}
    assert patched["pid"] == running["pid"]  # takes effect at the next start

    stopped = api.ok("POST", INST + "/stop")
    assert stopped["state"] == "stopped" and stopped["desired"] == "stopped"
    assert stopped["pid"] is None and stopped["stop_step"] == "signal"
    stats = api.ok("GET", INST + "/stats")
    assert stats["pid"] is None and stats["processes"] == 0

    started = api.ok("POST", INST + "/start")
    assert started["desired"] == "running" and started["state"] in ("starting", "running")
    first = api.b.wait_state("web", "w1", "running")["pid"]
    restarted = api.ok("POST", INST + "/restart")
    assert restarted["desired"] == "running"
    wait_for(lambda: api.b.instance("web", "w1")["pid"] not in (None, first))
    api.b.wait_state("web", "w1", "running")

    assert api.ok("DELETE", INST, status=204) is None
    api.err("GET", INST, status=404, code="not_found")
    api.err("DELETE", INST, status=404, code="not_found")
    assert not psutil.pid_exists(first) or psutil.Process(first).status() == "zombie"
    assert [i["name"] for i in api.ok("GET", "/v1/apps/web/instances")["items"]] == [gen]


def test_start_stop_restart_of_stopped_instance(api: Api) -> None:
    make_app(api)
    inst = make_instance(api, "w1", autostart=False)
    assert inst["state"] == "stopped" and inst["desired"] == "stopped" and not inst["autostart"]
    # stop and restart are fine on a stopped instance
    assert api.ok("POST", INST + "/stop")["state"] == "stopped"
    assert api.ok("POST", INST + "/restart")["desired"] == "running"
    api.b.wait_state("web", "w1", "running")
    assert api.ok("POST", INST + "/start")["state"] == "running"  # already running: no-op


#: Ignores SIGTERM: its stop lasts the whole stopwaitsecs, then SIGKILL.
STUBBORN = [
    PY,
    "-c",
    "import os, signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('up', os.getpid(), flush=True)\n"
    "time.sleep(1e9)",
]


def _ignoring_term(api: Api, name: str) -> None:
    """Wait until the instance's current process ignores TERM (it said so)."""

    def said_up() -> bool:
        pid = api.b.wait_state("web", name, "running")["pid"]
        tail = api.call("GET", f"/v1/apps/web/instances/{name}/logs?tail=1").text
        return tail == f"up {pid}\n"

    wait_for(said_up)


def test_stop_restart_delete_without_waiting(api: Api) -> None:
    make_app(api)
    make_instance(api, "w1", command=STUBBORN, startsecs=0, stopwaitsecs=2)
    _ignoring_term(api, "w1")
    started = time.monotonic()
    stopping = api.ok("POST", INST + "/stop?wait=false")
    assert stopping["state"] == "stopping" and stopping["desired"] == "stopped"
    assert time.monotonic() - started < 1.5  # not the 2 s of its stopwaitsecs
    done = api.b.wait_state("web", "w1", "stopped")
    assert done["stop_step"] == "kill"

    api.ok("POST", INST + "/start")
    _ignoring_term(api, "w1")
    restarting = api.ok("POST", INST + "/restart?wait=0")
    assert restarting["state"] == "stopping" and restarting["desired"] == "running"
    _ignoring_term(api, "w1")
    reply = api.call("DELETE", INST + "?wait=false")
    assert reply.status == 202, reply.text
    assert reply.body["state"] == "stopping" and reply.body["desired"] == "removed"
    # still there while it stops; a second delete joins the first, a start is a conflict
    assert api.ok("GET", INST)["state"] == "stopping"
    again = api.call("DELETE", INST + "?wait=false")
    assert again.status == 202 and again.body["desired"] == "removed", again.text
    api.err("POST", INST + "/start", status=409, code="conflict")
    wait_for(lambda: api.call("GET", INST).status == 404)
    # a bad flag is a 400 that names it
    make_instance(api, "w2", autostart=False)
    reply = api.err(
        "POST", "/v1/apps/web/instances/w2/stop?wait=maybe", status=400, code="bad_request"
    )
    assert "wait" in reply.body["error"]["message"]


def test_max_length_names_are_fine(api: Api) -> None:
    name = "a" * 63
    api.ok("PUT", f"/v1/apps/{name}", {}, status=201)
    reply = api.call("POST", f"/v1/apps/{name}/instances", {"name": name, "command": SLEEPER})
    assert reply.status == 201, reply.text
    assert reply.headers["Location"] == f"/v1/apps/{name}/instances/{name}"
    api.ok("DELETE", f"/v1/apps/{name}", status=204)


# logs -----------------------------------------------------------------------


def test_logs_tail_and_stream(api: Api) -> None:
    make_app(api)
    make_instance(api, "w1", command=[PY, "-c", TICKER], startsecs=0.1)
    wait_for(lambda: "tick 20" in api.call("GET", INST + "/logs?tail=1000").text)

    reply = api.call("GET", INST + "/logs")
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/plain")
    lines = reply.text.splitlines()
    assert 20 <= len(lines) <= 100 and all(line.startswith("tick ") for line in lines)
    assert reply.text.endswith("\n")

    three = api.call("GET", INST + "/logs?tail=3").text.splitlines()
    assert len(three) == 3 and all(line.startswith("tick ") for line in three)
    numbers = [int(line.split()[1]) for line in three]
    assert numbers == list(range(numbers[0], numbers[0] + 3))

    assert api.call("GET", INST + "/logs?tail=0").text == ""
    err = api.call("GET", INST + "/logs?stream=stderr&tail=5").text.splitlines()
    assert len(err) == 5 and all(line.startswith("err ") for line in err)
    out = api.call("GET", INST + "/logs?stream=stdout&tail=10000&follow=0").text
    assert out.startswith("tick 0\n")

    # an instance that never ran has empty logs
    make_instance(api, "quiet", autostart=False)
    assert api.call("GET", "/v1/apps/web/instances/quiet/logs").text == ""


def test_tail_of_a_huge_log_without_newlines_is_bounded(api: Api) -> None:
    # A 400 MiB log with no newline (sparse: no disk used) once took 1.9 GB of
    # the daemon's memory for tail=1: the answer and the growth are bounded now.
    make_app(api)
    make_instance(api, "quiet", autostart=False)
    log = api.b.state_dir / "logs" / "web" / "quiet.stdout.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as f:
        f.truncate(400 * 1024 * 1024)
    daemon = psutil.Process(api.b.pid)
    before = daemon.memory_info().rss
    reply = api.call("GET", "/v1/apps/web/instances/quiet/logs?tail=1")
    assert reply.status == 200
    assert len(reply.text.encode()) <= 1024 * 1024
    assert reply.text.startswith("[...] ") and reply.text.rstrip().endswith("bytes cut]")
    assert daemon.memory_info().rss - before <= 20 * 1024 * 1024


def _open_follow(b: Branchd, path: str) -> Any:
    req = urllib.request.Request(b.url + path)
    if b.token:
        req.add_header("Authorization", f"Bearer {b.token}")
    return urllib.request.urlopen(req, timeout=10)


def _established(b: Branchd) -> int:
    port = int(b.url.rsplit(":", 1)[1])
    conns = psutil.Process(b.pid).net_connections(kind="tcp")
    return sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)


def test_logs_follow_streams_new_lines_until_the_client_leaves(api: Api) -> None:
    make_app(api)
    make_instance(api, "w1", command=[PY, "-c", TICKER], startsecs=0.1)
    wait_for(lambda: "tick 3" in api.call("GET", INST + "/logs").text)

    with _open_follow(api.b, INST + "/logs?tail=2&follow=1") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        lines = [resp.readline().decode() for _ in range(12)]
    # every line whole, in order, and later lines are new ones (not just the tail)
    assert all(re.fullmatch(r"tick \d+\n", line) for line in lines), lines
    numbers = [int(line.split()[1]) for line in lines]
    assert numbers == list(range(numbers[0], numbers[0] + 12))

    with _open_follow(api.b, INST + "/logs?stream=stderr&tail=0&follow=1") as resp:
        assert resp.readline().decode().startswith("err ")

    # several followers that leave, one of them on a log that never moves
    make_instance(api, "quiet", autostart=False)
    for path in [INST + "/logs?follow=1", "/v1/apps/web/instances/quiet/logs?follow=true"] * 3:
        with socket.create_connection(("127.0.0.1", int(api.b.url.rsplit(":", 1)[1]))) as s:
            auth = f"Authorization: Bearer {api.b.token}\r\n"
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\r\n".encode())
            s.settimeout(10)
            assert s.recv(1024).startswith(b"HTTP/1.1 200")

    # the daemon keeps working and lets the connections go
    assert api.ok("GET", "/v1/ping") == {"ok": True}
    assert api.ok("GET", INST)["state"] == "running"
    assert "tick" in api.call("GET", INST + "/logs?tail=1").text
    wait_for(lambda: _established(api.b) == 0, 10)

    # a follow of nothing is an ordinary 404, not a stream
    api.err("GET", "/v1/apps/web/instances/nope/logs?follow=1", status=404, code="not_found")


BAD_QUERIES = [
    "tail=-1",
    "tail=abc",
    "tail=",
    "tail=1.5",
    "tail=10001",
    "stream=both",
    "stream=STDOUT",
    "stream=",
    "follow=2",
    "follow=maybe",
    "follow=1&tail=-1",
]


def test_logs_bad_query_is_400(api: Api) -> None:
    make_app(api)
    make_instance(api, "w1", autostart=False)
    for query in BAD_QUERIES:
        api.err("GET", f"{INST}/logs?{query}", status=400, code="bad_request")


# bad bodies -----------------------------------------------------------------

BODY_ROUTES = [
    ("PUT", "/v1/apps/web"),
    ("POST", "/v1/apps/web/instances"),
    ("PATCH", INST),
]


@pytest.fixture
def with_instance(api: Api) -> Api:
    make_app(api)
    make_instance(api, "w1", autostart=False)
    return api


NOT_JSON = [
    b"{",
    b"not json",
    b"\xff\xfe",
    b'{"env": {}} x',
    b"NaN",
    b'{"startsecs": NaN}',
    b'{"startsecs": Infinity}',
]
NOT_OBJECT = [b"[]", b'[{"name": "x"}]', b'"x"', b"1", b"null", b"true"]


def test_body_not_json_or_not_an_object_is_400(with_instance: Api) -> None:
    for method, path in BODY_ROUTES:
        for raw in NOT_JSON + NOT_OBJECT:
            with_instance.err(method, path, raw=raw, status=400, code="bad_request")
    assert with_instance.ok("GET", "/v1/apps/web")["defaults"] == {}


WRONG: list[dict[str, Any]] = [
    {"command": "sleep 1"},
    {"command": []},
    {"command": [1]},
    {"command": [""]},
    {"env": ["A=1"]},
    {"env": {"A": 1}},
    {"cwd": 1},
    {"user": ""},
    {"autorestart": "sometimes"},
    {"exitcodes": 0},
    {"exitcodes": [256]},
    {"exitcodes": ["0"]},
    {"startsecs": "1"},
    {"startsecs": -1},
    {"startretries": 0},
    {"startretries": 1.5},
    {"stopsignal": "SIGTERM"},
    {"autostart": "yes"},
    {"autostart": 1},
    {"log_max_bytes": 10},
    {"log_backups": -1},
]


def test_wrong_types_are_422(with_instance: Api) -> None:
    api = with_instance
    for fields in WRONG:
        body = {"name": "w2", **fields}
        api.err("POST", "/v1/apps/web/instances", body, status=422, code="invalid")
        api.err("PATCH", INST, fields, status=422, code="invalid")
        api.err("PUT", "/v1/apps/web", {"defaults": fields}, status=422, code="invalid")
    api.err("GET", "/v1/apps/web/instances/w2", status=404, code="not_found")
    # null is no value for a create nor for a default; on a PATCH it puts the
    # field back to its default (``instances set --reset``)
    null = {"stopwaitsecs": None}
    api.err("POST", "/v1/apps/web/instances", {"name": "w2", **null}, status=422, code="invalid")
    api.err("PUT", "/v1/apps/web", {"defaults": null}, status=422, code="invalid")
    api.ok("PATCH", INST, {"stopwaitsecs": 3})
    assert api.ok("PATCH", INST, {"stopwaitsecs": None})["stopwaitsecs"] == 10.0


def test_wrong_types_elsewhere_are_422(with_instance: Api) -> None:
    api = with_instance
    apps: list[Any] = [{"env": {"A": None}}, {"env": "A=1"}, {"defaults": []}, {"defaults": None}]
    for body in apps:
        api.err("PUT", "/v1/apps/web", body, status=422, code="invalid")
    instances: list[Any] = [{"kind": "nope"}, {"kind": 1}, {"name": 1}, {"name": None}]
    for body in instances:
        api.err("POST", "/v1/apps/web/instances", body, status=422, code="invalid")
    # a message names the field
    reply = api.err("PATCH", INST, {"startsecs": "x"}, status=422, code="invalid")
    assert "startsecs" in reply.body["error"]["message"]
    # no command from the body nor from the app's defaults
    api.err("POST", "/v1/apps/web/instances", {"name": "w2"}, status=422, code="invalid")
    # nothing was changed by all this
    assert api.ok("GET", "/v1/apps/web")["defaults"] == {}
    assert api.ok("GET", INST)["startsecs"] == 1


def test_integral_floats_become_ints(with_instance: Api) -> None:
    inst = with_instance.ok("PATCH", INST, {"log_max_bytes": 2048.0, "exitcodes": [1.0]})
    assert inst["log_max_bytes"] == 2048 and isinstance(inst["log_max_bytes"], int)
    assert inst["exitcodes"] == [1]


UNKNOWN_FIELDS = [
    ("PUT", "/v1/apps/web", {"nope": 1}),
    ("PUT", "/v1/apps/web", {"name": "web"}),
    ("PUT", "/v1/apps/web", {"defaults": {"name": "x"}}),
    ("PUT", "/v1/apps/web", {"defaults": {"kind": "process"}}),
    ("PUT", "/v1/apps/web", {"defaults": {"comand": ["x"]}}),
    ("POST", "/v1/apps/web/instances", {"name": "w2", "command": ["x"], "nope": 1}),
    ("POST", "/v1/apps/web/instances", {"name": "w2", "command": ["x"], "desired": "x"}),
    ("POST", "/v1/apps/web/instances", {"name": "w2", "command": ["x"], "state": "x"}),
    ("PATCH", INST, {"nope": 1}),
    ("PATCH", INST, {"name": "w9"}),
    ("PATCH", INST, {"kind": "process"}),
    ("PATCH", INST, {"pid": 1}),
]


def test_unknown_fields_are_422(with_instance: Api) -> None:
    for method, path, body in UNKNOWN_FIELDS:
        with_instance.err(method, path, body, status=422, code="invalid")


BAD_NAMES = [
    "%2E%2E",  # ..
    "..",
    ".",
    ".hidden",
    "-a",
    "_a",
    "a%2Fb",  # a/b
    "a%2F..%2F..%2Fetc",
    "a%00",
    "a%0A",  # a trailing newline: Python's "$" lets it through
    "a%0D%0AX-Injected:%201",
    "a%20b",
    "a%5Cb",
    "%C3%A9t%C3%A9",  # été
    "a" * 64,
]


NAMED_ROUTES = [
    ("PUT", "/v1/apps/{}"),
    ("GET", "/v1/apps/{}"),
    ("DELETE", "/v1/apps/{}"),
    ("GET", "/v1/apps/{}/instances"),
    ("POST", "/v1/apps/{}/instances"),
    ("GET", "/v1/apps/{}/instances/w1"),
    ("GET", "/v1/apps/web/instances/{}"),
    ("PATCH", "/v1/apps/web/instances/{}"),
    ("DELETE", "/v1/apps/web/instances/{}"),
    ("POST", "/v1/apps/web/instances/{}/start"),
    ("POST", "/v1/apps/web/instances/{}/stop"),
    ("POST", "/v1/apps/web/instances/{}/restart"),
    ("GET", "/v1/apps/web/instances/{}/logs"),
    ("GET", "/v1/apps/web/instances/{}/stats"),
]


def test_bad_names_in_path_are_422(api: Api) -> None:
    make_app(api)
    make_instance(api, "w1", autostart=False)
    for bad, (method, template) in itertools.product(BAD_NAMES, NAMED_ROUTES):
        body: Any = {} if method in ("PUT", "POST", "PATCH") else None
        if template.endswith("/instances") and method == "POST":
            body = {"command": SLEEPER}
        reply = api.err(method, template.format(bad), body, status=422, code="invalid")
        # The message says what the name is ("bad name name" once) and the rule.
        what = "app" if template.startswith("/v1/apps/{}") else "instance"
        message = reply.body["error"]["message"]
        assert message.startswith(f"bad {what} name "), (method, template, message)
        assert "use letters, digits" in message, message
    assert [a["name"] for a in api.ok("GET", "/v1/apps")["items"]] == ["web"]
    assert api.ok("GET", INST)["state"] == "stopped"


BAD_BODY_NAMES = [
    "..",
    ".",
    "a/b",
    "../../etc",
    "a\n",
    "a\r\nX-Injected: 1",
    "a b",
    "a\x00",
    "été",
    "a" * 64,
    "",
]


def test_bad_names_in_body_are_422(api: Api) -> None:
    make_app(api)
    for bad in BAD_BODY_NAMES:
        body = {"name": bad, "command": SLEEPER}
        reply = api.err("POST", "/v1/apps/web/instances", body, status=422, code="invalid")
        assert "use letters, digits" in reply.body["error"]["message"], (bad, reply.text)
    assert api.ok("GET", "/v1/apps/web/instances") == {"items": []}


# missing things and conflicts -----------------------------------------------


def test_missing_app_is_404(api: Api) -> None:
    for method, path, body in [
        ("GET", "/v1/apps/ghost", None),
        ("DELETE", "/v1/apps/ghost", None),
        ("GET", "/v1/apps/ghost/instances", None),
        ("POST", "/v1/apps/ghost/instances", {"name": "w1", "command": SLEEPER}),
        ("GET", "/v1/apps/ghost/instances/w1", None),
        ("PATCH", "/v1/apps/ghost/instances/w1", {"startsecs": 1}),
        ("DELETE", "/v1/apps/ghost/instances/w1", None),
        ("POST", "/v1/apps/ghost/instances/w1/start", None),
        ("POST", "/v1/apps/ghost/instances/w1/stop", None),
        ("POST", "/v1/apps/ghost/instances/w1/restart", None),
        ("GET", "/v1/apps/ghost/instances/w1/logs", None),
        ("GET", "/v1/apps/ghost/instances/w1/logs?follow=1", None),
        ("GET", "/v1/apps/ghost/instances/w1/stats", None),
    ]:
        reply = api.err(method, path, body, status=404, code="not_found")
        assert "ghost" in reply.body["error"]["message"]


def test_missing_instance_is_404_even_if_another_app_has_it(api: Api) -> None:
    make_app(api)
    make_app(api, "other")
    make_instance(api, "w1", autostart=False)
    for app, name in [("web", "nope"), ("other", "w1")]:
        base = f"/v1/apps/{app}/instances/{name}"
        for method, path in [
            ("GET", base),
            ("PATCH", base),
            ("DELETE", base),
            ("POST", base + "/start"),
            ("POST", base + "/stop"),
            ("POST", base + "/restart"),
            ("GET", base + "/logs"),
            ("GET", base + "/stats"),
        ]:
            body: Any = {} if method == "PATCH" else None
            reply = api.err(method, path, body, status=404, code="not_found")
            assert name in reply.body["error"]["message"]
    assert api.ok("GET", "/v1/apps/other/instances") == {"items": []}
    assert api.ok("GET", INST)["state"] == "stopped"


def test_instance_name_taken_across_apps_is_409(api: Api) -> None:
    make_app(api)
    make_app(api, "other")
    make_instance(api, "w1", autostart=False)
    for app in ("web", "other"):
        body = {"name": "w1", "command": SLEEPER}
        reply = api.err("POST", f"/v1/apps/{app}/instances", body, status=409, code="conflict")
        assert "w1" in reply.body["error"]["message"]
    assert api.ok("GET", "/v1/apps/other/instances") == {"items": []}
    assert api.ok("GET", INST)["command"] == SLEEPER


# size, auth, routing ----------------------------------------------------------


def test_oversized_body_is_413(with_instance: Api) -> None:
    api = with_instance
    big = json.dumps({"env": {"A": "x" * (1024 * 1024)}}).encode()
    for method, path in BODY_ROUTES:
        api.err(method, path, raw=big, status=413, code="payload_too_large")
    # just under the cap is fine
    fits = json.dumps({"env": {"A": "x" * (1024 * 1024 - 100)}}).encode()
    assert api.call("PUT", "/v1/apps/web", raw=fits).status == 200
    assert api.ok("GET", "/v1/ping") == {"ok": True}


@pytest.fixture
def secured(branchd_factory: Callable[..., Branchd]) -> Iterator[Api]:
    a = Api(branchd_factory(token="s3cret"))
    yield a
    a.check_log()


def test_token_is_required_but_for_ping(secured: Api) -> None:
    api = secured
    api.ok("PUT", "/v1/apps/web", {}, status=201)
    make_instance(api, "w1", autostart=False)
    routes = [
        ("GET", "/v1/branch"),
        ("GET", "/v1/branches"),
        ("GET", "/v1/openapi.json"),
        ("GET", "/v1/apps"),
        ("PUT", "/v1/apps/web"),
        ("GET", "/v1/apps/web"),
        ("DELETE", "/v1/apps/web"),
        ("GET", "/v1/apps/web/instances"),
        ("POST", "/v1/apps/web/instances"),
        ("GET", INST),
        ("PATCH", INST),
        ("DELETE", INST),
        ("POST", INST + "/start"),
        ("POST", INST + "/stop"),
        ("POST", INST + "/restart"),
        ("GET", INST + "/logs"),
        ("GET", INST + "/logs?follow=1"),
        ("GET", INST + "/stats"),
        ("GET", "/v1/nope"),
    ]
    for method, path in routes:
        body: Any = {} if method in ("PUT", "PATCH") else None
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            reply = _call_with_headers(api.b, method, path, body, headers)
            assert reply.status == 401, (method, path, headers, reply.text)
            assert_error(reply, "unauthorized")
            assert reply.headers["WWW-Authenticate"] == "Bearer"
        for headers in (
            {"Authorization": "Basic czNjcmV0"},
            {"Authorization": "Bearer s3cret2"},
            {"Authorization": "Bearer "},
        ):
            assert _call_with_headers(api.b, method, path, body, headers).status == 401
    # nothing was done
    assert api.ok("GET", INST)["state"] == "stopped"
    # ping is open, with or without a token
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        reply = _call_with_headers(api.b, "GET", "/v1/ping", None, headers)
        assert reply.status == 200 and reply.body == {"ok": True}
    # the scheme is case-insensitive
    ok = _call_with_headers(api.b, "GET", "/v1/apps", None, {"Authorization": "bearer s3cret"})
    assert ok.status == 200
    api.ok("DELETE", INST, status=204)


def _call_with_headers(
    b: Branchd, method: str, path: str, body: Any, headers: dict[str, str]
) -> Reply:
    data = json.dumps(body).encode() if body is not None else None
    if data is not None:
        headers = {"Content-Type": "application/json", **headers}
    req = urllib.request.Request(b.url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status, raw, hdrs = resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as err:
        status, raw, hdrs = err.code, err.read(), dict(err.headers)
    text = raw.decode(errors="replace")
    assert status < 500 and "Traceback" not in text, text
    try:
        parsed = json.loads(text) if text else None
    except ValueError:
        parsed = None
    return Reply(status, parsed, hdrs, text)


UNKNOWN_PATHS = [  # ("/" is the dashboard: tests/integration/test_dashboard.py)
    "/v1",
    "/v1/",
    "/v2/ping",
    "/v1/nope",
    "/v1/ping/x",
    "/v1/apps/web/instances/w1/bogus",
    "/v1/apps/web/x",
    "/v1/apps/web/instances/w1/start/now",
    "/favicon.ico",
]


def test_unknown_route_is_404_json(api: Api) -> None:
    for path in UNKNOWN_PATHS:
        for method in ("GET", "POST", "DELETE"):
            reply = api.err(method, path, status=404, code="not_found")
            assert "Allow" not in reply.headers


WRONG_METHODS = [
    ("POST", "/v1/ping", {"GET"}),
    ("DELETE", "/v1/branch", {"GET"}),
    ("POST", "/v1/branches", {"GET"}),
    ("PUT", "/v1/openapi.json", {"GET"}),
    ("POST", "/v1/apps", {"GET"}),
    ("DELETE", "/v1/apps", {"GET"}),
    ("POST", "/v1/apps/web", {"GET", "PUT", "PATCH", "DELETE"}),
    ("GET", "/v1/daemon/exit", {"POST"}),
    ("PUT", "/v1/apps/web/instances", {"GET", "POST"}),
    ("DELETE", "/v1/apps/web/instances", {"GET", "POST"}),
    ("POST", INST, {"GET", "PATCH", "DELETE"}),
    ("PUT", INST, {"GET", "PATCH", "DELETE"}),
    ("GET", INST + "/start", {"POST"}),
    ("DELETE", INST + "/stop", {"POST"}),
    ("PUT", INST + "/restart", {"POST"}),
    ("POST", INST + "/logs", {"GET"}),
    ("DELETE", INST + "/stats", {"GET"}),
]


def test_wrong_method_is_405_json(api: Api) -> None:
    make_app(api)
    make_instance(api, "w1", autostart=False)
    for method, path, allow in WRONG_METHODS:
        reply = api.err(method, path, {}, status=405, code="method_not_allowed")
        assert {m.strip() for m in reply.headers["Allow"].split(",")} == allow, (method, path)
    # nothing happened
    assert api.ok("GET", INST)["state"] == "stopped"
    assert [a["name"] for a in api.ok("GET", "/v1/apps")["items"]] == ["web"]


def test_daemon_survives_garbage(api: Api) -> None:
    """Malformed HTTP is refused at the door; the daemon keeps answering."""
    port = int(api.b.url.rsplit(":", 1)[1])
    for raw in [
        b"GARBAGE\r\n\r\n",
        b"GET /v1/ping HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n",
        b"PUT /v1/apps/web HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{",
        b"\x00\x01\x02\x03",
    ]:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.settimeout(5)
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
            try:
                answer = s.recv(4096)
            except (ConnectionResetError, TimeoutError):
                answer = b""
            assert not answer.startswith(b"HTTP/1.1 5"), answer
    time.sleep(0.1)
    assert api.ok("GET", "/v1/ping") == {"ok": True}
    assert api.call("GET", "/v1/apps/web").status == 404


def test_patch_app_changes_what_is_named_and_keeps_the_rest(branchd: Branchd) -> None:
    body = {
        "env": {"A": "1", "B": "2"},
        "defaults": {"startsecs": 2, "cwd": "/srv"},
        "broker": "amqp://guest:guest@127.0.0.1:5672//",
        "celery_app": "shop.tasks",
        "autoscale": {"min": 1, "max": 4},
    }
    branchd.ok("PUT", "/v1/apps/shop", body, status=201)
    app = branchd.ok("PATCH", "/v1/apps/shop", {"env": {"A": None, "C": "3"}, "pool": "solo"})
    assert app["env"] == {"B": "2", "C": "3"}
    assert app["pool"] == "solo"
    assert app["celery_app"] == "shop.tasks"  # a PUT would have dropped these two
    assert app["broker"] == "amqp://guest:**@127.0.0.1:5672//"  # kept, never shown
    producer = branchd.ok("GET", "/v1/apps/shop/celery-config")["config"]
    assert producer["broker_url"] == body["broker"]  # (a producer needs the password)
    assert app["defaults"] == body["defaults"]
    app = branchd.ok("PATCH", "/v1/apps/shop", {"defaults": {"cwd": None, "startretries": 5.0}})
    assert app["defaults"] == {"startsecs": 2, "startretries": 5}
    assert isinstance(app["defaults"]["startretries"], int)
    # null resets a setting: no broker is the embedded one
    app = branchd.ok("PATCH", "/v1/apps/shop", {"broker": None, "autoscale": None})
    assert app["embedded_broker"] is True and app["autoscale"] is None
    assert branchd.ok("GET", "/v1/apps/shop") == app  # and it was stored
    # bad input names the rule and changes nothing
    for bad, where in [
        ({"pool": "nope"}, "pool"),
        ({"nope": 1}, "nope"),
        ({"defaults": {"startretries": 0}}, "startretries"),
        ({"autoscale": {"min": 5, "max": 2}}, "autoscale"),
    ]:
        reply = branchd.call("PATCH", "/v1/apps/shop", bad)
        assert reply.status == 422, (bad, reply.text)
        assert where in reply.body["error"]["message"], reply.text
    assert branchd.ok("GET", "/v1/apps/shop") == app
    assert branchd.call("PATCH", "/v1/apps/nope", {}).status == 404


def test_queue_names_take_what_celery_users_put_in_them(branchd: Branchd) -> None:
    body = {"celery_app": "shop.tasks", "broker": "amqp://guest:guest@127.0.0.1:5672//"}
    branchd.ok("PUT", "/v1/apps/shop", body, status=201)
    good = ["high:prio", "tasks.email", "q@host", "a-b_c", "x+y", "mail#1"]
    for name in good:
        path = "/v1/apps/shop/queues/" + urllib.parse.quote(name, safe="")
        assert branchd.call("PUT", path, {}).status == 201, name
    body = {"name": "w1", "kind": "celery", "queues": good[:2], "autostart": False}
    branchd.ok("POST", "/v1/apps/shop/instances", body, status=201)
    consumer = "/v1/apps/shop/instances/w1/queues/" + urllib.parse.quote("extra:1", safe="")
    items = branchd.ok("PUT", consumer)["items"]
    assert [i["name"] for i in items] == [*good[:2], "extra:1"]
    for bad in ["a b", "a,b", "wor*", "what?", ".hidden", "x" * 201, "é"]:
        path = "/v1/apps/shop/queues/" + urllib.parse.quote(bad, safe="")
        reply = branchd.call("PUT", path, {})
        assert reply.status == 422, (bad, reply.text)
        message = reply.body["error"]["message"]
        assert message.startswith(f"bad queue name {bad!r}: use 1-200 printable ASCII"), message
        reply = branchd.call("PATCH", "/v1/apps/shop/instances/w1", {"queues": [bad]})
        assert reply.status == 422 and "bad name" in reply.text, (bad, reply.text)
    # a slash cannot even reach the route as one segment
    assert branchd.call("PUT", "/v1/apps/shop/queues/a%2Fb", {}).status in (404, 422)


def test_the_embedded_broker_needs_plain_exchange_names(branchd: Branchd) -> None:
    # kombu's filesystem transport keeps each exchange in a file named after it
    # and refuses other names: say so when the queue is declared, not at the worker
    branchd.ok("PUT", "/v1/apps/shop", {"celery_app": "shop.tasks"}, status=201)
    reply = branchd.call("PUT", "/v1/apps/shop/queues/high%3Aprio", {})
    assert reply.status == 422, reply.text
    assert "embedded broker takes exchange names of letters" in reply.body["error"]["message"]
    assert "--exchange NAME" in reply.body["error"]["message"]
    body = {"name": "w1", "kind": "celery", "queues": ["high:prio"], "autostart": False}
    assert branchd.call("POST", "/v1/apps/shop/instances", body).status == 422
    # declared with a plain exchange, the same queue name is fine everywhere
    branchd.ok("PUT", "/v1/apps/shop/queues/high%3Aprio", {"exchange": "high_prio"}, status=201)
    branchd.ok("POST", "/v1/apps/shop/instances", body, status=201)
    items = branchd.ok("PUT", "/v1/apps/shop/instances/w1/queues/high%3Aprio")["items"]
    assert [i["name"] for i in items] == ["high:prio"]
    assert branchd.call("PUT", "/v1/apps/shop/instances/w1/queues/low%3Aprio").status == 422


def test_numbers_must_be_finite_and_integers_integral(branchd: Branchd) -> None:
    branchd.ok("PUT", "/v1/apps/web", {}, status=201)
    branchd.ok("PUT", "/v1/apps/shop", {"celery_app": "shop.tasks"}, status=201)
    # 1e400 is inf for Python's float: it must not pass, be stored, or be served
    for path, raw in [
        ("/v1/apps/shop/queues/q1", b'{"options": {"x-message-ttl": 1e400}}'),
        ("/v1/apps/web", b'{"defaults": {"startsecs": -1e999}}'),
    ]:
        reply = branchd.call("PUT", path, raw=raw)
        assert reply.status == 422, reply.text
        assert "must be finite" in reply.body["error"]["message"]
    assert branchd.call("GET", "/v1/apps/shop/queues/q1").status == 404
    # integers given as 2.0 become real integers, also in nullable and oneOf fields
    body = {
        "name": "w1",
        "kind": "celery",
        "concurrency": 2.0,
        "autostart": False,
        "startretries": 3.0,
    }
    inst = branchd.ok("POST", "/v1/apps/shop/instances", body, status=201)
    assert "--concurrency=2" in inst["command"] and inst["startretries"] == 3
    patched = branchd.ok(
        "PATCH", "/v1/apps/shop/instances/w1", {"autoscale": {"min": 1.0, "max": 4.0}}
    )
    assert patched["autoscale"] == {"min": 1, "max": 4}
    assert "--autoscale=4,1" in patched["command"]
    assert branchd.call("POST", "/v1/apps/shop/instances", {"concurrency": 2.5}).status == 422


def test_celery_fields_on_a_process_instance_are_refused(branchd: Branchd) -> None:
    branchd.ok("PUT", "/v1/apps/web", {"defaults": {"loglevel": "DEBUG"}}, status=201)
    body = {"name": "p1", "command": SLEEPER, "queues": ["a"], "pool": "solo"}
    reply = branchd.call("POST", "/v1/apps/web/instances", body)
    assert reply.status == 422, reply.text
    assert reply.body["error"]["message"].startswith("pool, queues: only for a celery instance")
    # an app's defaults for its celery instances do not stop a process instance
    branchd.ok("POST", "/v1/apps/web/instances", {"name": "p1", "command": SLEEPER}, status=201)
    reply = branchd.call("PATCH", "/v1/apps/web/instances/p1", {"concurrency": 2})
    assert reply.status == 422 and "only for a celery instance" in reply.text


def test_an_app_moved_to_the_embedded_broker_must_carry_its_queues(branchd: Branchd) -> None:
    amqp = {"celery_app": "shop.tasks", "broker": "amqp://guest:guest@127.0.0.1:5672//"}
    branchd.ok("PUT", "/v1/apps/shop", amqp, status=201)
    branchd.ok("PUT", "/v1/apps/shop/queues/hi%3Aprio", {}, status=201)
    reply = branchd.call("PATCH", "/v1/apps/shop", {"broker": None})
    assert reply.status == 422 and "queue 'hi:prio'" in reply.text, reply.text
    assert branchd.ok("GET", "/v1/apps/shop")["embedded_broker"] is False  # unchanged
    # nor may its defaults name such a queue for the workers it will start
    reply = branchd.call("PUT", "/v1/apps/web", {"defaults": {"queues": ["b:c"]}})
    assert reply.status == 422 and "queue 'b:c'" in reply.text, reply.text


def test_one_concurrency_setting_and_names_that_say_who_has_them(branchd: Branchd) -> None:
    branchd.ok("PUT", "/v1/apps/shop", {"celery_app": "shop.tasks"}, status=201)
    both = {"name": "w1", "kind": "celery", "concurrency": 2, "autoscale": {"min": 1, "max": 3}}
    reply = branchd.call("POST", "/v1/apps/shop/instances", both)
    assert reply.status == 422 and "give one" in reply.text, reply.text
    fixed = {"name": "w1", "kind": "celery", "concurrency": 2, "autostart": False}
    branchd.ok("POST", "/v1/apps/shop/instances", fixed, status=201)
    ranged = branchd.ok("PATCH", "/v1/apps/shop/instances/w1", {"autoscale": {"min": 2, "max": 4}})
    assert (ranged["concurrency"], ranged["autoscale"]) == (None, {"min": 2, "max": 4})
    again = branchd.ok("PATCH", "/v1/apps/shop/instances/w1", {"concurrency": 3})
    assert (again["concurrency"], again["autoscale"]) == (3, None)
    # instance names are unique across apps: the error says whose it is
    branchd.ok("PUT", "/v1/apps/web", {}, status=201)
    reply = branchd.call("POST", "/v1/apps/web/instances", {"name": "w1", "command": SLEEPER})
    assert reply.status == 409 and "taken by shop/w1" in reply.text, reply.text
    # no command and no celery module: both ways out are named
    reply = branchd.call("POST", "/v1/apps/web/instances", {"kind": "celery"})
    assert reply.status == 422, reply.text
    assert "a process instance needs a command" in reply.body["error"]["message"]
