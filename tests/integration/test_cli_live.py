"""branchctl against a live daemon: the README's user flow, command by command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable

import psutil
from branchctl.cli import main
from click.testing import CliRunner, Result

from tests.conftest import Branchd, wait_for

SLEEP = [sys.executable, "-c", "import time; print('hello', flush=True); time.sleep(1e9)"]


def run(b: Branchd, *args: str, token: str | None = None) -> Result:
    """branchctl with the daemon's token (``token=""``: none at all)."""
    tok = b.token if token is None else token
    extra = ["--token", tok] if tok else []
    # (not this user's state dir: the token is the daemon's, given or none)
    env = {"BRANCHD_STATE_DIR": str(b.state_dir.parent / "no-such-state")}
    return CliRunner().invoke(
        main, ["--url", b.url, *extra, *args], env=env, catch_exceptions=False
    )


def test_the_readme_flow(branchd: Branchd) -> None:
    r = run(branchd, "apps", "add", "web", "--env", "FOO=bar")
    assert r.exit_code == 0, r.output
    r = run(
        branchd, "instances", "add", "web", "--name", "sleeper", "--startsecs", "0.2", "--", *SLEEP
    )
    assert r.exit_code == 0, r.output
    branchd.wait_state("web", "sleeper", "running")

    r = run(branchd, "instances")
    assert r.exit_code == 0
    header, row = r.output.splitlines()[:2]
    assert header.split() == ["APP", "NAME", "KIND", "STATE", "PID", "UPTIME", "RESTARTS"]
    assert row.split()[:4] == ["web", "sleeper", "process", "running"]

    r = run(branchd, "--json", "instances", "web")
    items = json.loads(r.output)["items"]
    assert [i["name"] for i in items] == ["sleeper"] and items[0]["env"] == {}
    pid = items[0]["pid"]

    r = run(branchd, "logs", "web", "sleeper", "-n", "50")
    assert r.exit_code == 0 and "hello" in r.output

    assert run(branchd, "instances", "stop", "web", "sleeper").exit_code == 0
    assert branchd.instance("web", "sleeper")["state"] == "stopped"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert run(branchd, "instances", "start", "web", "sleeper").exit_code == 0
    first = branchd.wait_state("web", "sleeper", "running")["pid"]
    assert run(branchd, "instances", "restart", "web", "sleeper").exit_code == 0
    second = branchd.wait_state("web", "sleeper", "running")["pid"]
    assert second != first

    r = run(branchd, "--json", "instances", "stats", "web", "sleeper")
    assert json.loads(r.output)["processes"] == 1

    assert run(branchd, "instances", "remove", "web", "sleeper").exit_code == 0
    r = run(branchd, "instances", "show", "web", "sleeper")
    assert r.exit_code == 1
    assert r.stderr.strip().startswith("branchctl: not_found")


def test_logs_follow_streams_new_lines(branchd: Branchd) -> None:
    ticker = (
        "import time, itertools\nfor i in itertools.count():\n"
        "    print('tick', i, flush=True)\n    time.sleep(0.1)"
    )
    run(branchd, "apps", "add", "web")
    run(
        branchd,
        "instances",
        "add",
        "web",
        "--name",
        "t",
        "--startsecs",
        "0",
        "--",
        sys.executable,
        "-c",
        ticker,
    )
    branchd.wait_state("web", "t", "running")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "branchctl",
            "--url",
            branchd.url,
            "logs",
            "web",
            "t",
            "-n",
            "1",
            "-f",
        ],
        stdout=subprocess.PIPE,
        text=True,
        # no --token: branchctl reads the daemon's token file in its state dir
        env={**os.environ, "BRANCHD_STATE_DIR": str(branchd.state_dir)},
    )
    try:
        assert proc.stdout is not None
        seen = [proc.stdout.readline() for _ in range(5)]
        numbers = [int(line.split()[1]) for line in seen]
        assert numbers == sorted(numbers) and len(set(numbers)) == 5
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(10) == 0
        finally:
            proc.kill()
            proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()


def test_errors_are_one_line_and_exit_codes(branchd: Branchd) -> None:
    r = run(branchd, "instances", "add", "nope", "--", "true")
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "not_found" in r.stderr
    r = run(branchd, "apps", "add", "bad/name")
    assert r.exit_code == 1 and "Traceback" not in r.output + r.stderr
    r = run(branchd, "instances", "add", "web", "--startsecs", "x", "--", "true")
    assert r.exit_code == 2
    r = run(branchd, "nonsense")
    assert r.exit_code == 2
    run(branchd, "apps", "add", "sv")
    r = run(branchd, "instances", "stop", "sv", "worker_*")
    assert r.exit_code == 1
    assert r.stderr.startswith("branchctl: invalid: bad instance name 'worker_*': use letters"), (
        r.stderr
    )


def test_token(branchd_factory: Callable[..., Branchd]) -> None:
    b = branchd_factory(token="s3cret")
    r = run(b, "apps", token="")
    assert r.exit_code == 1 and "unauthorized" in r.stderr
    r = run(b, "apps", token="s3cret")
    assert r.exit_code == 0


STUBBORN = [
    sys.executable,
    "-c",
    "import os, signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('up', os.getpid(), flush=True)\n"
    "time.sleep(1e9)",
]


def test_a_stop_longer_than_the_http_timeout_is_waited_for(branchd: Branchd) -> None:
    run(branchd, "apps", "add", "web")
    args = ["--name", "stub", "--startsecs", "0", "--stopwaitsecs", "2.5", "--", *STUBBORN]
    assert run(branchd, "instances", "add", "web", *args).exit_code == 0

    def ignoring_term() -> bool:
        pid = branchd.wait_state("web", "stub", "running")["pid"]
        return run(branchd, "logs", "web", "stub", "-n", "1").output == f"up {pid}\n"

    wait_for(ignoring_term)
    # the HTTP timeout (1 s) is shorter than the stop (2.5 s, then SIGKILL)
    r = run(branchd, "--timeout", "1", "instances", "stop", "web", "stub")
    assert r.exit_code == 0, r.output
    assert r.stdout == "web/stub: stopped\n"
    assert "stopping (pid" in r.stderr and "up to 2.5s" in r.stderr
    assert branchd.instance("web", "stub")["stop_step"] == "kill"
    # a restart that cannot come up exits 1, and says why
    r = run(branchd, "instances", "update", "web", "stub", "--", sys.executable, "-c", "exit(3)")
    assert r.exit_code == 0, r.output
    r = run(branchd, "instances", "update", "web", "stub", "--startsecs", "1")
    assert r.exit_code == 0, r.output  # so that exit(3) is a failed start
    r = run(branchd, "instances", "restart", "web", "stub")
    assert r.exit_code == 1, r.output
    assert r.stderr.splitlines()[-1].startswith("branchctl: not_started: web/stub is backoff"), (
        r.stderr
    )
    r = run(branchd, "--timeout", "1", "instances", "remove", "web", "stub")
    assert (r.exit_code, r.stdout) == (0, "removed instance web/stub\n"), r.output


def test_finds_a_daemon_on_port_0_by_its_state_dir(branchd: Branchd) -> None:
    # The fixture's daemon listens on port 0; no --url, no BRANCHD_URL.
    env = {"BRANCHD_URL": None, "BRANCHD_STATE_DIR": str(branchd.state_dir)}
    r = CliRunner().invoke(main, ["--json", "branch"], env=env, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["id"] == branchd.ok("GET", "/v1/branch")["id"]


def test_daemon_down_is_a_clear_error() -> None:
    r = CliRunner().invoke(main, ["--url", "http://127.0.0.1:9", "apps"])
    assert r.exit_code == 1
    assert "127.0.0.1:9" in r.stderr and "Traceback" not in r.stderr


def test_help_everywhere() -> None:
    for args in (
        ["--help"],
        ["instances", "--help"],
        ["instances", "add", "--help"],
        ["logs", "--help"],
        ["apps", "add", "--help"],
        ["queues", "--help"],
        ["consumers", "--help"],
        ["autoscale", "--help"],
        ["stats", "--help"],
    ):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0 and "Usage" in r.output, args


def test_daemon_exit_keep_then_a_new_daemon_adopts(
    branchd_factory: Callable[..., Branchd],
) -> None:
    b = branchd_factory()
    assert run(b, "apps", "add", "web").exit_code == 0
    r = run(b, "instances", "add", "web", "--name", "s", "--startsecs", "0", "--", *SLEEP)
    assert r.exit_code == 0, r.output
    pid = b.wait_state("web", "s", "running")["pid"]
    r = run(b, "daemon", "exit", "--keep")
    assert r.exit_code == 0, r.output
    assert "instances keep running" in r.output
    assert b.wait_exit() == 0  # not a failure, for systemd's Restart= too
    assert psutil.pid_exists(pid)
    again = branchd_factory(state_dir=b.state_dir)
    inst = again.wait_state("web", "s", "running")
    assert inst["pid"] == pid  # adopted, not started twice
    # without --keep, the instances are stopped first
    assert run(again, "daemon", "exit").exit_code == 0
    assert again.wait_exit() == 0
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie")


#: Takes 2 s to stop on SIGTERM.
SLOW_STOP = [
    sys.executable,
    "-c",
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: (time.sleep(2), sys.exit(0)))\n"
    "print('up', flush=True)\n"
    "time.sleep(1e9)",
]


def _slow(b: Branchd, name: str) -> None:
    """An instance of SLOW_STOP that has set up its TERM handler."""
    r = run(b, "instances", "add", "slow", "--name", name, "--startsecs", "0", "--", *SLOW_STOP)
    assert r.exit_code == 0, r.output
    b.wait_state("slow", name, "running")
    wait_for(lambda: "up" in b.call("GET", f"/v1/apps/slow/instances/{name}/logs").text)


def test_apps_remove_waits_for_slow_stops_past_the_timeout(branchd: Branchd) -> None:
    assert run(branchd, "apps", "add", "slow").exit_code == 0
    _slow(branchd, "s1")
    r = run(branchd, "--timeout", "1", "apps", "remove", "slow")
    assert r.exit_code == 0, r.output
    assert "removed app 'slow'" in r.stdout
    assert "slow: removing, 1 instance(s) left" in r.stderr  # it waited for the stop
    assert branchd.call("GET", "/v1/apps/slow").status == 404
    # --no-wait answers at once; the API says 202 with the app
    assert run(branchd, "apps", "add", "slow").exit_code == 0
    _slow(branchd, "s2")
    reply = branchd.call("DELETE", "/v1/apps/slow?wait=false")
    assert reply.status == 202 and reply.body["name"] == "slow", reply.text
    assert branchd.instance("slow", "s2")["desired"] == "removed"
    wait_for(lambda: branchd.call("GET", "/v1/apps/slow").status == 404, 20)


def test_apps_set_says_running_instances_keep_their_start_settings(branchd: Branchd) -> None:
    run(branchd, "apps", "add", "web")
    r = run(branchd, "apps", "set", "web", "--env", "A=1")
    assert r.exit_code == 0 and "restart" not in r.stderr  # nothing runs yet
    run(branchd, "instances", "add", "web", "--name", "s1", "--startsecs", "0", "--", *SLEEP)
    branchd.wait_state("web", "s1", "running")
    r = run(branchd, "apps", "set", "web", "--env", "A=2")
    assert r.exit_code == 0, r.output
    assert r.stderr.strip() == (
        "branchctl: 1 running instance(s) of app 'web' keep the settings they started with "
        "until they restart (branchctl apps restart web)"
    )
    # what a running worker takes at once says nothing
    r = run(branchd, "apps", "set", "web", "--autoscale", "1,2")
    assert r.exit_code == 0 and r.stderr == "", r.stderr


def test_instances_set_reset_puts_fields_back_to_their_default(branchd: Branchd) -> None:
    """Issue 16's trial: an instance override could not be removed from the CLI."""
    app = ["shop", "--celery-app", "tests.celery_app.tasks"]
    assert run(branchd, "apps", "add", *app, "--default", "loglevel=DEBUG").exit_code == 0
    r = run(
        branchd,
        *("instances", "add", "shop", "--name", "w1", "--no-autostart", "--pool", "gevent"),
        *("--time-limit", "30", "--task-time-limit", "shop.tasks.encode=90"),
        *("--startsecs", "5", "--loglevel", "ERROR"),
    )
    assert r.exit_code == 0, r.output
    r = run(branchd, "--json", "instances", "set", "shop", "w1", "--reset", "pool",
            "--reset", "time_limit", "--reset", "task_overrides", "--reset", "startsecs",
            "--reset", "loglevel")  # fmt: skip
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    # pool and the limits: the app's (read at each start); the others: the
    # app's instance default, else the kind's
    assert (got["pool"], got["time_limit"], got["task_overrides"]) == (None, None, {})
    assert (got["startsecs"], got["loglevel"]) == (30.0, "DEBUG")

    r = run(branchd, "instances", "set", "shop", "w1", "--reset", "pool", "--pool", "solo")
    assert r.exit_code == 2 and "--reset pool and a new value" in r.output
    r = run(branchd, "instances", "set", "shop", "w1", "--reset", "nope")
    assert r.exit_code == 2 and "'nope' is not one of" in r.output
    # the API's one field without a default
    reply = branchd.call("PATCH", "/v1/apps/shop/instances/w1", {"command": None})
    assert reply.status == 422 and "command cannot be reset" in reply.text


def test_apps_autoscale_warns_of_a_queue_no_worker_consumes(branchd: Branchd) -> None:
    """Issue 16's trial: a typo in --on-depth was taken silently. A warning,
    not a refusal: a policy may be declared before its queue and workers."""
    run(branchd, "apps", "add", "shop", "--celery-app", "tests.celery_app.tasks")
    add = ("instances", "add", "shop", "--name", "w1", "--queues", "default", "--no-autostart")
    assert run(branchd, *add).exit_code == 0
    assert run(branchd, "queues", "add", "shop", "images").exit_code == 0
    policy = ("--per-worker", "20", "--min", "1", "--max", "2")
    r = run(branchd, "apps", "autoscale", "shop", "--on-depth", "nope", *policy)
    assert r.exit_code == 0, r.output
    assert r.stderr.strip() == (
        "branchctl: warning: app 'shop' has no queue 'nope': not declared and no instance "
        "consumes it (its queues: default, images); the policy scales nothing until a "
        "worker does (branchctl instances add shop --queues nope, or fix the name)"
    )
    assert run(branchd, "apps", "autoscale", "shop").stderr != ""  # (said again when shown)
    for queue in ("default", "images", "celery"):  # consumed, declared, Celery's default
        r = run(branchd, "apps", "autoscale", "shop", "--on-depth", queue, *policy)
        assert r.exit_code == 0 and r.stderr == "", (queue, r.stderr)
