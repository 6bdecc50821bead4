"""An app's instances together, on one real daemon for the module: a count
create (all or nothing), start and stop of every instance, and a rolling
restart that never has more instances down than its batch."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from branchctl.cli import main
from click.testing import CliRunner, Result

from tests.conftest import (
    SLEEPER,
    Branchd,
    Reply,
    start_branchd,
    stop_branchd,
    wait_for,
)

FAST = {"command": SLEEPER, "startsecs": 0, "stopwaitsecs": 5}


@pytest.fixture(scope="module")
def b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Branchd]:
    daemon = start_branchd(tmp_path_factory.mktemp("actions") / "state")
    try:
        yield daemon
    finally:
        stop_branchd(daemon)


def _app(b: Branchd, name: str) -> str:
    b.ok("PUT", f"/v1/apps/{name}", {}, status=201)
    return f"/v1/apps/{name}"


def _names(b: Branchd, app: str) -> list[str]:
    return [i["name"] for i in b.ok("GET", f"{app}/instances")["items"]]


def test_a_count_create_makes_them_all_from_one_template(b: Branchd) -> None:
    app = _app(b, "nums")
    body = {**FAST, "count": 3, "name": "worker_{n:02d}", "start_at": 1, "env": {"A": "1"}}
    reply = b.call("POST", f"{app}/instances", body)
    assert reply.status == 201, reply.text
    made = reply.body["items"]
    assert [i["name"] for i in made] == ["worker_01", "worker_02", "worker_03"]
    assert {i["state"] for i in made} <= {"starting", "running"}
    assert all(i["env"] == {"A": "1"} and i["command"] == SLEEPER for i in made)
    for name in ("worker_01", "worker_03"):
        b.wait_state("nums", name, "running")
    # the single create is as it was: one instance, not a list
    one = b.call("POST", f"{app}/instances", {**FAST, "name": "solo"})
    assert one.status == 201 and one.body["name"] == "solo"


@pytest.mark.parametrize(
    ("body", "status", "rule"),
    [
        ({"count": 2, "name": "dup"}, 422, "name template"),  # no {n}: all the same name
        ({"count": 2, "name": "w{n.real}"}, 422, "name template"),
        ({"count": 2, "name": "bad/{n}"}, 422, "a bad name"),
        ({"count": 5000, "name": "w{n}"}, 422, "count"),
        ({"count": 3, "name": "taken_{n}"}, 409, "taken_1"),  # one of the three is taken
        ({"count": 2, "name": "w{n}", "command": []}, 422, "command"),
        ({"count": 2, "name": "w{n}", "startsecs": -1}, 422, "startsecs"),
        ({"count": 2, "name": "w{n}", "nope": 1}, 422, "nope"),
    ],
)
def test_a_bad_count_create_names_its_rule_and_creates_nothing(
    b: Branchd, body: dict[str, Any], status: int, rule: str
) -> None:
    app = "/v1/apps/strict"
    if b.call("GET", app).status == 404:
        _app(b, "strict")
        b.ok("POST", f"{app}/instances", {**FAST, "name": "taken_1"}, status=201)
    before = _names(b, app)
    reply = b.call("POST", f"{app}/instances", {**FAST, **body})
    assert reply.status == status, reply.text
    assert rule in reply.body["error"]["message"]
    assert _names(b, app) == before


def test_start_and_stop_of_every_instance_of_an_app(b: Branchd) -> None:
    app = _app(b, "group")
    b.ok("POST", f"{app}/instances", {**FAST, "count": 4, "name": "g{n}"}, status=201)
    stopped = b.ok("POST", f"{app}/stop")["items"]
    assert [(i["name"], i["outcome"], i["instance"]["state"]) for i in stopped] == [
        (f"g{n}", "stopped", "stopped") for n in range(4)
    ]
    started = b.ok("POST", f"{app}/start")["items"]
    assert [(i["outcome"], i["instance"]["state"]) for i in started] == [("running", "running")] * 4
    assert all(i["error"] is None and i["instance"]["pid"] for i in started)
    # which failed and why: one that cannot start says so, the others run
    b.ok("PATCH", f"{app}/instances/g2", {"command": ["/nonexistent/prog"], "startretries": 1})
    b.ok("POST", f"{app}/stop")
    again = {i["name"]: i for i in b.ok("POST", f"{app}/start")["items"]}
    assert again["g2"]["outcome"] == "failed"
    assert "nonexistent" in again["g2"]["error"], again["g2"]
    assert [again[f"g{n}"]["outcome"] for n in (0, 1, 3)] == ["running"] * 3
    assert b.call("POST", "/v1/apps/nope/start").status == 404
    assert b.call("POST", f"{app}/stop?rolling=1").status == 422
    assert b.call("POST", f"{app}/restart?batch=2").status == 422  # batch needs rolling
    assert b.call("POST", f"{app}/restart?rolling=1&batch=x").status == 400


def test_a_rolling_restart_of_ten_in_batches_of_two_never_has_more_than_two_down(
    b: Branchd,
) -> None:
    app = _app(b, "roll")
    # startsecs: each batch stays down a while, so the polls below see every step
    body = {**FAST, "startsecs": 0.3, "count": 10, "name": "r{n}"}
    b.ok("POST", f"{app}/instances", body, status=201)
    wait_for(lambda: all(i["state"] == "running" for i in _items(b, app)), timeout=15)
    before = {i["name"]: i["pid"] for i in _items(b, app)}
    answer: list[Reply] = []
    roll = threading.Thread(
        target=lambda: answer.append(b.call("POST", f"{app}/restart?rolling=1&batch=2"))
    )
    roll.start()
    most_down = 0
    while roll.is_alive():
        down = [i["name"] for i in _items(b, app) if i["state"] != "running"]
        most_down = max(most_down, len(down))
    roll.join()
    assert answer[0].status == 200, answer[0].text
    items = answer[0].body["items"]
    assert [i["outcome"] for i in items] == ["running"] * 10
    after = {i["name"]: i["instance"]["pid"] for i in items}
    assert all(after[n] != before[n] for n in before)  # every one was restarted
    assert most_down == 2  # (seen: the polls caught a batch; never more)


def test_a_rolling_restart_stops_at_a_batch_that_does_not_run_again(b: Branchd) -> None:
    app = _app(b, "halt")
    b.ok("POST", f"{app}/instances", {**FAST, "count": 4, "name": "h{n}"}, status=201)
    wait_for(lambda: all(i["state"] == "running" for i in _items(b, app)), timeout=15)
    before = {i["name"]: i["pid"] for i in _items(b, app)}
    # h1's next start fails (its new command cannot run): the roll must stop there
    b.ok("PATCH", f"{app}/instances/h1", {"command": ["/nonexistent/prog"], "startretries": 1})
    items = b.ok("POST", f"{app}/restart?rolling=1&batch=1")["items"]
    got = {i["name"]: i for i in items}
    assert [got[n]["outcome"] for n in ("h0", "h1", "h2", "h3")] == [
        "running", "failed", "skipped", "skipped"
    ]
    assert "nonexistent" in got["h1"]["error"]
    assert "stopped at batch 2" in got["h2"]["error"]
    assert got["h0"]["instance"]["pid"] != before["h0"]
    # the rest keep their old process, running
    assert [(got[n]["instance"]["state"], got[n]["instance"]["pid"]) for n in ("h2", "h3")] == [
        ("running", before["h2"]),
        ("running", before["h3"]),
    ]


def _items(b: Branchd, app: str) -> list[dict[str, Any]]:
    return b.ok("GET", f"{app}/instances")["items"]  # type: ignore[no-any-return]


def _cli(b: Branchd, *args: str) -> Result:
    env = {"BRANCHD_STATE_DIR": str(b.state_dir.parent / "no-such-state")}
    argv = ["--url", b.url, "--token", b.token or "", *args]
    return CliRunner().invoke(main, argv, env=env, catch_exceptions=False)


def test_branchctl_count_create_and_app_actions(b: Branchd) -> None:
    assert _cli(b, "apps", "add", "cli").exit_code == 0
    r = _cli(b, "instances", "add", "cli", "--count", "3", "--name", "k_{n:02d}",
             "--start-at", "1", "--startsecs", "0", "--", *SLEEPER)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert [line.split()[1] for line in r.stdout.splitlines()[1:]] == ["k_01", "k_02", "k_03"]
    r = _cli(b, "instances", "add", "cli", "--count", "2", "--name", "k_0{n}", "--", *SLEEPER)
    assert r.exit_code == 1 and r.stderr.startswith("branchctl: conflict: ") and "k_01" in r.stderr
    assert len(r.stderr.splitlines()) == 1
    r = _cli(b, "apps", "restart", "cli", "--rolling", "--batch", "1")
    assert r.exit_code == 0, (r.stdout, r.stderr)
    assert [line.split(":")[1].strip().split()[0] for line in r.stdout.splitlines()] == [
        "running"
    ] * 3
    assert "3 instance(s), 1 at a time" in r.stderr
    r = _cli(b, "apps", "stop", "cli")
    assert r.exit_code == 0 and r.stdout.count(": stopped") == 3
    b.ok("PATCH", "/v1/apps/cli/instances/k_02", {"command": ["/nonexistent/x"], "startretries": 1})
    r = _cli(b, "apps", "start", "cli")
    assert r.exit_code == 1
    assert "cli/k_02: failed:" in r.stdout and "not_started: 1 of 3" in r.stderr
    assert _cli(b, "apps", "stop", "cli", "--batch", "2").exit_code == 2  # (no such option)
    assert _cli(b, "apps", "start", "cli", "--batch", "2").exit_code == 2  # needs --rolling
