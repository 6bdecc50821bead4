"""GET /v1/events and GET /metrics on a real daemon (issue 17, parts 1 and 2):
a kill -9 is on the stream, a resume by Last-Event-ID loses nothing, the
metrics parse and follow the instances."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import SLEEPER, Branchd, _kill_leftovers, start_branchd, stop_branchd, wait_for


@pytest.fixture(scope="module")
def b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Branchd]:
    daemon = start_branchd(tmp_path_factory.mktemp("events") / "state")
    try:
        yield daemon
    finally:
        stop_branchd(daemon)


class Stream:
    """A client of GET /v1/events: each event as (id, type, data, when read)."""

    def __init__(self, b: Branchd, query: str = "", last_id: str | None = None) -> None:
        url = urlsplit(b.url)
        self.conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
        headers = {"Authorization": f"Bearer {b.token}"} if b.token else {}
        if last_id is not None:
            headers["Last-Event-ID"] = last_id
        self.conn.request("GET", "/v1/events" + query, headers=headers)
        self.resp = self.conn.getresponse()

    def next(self) -> tuple[str | None, str, dict[str, Any], float]:
        event_id, kind, data = None, "", ""
        while True:
            line = self.resp.readline().decode().rstrip("\n")
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
            elif not line and data:
                return event_id, kind, json.loads(data), time.monotonic()

    def close(self) -> None:
        self.conn.close()


def _sleeper(b: Branchd, app: str, name: str) -> dict[str, Any]:
    b.call("PUT", f"/v1/apps/{app}", {})
    body = {"name": name, "command": SLEEPER, "startsecs": 0}
    b.ok("POST", f"/v1/apps/{app}/instances", body, status=201)
    return b.wait_state(app, name, "running")


def test_a_kill_9_is_on_the_stream(b: Branchd) -> None:
    stream = Stream(b, "?app=ev&types=instance")
    inst = _sleeper(b, "ev", "k1")
    while stream.next()[2]["state"] != "running":  # (its start, on the stream too)
        pass
    try:
        assert stream.resp.status == 200
        assert stream.resp.headers["Content-Type"] == "text/event-stream"
        took = []
        pid = inst["pid"]
        for _ in range(3):
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            # what is left on the stream from before the kill is about pid,
            # starting or running; the first event past it is the kill's
            _, kind, data, seen = stream.next()
            while data["pid"] == pid and data["state"] in ("starting", "running"):
                _, kind, data, seen = stream.next()
            assert (kind, data["name"]) == ("instance", "k1") and data["app"] == "ev"
            assert data["pid"] != pid, data  # (ended, or already started again)
            took.append(seen - killed)
            while not (data["state"] == "running" and data["pid"] not in (None, pid)):
                _, _, data, _ = stream.next()
            assert data["pid"] != pid
            pid = data["pid"]
        print(f"kill -9 -> event at the client: {', '.join(f'{t * 1000:.1f}' for t in took)} ms")
    finally:
        stream.close()


def test_a_resume_by_last_event_id_loses_nothing(b: Branchd) -> None:
    _sleeper(b, "res", "r1")
    whole = Stream(b, "?app=res")  # open the whole time: what the resumed one must see
    first = Stream(b, "?app=res")
    try:
        b.ok("POST", "/v1/apps/res/instances/r1/stop")
        last_id = first.next()[0]
        assert last_id is not None
        first.close()
        # while nobody is connected at that id: stops, starts, a new instance
        b.ok("POST", "/v1/apps/res/instances/r1/start")
        b.ok("POST", "/v1/apps/res/instances", {"name": "r2", "command": SLEEPER}, status=201)
        b.wait_state("res", "r2", "running")
        b.ok("POST", "/v1/apps/res/instances/r2/stop")
        everything = [whole.next()]
        while (everything[-1][2].get("name"), everything[-1][2].get("state")) != ("r2", "stopped"):
            everything.append(whole.next())
        resumed = Stream(b, "?app=res", last_id=last_id)
        try:
            after = [e[0] for e in everything[[e[0] for e in everything].index(last_id) + 1 :]]
            got = [resumed.next()[0] for _ in after]
            assert got == after and len(after) >= 5
        finally:
            resumed.close()
    finally:
        whole.close()
        first.close()


def test_resumes_from_elsewhere_and_bad_input(b: Branchd) -> None:
    stream = Stream(b, "", last_id="1-1")  # another daemon run's id
    try:
        _, kind, data, _ = stream.next()
        assert kind == "gap" and data["missed"] is None and "restarted" in data["reason"]
    finally:
        stream.close()
    assert b.call("GET", "/v1/events?types=nope").status == 400
    bad = Stream(b, "", last_id="yesterday")
    assert (
        bad.resp.status == 400
        and "Last-Event-ID" in json.loads(bad.resp.read())["error"]["message"]
    )
    bad.close()


def _metrics(b: Branchd) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reply = b.call("GET", "/metrics")
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(reply.text)
        for s in family.samples
    }


def test_metrics_parse_and_follow_the_instances(b: Branchd) -> None:
    inst = _sleeper(b, "met", "m1")
    before = _metrics(b)
    assert before[("branchd_instances", (("app", "met"), ("state", "running")))] == 1
    assert before[("branchd_instance_rss_bytes", (("app", "met"), ("name", "m1")))] > 0
    restarts = before[("branchd_instance_restarts_total", (("app", "met"), ("name", "m1")))]
    b.ok("POST", "/v1/apps/met/instances/m1/stop")
    os.kill(b.ok("POST", "/v1/apps/met/instances/m1/start")["pid"], signal.SIGKILL)
    wait_for(lambda: b.instance("met", "m1")["restarts"] > inst["restarts"])
    b.ok("POST", "/v1/apps/met/instances/m1/stop")
    after = _metrics(b)
    assert after[("branchd_instances", (("app", "met"), ("state", "stopped")))] == 1
    assert ("branchd_instances", (("app", "met"), ("state", "running"))) not in after
    assert after[("branchd_instance_restarts_total", (("app", "met"), ("name", "m1")))] > restarts
    assert ("branchd_instance_rss_bytes", (("app", "met"), ("name", "m1"))) not in after
    stops = ("code", "200"), ("method", "POST"), ("route", "/v1/apps/{app}/instances/{name}/stop")
    assert after[("branchd_http_request_duration_seconds_count", stops)] >= 2
    assert b.call("GET", "/metrics", token="wrong").status == 401


def test_metrics_public(tmp_path_factory: pytest.TempPathFactory) -> None:
    daemon = start_branchd(tmp_path_factory.mktemp("public") / "state", "--metrics-public")
    try:
        assert daemon.call("GET", "/metrics", token="wrong").status == 200
        assert daemon.call("GET", "/v1/apps", token="wrong").status == 401
    finally:
        daemon.proc.send_signal(signal.SIGTERM)
        daemon.proc.wait(30)
        _kill_leftovers(daemon.state_dir)


def test_branchctl_events_follows_and_ends_on_ctrl_c(b: Branchd) -> None:
    import sys
    from pathlib import Path

    cli = str(Path(sys.executable).with_name("branchctl"))
    env = {**os.environ, "BRANCHD_URL": b.url, "BRANCHD_TOKEN": b.token or ""}
    proc = subprocess.Popen(
        [cli, "events", "--app", "cli", "--types", "instance_added", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        # the stream is open once an instance made after it is on it
        b.call("PUT", "/v1/apps/cli", {})
        assert proc.stdout is not None
        for n in range(50):
            body = {"name": f"c{n}", "command": SLEEPER, "autostart": False}
            b.ok("POST", "/v1/apps/cli/instances", body, status=201)
            if _ready(proc):
                break
        event = json.loads(proc.stdout.readline())
        assert event["type"] == "instance_added" and event["app"] == "cli" and event["id"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 130
        assert proc.stderr is not None and b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    bad = subprocess.run([cli, "events", "--types", "nope"], capture_output=True, env=env)
    assert bad.returncode == 2 and b"unknown event type nope" in bad.stderr


def _ready(proc: subprocess.Popen[bytes]) -> bool:
    import select

    assert proc.stdout is not None
    return bool(select.select([proc.stdout], [], [], 0.1)[0])
