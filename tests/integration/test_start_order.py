"""Issue 15, part 3, against one real daemon: ``after`` (a dependent starts
only once what it starts after is ready; one that never is makes it fail with
the reason), readiness probes (tcp, http, exec, sd_notify) and a liveness
probe that restarts a process that is up but no longer healthy.

Every wait on a child is on a file the test creates (never on time), but
the slow dependency of the issue's proof, which binds after 2 s.
"""

from __future__ import annotations

import shlex
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from branchctl.cli import main
from click.testing import CliRunner, Result

from tests.conftest import Branchd, _kill_leftovers, start_branchd, wait_for

PY = sys.executable

#: Binds 127.0.0.1:argv[1] after argv[2] seconds, writes the time it bound
#: (before it listens: no connect can succeed earlier) to argv[3], then serves.
SLOW_TCP = (
    "import os, socket, sys, time\n"
    "time.sleep(float(sys.argv[2]))\n"
    "s = socket.socket()\n"
    "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('127.0.0.1', int(sys.argv[1])))\n"
    "open(sys.argv[3] + '.tmp', 'w').write(repr(time.time()))\n"
    "os.replace(sys.argv[3] + '.tmp', sys.argv[3])\n"
    "s.listen()\n"
    "while True:\n"
    "    s.accept()[0].close()\n"
)
#: Writes the time it started to argv[1], then sleeps.
STAMP = (
    "import os, sys, time\n"
    "open(sys.argv[1] + '.tmp', 'w').write(repr(time.time()))\n"
    "os.replace(sys.argv[1] + '.tmp', sys.argv[1])\n"
    "time.sleep(1e9)\n"
)
#: An HTTP server on 127.0.0.1:argv[1]: /health answers 200 while the file
#: argv[2] exists, else 503.
HEALTH = (
    "import http.server, os, sys\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        self.send_response(200 if os.path.exists(sys.argv[2]) else 503)\n"
    "        self.end_headers()\n"
    "    def log_message(self, *a):\n"
    "        pass\n"
    "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n"
)
#: sd_notify: STATUS=loading, then READY=1 once the file argv[1] exists.
NOTIFY = (
    "import os, socket, sys, time\n"
    "addr = os.environ['NOTIFY_SOCKET']\n"
    "addr = '\\0' + addr[1:] if addr.startswith('@') else addr\n"
    "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
    "s.sendto(b'STATUS=loading', addr)\n"
    "while not os.path.exists(sys.argv[1]):\n"
    "    time.sleep(0.02)\n"
    "s.sendto(b'READY=1\\nSTATUS=serving', addr)\n"
    "time.sleep(1e9)\n"
)
SLEEP = "import time; time.sleep(1e9)"


@pytest.fixture(scope="module")
def b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Branchd]:
    state = tmp_path_factory.mktemp("order") / "state"
    d = start_branchd(state)
    try:
        assert d.call("PUT", "/v1/apps/web", {}).status == 201
        yield d
    finally:
        if d.proc.poll() is None:
            d.proc.terminate()
            d.proc.wait(30)
        _kill_leftovers(state)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(b: Branchd, *args: str) -> Result:
    env = {"BRANCHD_STATE_DIR": str(b.state_dir.parent / "no-such-state")}
    return CliRunner().invoke(
        main, ["--url", b.url, "--token", b.token or "", *args], env=env, catch_exceptions=False
    )


def add(b: Branchd, body: dict[str, Any], status: int = 201) -> dict[str, Any]:
    return b.ok("POST", "/v1/apps/web/instances", body, status)  # type: ignore[no-any-return]


def seen(b: Branchd, name: str, state: str, reason: str) -> dict[str, Any]:
    """Wait until instance ``name`` is in ``state`` with ``reason`` (exactly)."""

    def check() -> dict[str, Any] | None:
        i = b.instance("web", name)
        return i if (i["state"], i["reason"]) == (state, reason) else None

    return wait_for(check, 10.0)  # type: ignore[no-any-return]


def test_a_dependent_starts_only_once_a_slow_dependency_is_ready(
    b: Branchd, tmp_path: Path
) -> None:
    port, bound, started = free_port(), tmp_path / "bound", tmp_path / "started"
    r = run(
        b,
        *("instances", "add", "web", "--name", "db", "--ready", f"tcp:127.0.0.1:{port}"),
        *("--", PY, "-c", SLOW_TCP, str(port), "2", str(bound)),
    )
    assert r.exit_code == 0, r.output
    assert b.instance("web", "db")["ready"] == f"tcp:127.0.0.1:{port}"
    r = run(
        b,
        *("instances", "add", "web", "--name", "api", "--after", "db", "--startsecs", "0"),
        *("--", PY, "-c", STAMP, str(started)),
    )
    assert r.exit_code == 0, r.output
    why = f"waiting for db (not ready: tcp 127.0.0.1:{port} refused)"
    api = seen(b, "api", "waiting", why)  # it says why it waits, and has no process
    assert api["pid"] is None and api["after"] == ["db"]
    assert b.instance("web", "db")["reason"] == f"not ready: tcp 127.0.0.1:{port} refused"
    b.wait_state("web", "db", "running")
    api = b.wait_state("web", "api", "running")
    assert api["reason"] is None and api["restarts"] == 0
    wait_for(started.exists)
    # its process began only after the dependency could be connected to
    assert float(started.read_text()) >= float(bound.read_text())


def test_a_dependency_never_ready_makes_the_dependent_fail_with_the_reason(b: Branchd) -> None:
    port = free_port()  # (nothing ever binds it)
    add(b, {"name": "db2", "command": [PY, "-c", SLEEP], "ready": f"tcp:127.0.0.1:{port}"})
    add(
        b,
        {
            "name": "api2",
            "command": [PY, "-c", SLEEP],
            "after": ["db2"],
            "after_timeout": 1.0,
            "startretries": 1,
        },
    )
    api = b.wait_state("web", "api2", "fatal")
    assert api["reason"] == (
        f"waiting for db2 (not ready: tcp 127.0.0.1:{port} refused); gave up waiting after 1s"
        "; gave up after 1 failed start(s)"
    )
    assert api["pid"] is None and api["restarts"] == 0  # never spawned
    assert b.instance("web", "db2")["state"] == "starting"  # still trying, within 60 s


def test_after_refuses_an_unknown_name_itself_and_a_cycle(b: Branchd) -> None:
    for name in ("o1", "o2"):
        add(b, {"name": name, "command": [PY, "-c", SLEEP], "autostart": False})
    r = b.call("POST", "/v1/apps/web/instances", {"name": "o3", "command": ["x"], "after": ["x"]})
    assert r.status == 422, r.text
    assert "after: no instance 'x' in app 'web'" in r.body["error"]["message"]
    r = b.call("PATCH", "/v1/apps/web/instances/o1", {"after": ["o1"]})
    assert r.status == 422 and "cannot start after itself" in r.body["error"]["message"]
    assert b.ok("PATCH", "/v1/apps/web/instances/o1", {"after": ["o2"]})["after"] == ["o2"]
    r = b.call("PATCH", "/v1/apps/web/instances/o2", {"after": ["o1"]})
    assert r.status == 422, r.text
    assert r.body["error"]["message"] == (
        "after: a cycle (o2 -> o1 -> o2): start order cannot loop"
    )
    assert b.instance("web", "o2")["after"] == []  # nothing changed
    r = b.call("PATCH", "/v1/apps/web/instances/o2", {"ready": "udp:1.2.3.4:5"})
    assert r.status == 422 and r.body["error"]["message"].startswith("ready: bad probe")
    r = b.call("PATCH", "/v1/apps/web/instances/o2", {"live": "notify"})
    assert r.status == 422 and r.body["error"]["message"].startswith("live: notify")


def test_notify_ready_1_makes_it_running_and_its_status_is_shown(
    b: Branchd, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    add(b, {"name": "ntf", "command": [PY, "-c", NOTIFY, str(go)], "ready": "notify"})
    i = seen(b, "ntf", "starting", "not ready: no READY=1 yet (status: loading)")
    assert i["pid"] is not None
    go.touch()
    assert b.wait_state("web", "ntf", "running")["reason"] is None


def test_http_and_exec_readiness_probes(b: Branchd, tmp_path: Path) -> None:
    port, ok, flag = free_port(), tmp_path / "ok", tmp_path / "flag"
    url = f"http://127.0.0.1:{port}/health"
    add(b, {"name": "web1", "command": [PY, "-c", HEALTH, str(port), str(ok)], "ready": url})
    seen(b, "web1", "starting", f"not ready: {url} answered 503")
    ok.touch()
    b.wait_state("web", "web1", "running")
    check = [PY, "-c", f"import os, sys; sys.exit(0 if os.path.exists({str(flag)!r}) else 3)"]
    add(b, {"name": "ex1", "command": [PY, "-c", SLEEP], "ready": {"exec": check}})
    i = seen(b, "ex1", "starting", f"not ready: exec {shlex.join(check)} exited with code 3")
    assert i["ready"].startswith("exec:")
    flag.touch()
    b.wait_state("web", "ex1", "running")


def test_a_liveness_failure_restarts_it_with_the_reason(b: Branchd, tmp_path: Path) -> None:
    port, alive = free_port(), tmp_path / "alive"
    url = f"http://127.0.0.1:{port}/health"
    alive.touch()
    add(
        b,
        {
            "name": "lv",
            "command": [PY, "-c", HEALTH, str(port), str(alive)],
            "startsecs": 0.2,
            "live": url,
            "live_period": 0.2,
            "live_failures": 2,
        },
    )
    first = b.wait_state("web", "lv", "running")
    # (the next start is slow to run: the reason of the restart shows meanwhile)
    b.ok("PATCH", "/v1/apps/web/instances/lv", {"startsecs": 5})
    alive.unlink()

    def restarted() -> dict[str, Any] | None:
        i = b.instance("web", "lv")
        return i if i["restarts"] >= 1 and i["state"] == "starting" else None

    i = wait_for(restarted, 10.0)
    assert i["reason"] == f"liveness probe failed 2 time(s) in a row: {url} answered 503"
    assert i["pid"] != first["pid"]


def test_a_daemon_upgrade_adopts_a_starting_notify_instance_and_hears_it(
    b: Branchd, tmp_path: Path
) -> None:
    # (last in the module: its daemon hands over to the next one)
    go = tmp_path / "go"
    add(b, {"name": "ntf2", "command": [PY, "-c", NOTIFY, str(go)], "ready": "notify"})
    pid = seen(b, "ntf2", "starting", "not ready: no READY=1 yet (status: loading)")["pid"]
    assert b.call("POST", "/v1/branch/exit?keep=1").status == 202
    b.wait_exit()
    nxt = start_branchd(b.state_dir)
    try:
        i = nxt.instance("web", "ntf2")
        assert (i["state"], i["pid"]) == ("starting", pid)  # adopted, still to be ready
        go.touch()  # its READY=1 goes to the same $NOTIFY_SOCKET, bound again
        assert nxt.wait_state("web", "ntf2", "running")["pid"] == pid
    finally:
        nxt.proc.terminate()
        nxt.proc.wait(30)
