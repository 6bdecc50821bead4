"""Supervision through a real daemon with real processes."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.conftest import SLEEPER, Branchd, wait_for

PY = sys.executable


def add(b: Branchd, name: str, command: list[str], app: str = "web", **fields: object) -> dict:
    b.call("PUT", f"/v1/apps/{app}", {})
    return b.ok(
        "POST",
        f"/v1/apps/{app}/instances",
        {"name": name, "command": command, **fields},
        status=201,
    )


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_crash_is_restarted_at_once(branchd: Branchd) -> None:
    add(branchd, "s", SLEEPER, startsecs=0.2, autorestart="always")
    first = branchd.wait_state("web", "s", "running")["pid"]
    os.kill(first, signal.SIGKILL)

    def restarted() -> dict | None:
        inst = branchd.instance("web", "s")
        return inst if inst["pid"] not in (None, first) else None

    inst = wait_for(restarted, 10)
    assert inst["restarts"] == 1
    assert inst["exit_code"] == -signal.SIGKILL
    assert alive(inst["pid"])


def test_crash_loop_ends_fatal(branchd: Branchd) -> None:
    inst = add(branchd, "bad", [PY, "-c", "raise SystemExit(3)"], startsecs=1, startretries=3)
    assert inst["state"] in ("starting", "backoff")
    inst = branchd.wait_state("web", "bad", "fatal", timeout=20)
    assert inst["exit_code"] == 3
    assert "3 failed start" in inst["reason"]
    assert inst["pid"] is None


def test_missing_executable_goes_fatal_with_reason(branchd: Branchd) -> None:
    add(branchd, "nope", ["/nonexistent/prog"], startretries=2)
    inst = branchd.wait_state("web", "nope", "fatal")
    assert "nonexistent" in inst["reason"]


GRANDCHILDREN = textwrap.dedent(
    """
    import os, sys, time
    for _ in range(3):
        if os.fork() == 0:
            if os.fork() == 0:
                time.sleep(1e9)
            time.sleep(1e9)
    print("forked", flush=True)
    time.sleep(1e9)
    """
)


def test_stop_leaves_no_grandchild(branchd: Branchd) -> None:
    add(branchd, "tree", [PY, "-c", GRANDCHILDREN], startsecs=0.3)
    inst = branchd.wait_state("web", "tree", "running")
    pid = inst["pid"]
    family = wait_for(
        lambda: (
            len(psutil.Process(pid).children(recursive=True)) >= 6
            and [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
        )
    )
    stats = branchd.ok("GET", "/v1/apps/web/instances/tree/stats")
    assert stats["processes"] == 7
    stopped = branchd.ok("POST", "/v1/apps/web/instances/tree/stop")
    assert stopped["state"] == "stopped" and stopped["stop_step"] == "signal"
    wait_for(lambda: not any(alive(p) for p in family), 5)


def test_stop_timeout_kills_with_sigkill(branchd: Branchd) -> None:
    stubborn = (
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\ntime.sleep(1e9)"
    )
    add(branchd, "stubborn", [PY, "-c", stubborn], startsecs=0.3, stopwaitsecs=0.5)
    pid = branchd.wait_state("web", "stubborn", "running")["pid"]
    logs = lambda: branchd.call("GET", "/v1/apps/web/instances/stubborn/logs").text  # noqa: E731
    wait_for(lambda: "ready" in logs())
    stopped = branchd.ok("POST", "/v1/apps/web/instances/stubborn/stop")
    assert stopped["state"] == "stopped"
    assert stopped["stop_step"] == "kill"
    assert stopped["exit_code"] == -signal.SIGKILL
    assert not alive(pid)


def test_exit_code_policy(branchd: Branchd) -> None:
    add(
        branchd,
        "once",
        [PY, "-c", "import time; time.sleep(0.5)"],
        startsecs=0.1,
        autorestart="on-failure",
    )
    inst = branchd.wait_state("web", "once", "exited")
    assert inst["exit_code"] == 0 and inst["restarts"] == 0


def test_env_and_cwd_reach_the_process(branchd: Branchd, tmp_path: Path) -> None:
    branchd.ok("PUT", "/v1/apps/envy", {"env": {"FOO": "bar", "BOTH": "app"}}, status=201)
    script = "import os; print(os.environ['FOO'], os.environ['BOTH'], os.getcwd(), flush=True)"
    branchd.ok(
        "POST",
        "/v1/apps/envy/instances",
        {
            "name": "e",
            "command": [PY, "-c", script],
            "env": {"BOTH": "inst"},
            "cwd": str(tmp_path),
            "startsecs": 0,
            "autorestart": "never",
        },
        status=201,
    )
    branchd.wait_state("envy", "e", "exited")
    text = branchd.call("GET", "/v1/apps/envy/instances/e/logs").text
    assert text.strip() == f"bar inst {tmp_path}"


def test_kill9_of_daemon_then_adoption(branchd_factory: Callable[..., Branchd]) -> None:
    first = branchd_factory()
    ticker = (
        "import time, itertools\nfor i in itertools.count():\n"
        "    print('tick', i, flush=True)\n    time.sleep(0.05)"
    )
    add(first, "ticker", [PY, "-c", ticker], startsecs=0.2)
    add(first, "idle", SLEEPER, autostart=False)
    pid = first.wait_state("web", "ticker", "running")["pid"]
    log_file = first.state_dir / "logs" / "web" / "ticker.stdout.log"
    wait_for(lambda: log_file.exists() and "tick 3" in log_file.read_text())

    first.signal(signal.SIGKILL)
    first.wait_exit()
    assert alive(pid)
    size = log_file.stat().st_size
    wait_for(lambda: log_file.stat().st_size > size)  # output lands with no daemon

    second = branchd_factory(state_dir=first.state_dir)
    inst = second.wait_state("web", "ticker", "running")
    assert inst["pid"] == pid
    assert inst["restarts"] == 0
    copies = [
        p
        for p in psutil.process_iter(["cmdline"])
        if p.info["cmdline"] and p.info["cmdline"][-1] == ticker
    ]
    assert [p.pid for p in copies] == [pid]
    assert second.instance("web", "idle")["state"] == "stopped"
    assert "tick" in second.call("GET", "/v1/apps/web/instances/ticker/logs?tail=5").text

    # an adopted process is still supervised: its death is noticed and it is restarted
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: second.instance("web", "ticker")["pid"] not in (None, pid))


def test_sigterm_stops_instances_and_sigusr2_keeps_them(
    branchd_factory: Callable[..., Branchd],
) -> None:
    b = branchd_factory()
    add(b, "s", SLEEPER, startsecs=0.1)
    pid = b.wait_state("web", "s", "running")["pid"]
    b.signal(signal.SIGUSR2)
    assert b.wait_exit() == 0
    assert alive(pid)

    b2 = branchd_factory(state_dir=b.state_dir)
    assert b2.wait_state("web", "s", "running")["pid"] == pid
    b2.signal(signal.SIGTERM)
    assert b2.wait_exit() == 0
    wait_for(lambda: not alive(pid))

    b3 = branchd_factory(state_dir=b.state_dir)  # desired running: started again
    inst = b3.wait_state("web", "s", "running")
    assert inst["pid"] != pid


def test_log_rotation_keeps_max_bytes_times_backups(
    branchd_factory: Callable[..., Branchd], tmp_path: Path
) -> None:
    conf = tmp_path / "branchd.toml"
    conf.write_text("log_check_interval = 0.3\n")
    b = branchd_factory("--config", str(conf))
    # 40 bursts of 50 kB, then silence: several rotations happen while it writes.
    chatty = (
        "import sys, time\n"
        "for i in range(40):\n"
        "    sys.stdout.write(('%05d' % i + 'x' * 94 + '\\n') * 500); sys.stdout.flush()\n"
        "    time.sleep(0.05)\n"
        "time.sleep(1e9)"
    )
    add(b, "chatty", [PY, "-c", chatty], startsecs=0.1, log_max_bytes=100_000, log_backups=2)
    log_dir = b.state_dir / "logs" / "web"
    current = log_dir / "chatty.stdout.log"

    def settled() -> bool:
        names = {f.name for f in log_dir.glob("chatty.stdout.log*")}
        return "chatty.stdout.log.2" in names and current.stat().st_size < 100_000

    wait_for(settled, 20)
    files = sorted(log_dir.glob("chatty.stdout.log*"))
    assert [f.name for f in files] == [
        "chatty.stdout.log",
        "chatty.stdout.log.1",
        "chatty.stdout.log.2",
    ]
    assert all(f.stat().st_size <= 100_000 for f in files)
    # the backups hold whole lines, newest data in .1
    lines = (log_dir / "chatty.stdout.log.1").read_text().splitlines()
    assert lines and all(len(line) == 99 for line in lines)


def test_second_daemon_on_same_state_dir_is_refused(branchd: Branchd) -> None:
    import subprocess

    out = subprocess.run(
        [PY, "-m", "branchd", "--state-dir", str(branchd.state_dir), "--bind", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0
    assert "already runs" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("bind", ["0.0.0.0:0"])
def test_non_loopback_bind_needs_a_token(tmp_path: Path, bind: str) -> None:
    import subprocess

    out = subprocess.run(
        [PY, "-m", "branchd", "--state-dir", str(tmp_path), "--bind", bind, "--no-auth"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "without a token" in out.stderr and "Traceback" not in out.stderr


def test_odd_user_is_a_failed_start_not_a_crash(branchd_factory: Callable[..., Branchd]) -> None:
    b = branchd_factory()
    b.call("PUT", "/v1/apps/web", {})
    reply = b.call(
        "POST",
        "/v1/apps/web/instances",
        {"name": "u", "command": SLEEPER, "user": "\u00b2", "startretries": 1},
    )
    assert reply.status == 201, reply.text
    inst = b.wait_state("web", "u", "fatal")
    assert "unknown user" in inst["reason"]
    # and a daemon restart on that state comes up fine
    b.signal(signal.SIGTERM)
    assert b.wait_exit() == 0
    again = branchd_factory(state_dir=b.state_dir)
    assert again.ok("GET", "/v1/ping") == {"ok": True}


def test_deeply_nested_json_is_a_400(branchd: Branchd) -> None:
    reply = branchd.call("PUT", "/v1/apps/web", raw=b"[" * 50000)
    assert reply.status == 400 and reply.body["error"]["code"] == "bad_request"


def test_concurrent_stop_and_delete_answer_cleanly(branchd: Branchd) -> None:
    import concurrent.futures

    stubborn = (
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\ntime.sleep(1e9)"
    )
    add(branchd, "s", [PY, "-c", stubborn], startsecs=0.2, stopwaitsecs=1)
    branchd.wait_state("web", "s", "running")
    wait_for(lambda: "ready" in branchd.call("GET", "/v1/apps/web/instances/s/logs").text)
    path = "/v1/apps/web/instances/s"
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        calls = [
            pool.submit(branchd.call, "POST", path + "/stop"),
            pool.submit(branchd.call, "DELETE", path),
            pool.submit(branchd.call, "DELETE", path),
        ]
        statuses = sorted(f.result().status for f in calls)
    assert all(s < 500 for s in statuses), statuses
    assert 204 in statuses
    assert branchd.call("GET", path).status == 404


def test_group_left_by_a_main_that_died_while_no_daemon_ran_is_reaped(
    branchd_factory: Callable[..., Branchd],
) -> None:
    b = branchd_factory()
    add(b, "tree", [PY, "-c", GRANDCHILDREN], startsecs=0.3)
    pid = b.wait_state("web", "tree", "running")["pid"]
    family = wait_for(
        lambda: (
            len(psutil.Process(pid).children(recursive=True)) >= 6
            and [c.pid for c in psutil.Process(pid).children(recursive=True)]
        )
    )
    b.signal(signal.SIGUSR2)  # exit, leaving the instance running
    assert b.wait_exit() == 0
    os.kill(pid, signal.SIGKILL)  # its main dies while no daemon runs
    wait_for(lambda: not alive(pid))
    assert any(alive(p) for p in family)

    again = branchd_factory(state_dir=b.state_dir)
    wait_for(lambda: not any(alive(p) for p in family), 10)  # no orphans, ever
    assert again.wait_state("web", "tree", "running")["pid"] != pid


#: Takes 1.5 s to stop on SIGTERM.
SLOW_STOP = [
    PY,
    "-c",
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: (time.sleep(1.5), sys.exit(0)))\n"
    "print('up', flush=True)\n"
    "time.sleep(1e9)",
]


def test_a_delete_under_way_ends_after_a_daemon_restart(
    branchd_factory: Callable[..., Branchd],
) -> None:
    b = branchd_factory()
    pid = add(b, "slow", SLOW_STOP, startsecs=0)["pid"]
    wait_for(lambda: "up" in b.call("GET", "/v1/apps/web/instances/slow/logs?tail=1").text)
    reply = b.call("DELETE", "/v1/apps/web/instances/slow?wait=false")
    assert reply.status == 202 and reply.body["desired"] == "removed", reply.text
    b.signal(signal.SIGUSR2)  # the daemon goes before the stop ended
    assert b.wait_exit() == 0
    again = branchd_factory(state_dir=b.state_dir)
    # the next daemon finishes it: stopped, then forgotten
    wait_for(lambda: again.call("GET", "/v1/apps/web/instances/slow").status == 404, 20)
    assert not alive(pid)
    assert again.ok("GET", "/v1/apps/web/instances")["items"] == []


def test_a_fatal_instance_stays_fatal_over_a_daemon_restart(
    branchd_factory: Callable[..., Branchd],
) -> None:
    b = branchd_factory()
    add(b, "bad", [PY, "-c", "raise SystemExit(3)"], startretries=1, startsecs=1)
    fatal = b.wait_state("web", "bad", "fatal")
    b.signal(signal.SIGTERM)
    assert b.wait_exit() == 0
    again = branchd_factory(state_dir=b.state_dir)
    inst = again.instance("web", "bad")
    # as the guide says: a fatal instance starts again only when a user starts it
    assert (inst["state"], inst["restarts"], inst["reason"]) == (
        "fatal",
        fatal["restarts"],
        fatal["reason"],
    )
    assert again.ok("POST", "/v1/apps/web/instances/bad/start")["state"] in ("starting", "backoff")


def test_an_app_delete_under_way_ends_after_a_daemon_restart(
    branchd_factory: Callable[..., Branchd],
) -> None:
    b = branchd_factory()
    pids = [add(b, name, SLOW_STOP, app="dx", startsecs=0)["pid"] for name in ("d1", "d2")]
    for name in ("d1", "d2"):
        wait_for(lambda n=name: "up" in b.call("GET", f"/v1/apps/dx/instances/{n}/logs").text)
    # an app's view makes no broker folders: polled during a delete, it brought
    # back those the delete had just removed
    b.ok("GET", "/v1/apps/dx")
    assert not (b.state_dir / "broker" / "apps" / "dx").exists()
    b.ok("GET", "/v1/apps/dx/celery-config")  # (this makes its embedded broker's folders)
    assert (b.state_dir / "broker" / "apps" / "dx").is_dir()
    reply = b.call("DELETE", "/v1/apps/dx?wait=false")
    assert reply.status == 202, reply.text
    # both stop at once (the delete lasts the longest stop, not their sum)
    assert {i["state"] for i in b.ok("GET", "/v1/apps/dx/instances")["items"]} == {"stopping"}
    b.signal(signal.SIGUSR2)  # the daemon goes in the middle of it
    assert b.wait_exit() == 0
    again = branchd_factory(state_dir=b.state_dir)
    wait_for(lambda: again.call("GET", "/v1/apps/dx").status == 404, 20)
    assert not any(alive(pid) for pid in pids)
    # its embedded broker went with it
    assert not (b.state_dir / "broker" / "apps" / "dx").exists()
