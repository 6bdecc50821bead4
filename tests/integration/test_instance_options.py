"""Issue 15, parts 4 and 7, against one real daemon: env files read at each
start, a missing one failing the start (never the daemon), the umask in the
child, and an exit through the API that leaves the instances to the next
daemon (which adopts them: same pids)."""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from branchctl.cli import main
from click.testing import CliRunner, Result

from branchd.errors import SpawnError
from branchd.process.launcher import ENV_FILE_MAX, read_env_files
from tests.conftest import Branchd, _kill_leftovers, start_branchd, wait_for
from tests.integration.test_openapi import Validating

#: Writes the variables named in argv[2:] to the file argv[1] (as JSON), then sleeps.
SHOW_ENV = (
    "import json, os, sys, time\n"
    "names = sys.argv[2:]\n"
    "json.dump({n: os.environ.get(n) for n in names}, open(sys.argv[1] + '.tmp', 'w'))\n"
    "os.replace(sys.argv[1] + '.tmp', sys.argv[1])\n"
    "time.sleep(1e9)"
)
#: Creates the file argv[1], then sleeps.
TOUCH = "import sys, time\nopen(sys.argv[1], 'w').close()\ntime.sleep(1e9)"


class Daemon:
    """The module's daemon; the exit test replaces it with the next one."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.b = start_branchd(state_dir)

    def stop(self) -> None:
        if self.b.proc.poll() is None:
            self.b.proc.terminate()
            self.b.proc.wait(30)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("opts") / "state")
    try:
        assert d.b.call("PUT", "/v1/apps/web", {"env": {"A": "app", "B": "app"}}).status == 201
        yield d
    finally:
        d.stop()
        _kill_leftovers(d.state_dir)


def run(b: Branchd, *args: str) -> Result:
    env = {"BRANCHD_STATE_DIR": str(b.state_dir.parent / "no-such-state")}
    return CliRunner().invoke(
        main, ["--url", b.url, "--token", b.token or "", *args], env=env, catch_exceptions=False
    )


def _json_file(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def test_env_files_are_read_at_each_start_between_the_apps_env_and_the_instances(
    daemon: Daemon, tmp_path: Path
) -> None:
    b = daemon.b
    env_file, out = tmp_path / "api.env", tmp_path / "seen.json"
    env_file.write_text('# the service\nB=file\nexport C="from file"\nD=one\n')
    r = run(
        b, "instances", "add", "web", "--name", "envs", "--startsecs", "0",
        "--env", "C=inst", "--env-file", str(env_file), "--env-file", "-/no/such/file.env",
        "--startretries", "forever",
        "--", sys.executable, "-c", SHOW_ENV, str(out), "A", "B", "C", "D",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    inst = b.wait_state("web", "envs", "running")
    assert inst["env_file"] == [str(env_file), "-/no/such/file.env"]
    assert inst["startretries"] == "forever"
    seen = wait_for(lambda: _json_file(out))
    # app < env files < the instance's own; a "-" file that is missing is skipped
    assert seen == {"A": "app", "B": "file", "C": "inst", "D": "one"}
    first = inst["pid"]
    env_file.write_text("B=file\nD=two\n")  # an edit applies at the next start
    out.unlink()
    assert b.call("POST", "/v1/apps/web/instances/envs/restart").status == 200
    seen = wait_for(lambda: _json_file(out))
    assert seen == {"A": "app", "B": "file", "C": "inst", "D": "two"}
    assert b.wait_state("web", "envs", "running")["pid"] != first
    # 'instances set' is 'instances update' under supervisord's users' word
    r = run(b, "instances", "set", "web", "envs", "--startretries", "4", "--no-env-file")
    assert r.exit_code == 0, r.output
    inst = b.instance("web", "envs")
    assert (inst["startretries"], inst["env_file"]) == (4, [])


def test_a_missing_env_file_fails_the_start_with_the_reason_and_the_daemon_carries_on(
    daemon: Daemon, tmp_path: Path
) -> None:
    b = daemon.b
    env_file = tmp_path / "later.env"
    body = {
        "name": "noenv",
        "command": [sys.executable, "-c", "import time; time.sleep(1e9)"],
        "env_file": str(env_file),
        "startsecs": 0,
        "startretries": 1,
    }
    assert b.call("POST", "/v1/apps/web/instances", body).status == 201
    inst = b.wait_state("web", "noenv", "fatal")
    assert inst["pid"] is None
    assert inst["reason"] == (
        f"env file {str(env_file)!r} does not exist; gave up after 1 failed start(s)"
    )
    assert b.ok("GET", "/v1/ping") == {"ok": True}
    env_file.write_text("X=1\n")  # once it is there, a start reads it
    assert b.call("POST", "/v1/apps/web/instances/noenv/start").status == 200
    assert b.wait_state("web", "noenv", "running")["reason"] is None
    # a bad env_file is refused before anything is stored
    bad = b.call("POST", "/v1/apps/web/instances", {**body, "name": "rel", "env_file": "x.env"})
    assert bad.status == 422 and "absolute path" in bad.body["error"]["message"], bad.text
    assert b.call("GET", "/v1/apps/web/instances/rel").status == 404


def test_the_umask_is_the_childs(daemon: Daemon, tmp_path: Path) -> None:
    b = daemon.b
    made = tmp_path / "made"
    r = run(
        b, "instances", "add", "web", "--name", "masked", "--startsecs", "0", "--umask", "027",
        "--", sys.executable, "-c", TOUCH, str(made),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    inst = b.wait_state("web", "masked", "running")
    assert inst["umask"] == "027"
    wait_for(made.exists)
    assert stat.S_IMODE(made.stat().st_mode) == 0o640  # 0666 less 027
    status = Path(f"/proc/{inst['pid']}/status").read_text()
    assert "Umask:\t0027" in status
    # the daemon's own is untouched (it has ours, which it got at its start)
    ours = os.umask(0o022)
    os.umask(ours)
    assert f"Umask:\t{ours:04o}" in Path(f"/proc/{b.pid}/status").read_text()
    bad = b.call("PATCH", "/v1/apps/web/instances/masked", {"umask": "999"})
    assert bad.status == 422, bad.text


def test_daemon_status_then_an_exit_through_the_api_leaves_the_instances_to_the_next(
    daemon: Daemon,
) -> None:
    b = daemon.b
    r = run(b, "daemon", "status")
    assert r.exit_code == 0, r.output
    text = r.output
    assert re.search(rf"^pid +{b.pid}$", text, re.M), text
    assert re.search(rf"^state dir +{re.escape(str(daemon.state_dir))}$", text, re.M), text
    assert "process-group" in text and "none (a branch on its own)" in text, text
    r = run(b, "--json", "daemon", "status")
    status = json.loads(r.output)
    assert status["pid"] == b.pid and status["state_dir"] == str(daemon.state_dir)
    assert status["cluster"] is None and status["supervision"] == "process-group"
    views = b.ok("GET", "/v1/apps/web/instances")["items"]
    assert sum(status["instance_states"].values()) == len(views) >= 1
    running = {v["name"]: v["pid"] for v in views if v["state"] == "running"}
    assert running
    v = Validating(b, b.ok("GET", "/v1/openapi.json"))  # each answer as documented
    assert v.call("GET", "/v1/branch").body["instance_states"] == status["instance_states"]
    assert v.call("POST", "/v1/branch/exit?keep=maybe").status == 400
    assert v.call("POST", "/v1/branch/exit", {"keep": True}).status == 422  # (the query's)
    assert v.call("POST", "/v1/branch/exit?keep=1", token="wrong").status == 401
    reply = v.call("POST", "/v1/branch/exit?keep=1")
    assert (reply.status, reply.body) == (202, {"exiting": True, "keep": True})
    assert b.wait_exit() == 0
    assert all(psutil.pid_exists(pid) for pid in running.values())
    daemon.b = again = start_branchd(daemon.state_dir)
    for name, pid in running.items():
        assert again.wait_state("web", name, "running")["pid"] == pid  # adopted, not doubled


def test_read_env_files(tmp_path: Path) -> None:
    one, two = tmp_path / "one.env", tmp_path / "two.env"
    one.write_text("A=1\nB=1\n2BAD=x\n")
    two.write_text("B=2\n")
    env, warnings = read_env_files((str(one), f"-{tmp_path}/missing.env", str(two)))
    assert env == {"A": "1", "B": "2"}  # a later file wins
    assert warnings == [f"{one}:3: '2BAD' is not a variable name; skipped"]
    latin = tmp_path / "latin.env"
    latin.write_bytes(b"A=caf\xe9\n")
    big = tmp_path / "big.env"
    big.write_text("A=" + "x" * ENV_FILE_MAX + "\n")
    for paths, message in [
        ((str(tmp_path / "missing.env"),), "does not exist"),
        ((str(tmp_path),), "cannot read env file"),  # a directory
        ((str(latin),), "is not UTF-8 (byte 5)"),
        ((str(big),), "is larger than 1024 KiB"),
    ]:
        with pytest.raises(SpawnError, match=re.escape(message)):
            read_env_files(paths)
