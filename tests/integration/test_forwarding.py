"""Forward first across real branches: a named instance's routes, asked of
any branch, are answered by the branch that holds it (issue 14, part 4, its
first step: instances; placement and gathered listings come next).

Two real branchd on loopback share a cluster key; each has its own token,
so a forwarded request can only pass on the cluster key's proof.
"""

from __future__ import annotations

import base64
import json
import signal
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from branchd.cluster.keyring import generate_key
from tests.conftest import Branchd, wait_for

TICK = "import time\nwhile True: print('tick', flush=True); time.sleep(0.2)"
TICKER = [sys.executable, "-c", TICK]


@pytest.fixture
def pair(branchd_factory: Callable[..., Branchd], tmp_path: Path) -> tuple[Branchd, Branchd]:
    key = tmp_path / "cluster.key"
    key.write_text(generate_key() + "\n")
    key.chmod(0o600)
    a = branchd_factory("--cluster-key-file", str(key), state_dir=tmp_path / "a")
    port = a.url.rsplit(":", 1)[1]
    join = f"http://127.0.0.1:{port}"
    b = branchd_factory("--cluster-key-file", str(key), "--join", join, state_dir=tmp_path / "b")
    for x in (a, b):
        wait_for(lambda x=x: len(alive(x)) == 2, 15)
    return a, b


def alive(b: Branchd) -> list[str]:
    return [m["id"] for m in b.ok("GET", "/v1/branches")["items"] if m["state"] == "alive"]


def test_an_instance_is_reached_through_either_branch(pair: tuple[Branchd, Branchd]) -> None:
    a, b = pair
    assert a.token != b.token  # a forward passes on the cluster key, not a shared token
    b.ok("PUT", "/v1/apps/web", {}, status=201)
    b.ok("POST", "/v1/apps/web/instances", {"name": "t1", "command": TICKER, "startsecs": 0}, 201)
    inst = "/v1/apps/web/instances/t1"
    me_b = b.ok("GET", "/v1/branch")["id"]
    # A learns that B holds it (the digest of B's names, then the names)
    got = wait_for(lambda: (r := a.call("GET", inst)).status == 200 and r.body, 10)
    assert got["branch"] == me_b and got["state"] in ("starting", "running")
    # every instance operation through A, answered by B unchanged
    assert a.call("PATCH", inst, {"startsecs": -1}).status == 422  # B's own 422
    assert a.call("PATCH", inst, {"stopwaitsecs": 3}).body["stopwaitsecs"] == 3
    assert a.call("GET", inst + "/stats").status == 200
    wait_for(lambda: "tick" in a.call("GET", inst + "/logs?tail=5").text)
    assert a.call("POST", inst + "/stop").body["state"] == "stopped"
    assert a.call("POST", inst + "/start").status == 200
    assert a.call("POST", inst + "/restart").status == 200
    # a follow streams through the hop
    req = urllib.request.Request(a.url + inst + "/logs?follow=1&tail=0")
    req.add_header("Authorization", f"Bearer {a.token}")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.readline().strip() == b"tick"
    assert b.instance("web", "t1")["stopwaitsecs"] == 3
    assert a.call("DELETE", inst).status == 204
    assert b.call("GET", inst).status == 404
    # gone from B's record: A answers itself again (the app is declared on
    # every branch, the instance is nowhere)
    gone = "no instance 't1' in app 'web'"
    wait_for(lambda: a.call("GET", inst).body["error"]["message"] == gone, 10)


def test_a_forward_never_loops_and_needs_a_members_proof(pair: tuple[Branchd, Branchd]) -> None:
    a, b = pair
    b.ok("PUT", "/v1/apps/web", {}, status=201)
    b.ok("POST", "/v1/apps/web/instances", {"name": "t2", "command": TICKER}, 201)
    inst = "/v1/apps/web/instances/t2"
    wait_for(lambda: a.call("GET", inst).status == 200, 10)
    # the hop header: answered where it lands, never forwarded again
    req = urllib.request.Request(a.url + inst)
    req.add_header("Authorization", f"Bearer {a.token}")
    req.add_header("X-Branchd-Hop", "somebody")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 404
    # a proof that is not a member's is refused, even with the token
    for proof in ("AAAA", base64.b64encode(b"x" * 80).decode(), "not base64!"):
        req = urllib.request.Request(b.url + inst)
        req.add_header("X-Branchd-Forwarded", proof)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 403, proof
        assert "not from a member" in json.loads(err.value.read())["error"]["message"]


def test_an_owner_gone_is_a_503_naming_it(pair: tuple[Branchd, Branchd]) -> None:
    a, b = pair
    b.ok("PUT", "/v1/apps/web", {}, status=201)
    b.ok("POST", "/v1/apps/web/instances", {"name": "t3", "command": TICKER}, 201)
    inst = "/v1/apps/web/instances/t3"
    wait_for(lambda: a.call("GET", inst).status == 200, 10)
    me_b = b.ok("GET", "/v1/branch")["id"]
    b.proc.send_signal(signal.SIGSTOP)  # unreachable, not yet dead
    try:
        started = time.monotonic()
        reply = wait_for(lambda: (r := a.call("GET", inst, timeout=60)).status == 503 and r, 60)
        err = reply.body["error"]
        assert err["code"] == "branch_unreachable" and err["branch"] == me_b
        assert me_b in err["message"] and err["state"] in ("alive", "suspect", "dead")
        print(f"503 after {time.monotonic() - started:.1f}s: {err['message']}")
    finally:
        b.proc.send_signal(signal.SIGCONT)


def test_a_listing_gathers_every_branch_and_names_the_silent_one(
    pair: tuple[Branchd, Branchd],
) -> None:
    a, b = pair
    id_a, id_b = (x.ok("GET", "/v1/branch")["id"] for x in (a, b))
    # a broker of its own (an app on the embedded one runs where it was declared)
    a.ok("PUT", "/v1/apps/web", {"broker": "amqp://guest:guest@127.0.0.1:5672//"}, status=201)
    wait_for(lambda: b.call("GET", "/v1/apps/web").status == 200, 10)  # replicated
    for x, name, here in ((a, "on-a", id_a), (b, "on-b", id_b)):
        where = f"/v1/apps/web/instances?branch={here}"
        made = x.ok("POST", where, {"name": name, "command": TICKER}, 201)
        assert made["branch"] == here
    for x in (a, b):
        listing = x.ok("GET", "/v1/apps/web/instances")
        assert {(i["name"], i["branch"]) for i in listing["items"]} == {
            ("on-a", id_a),
            ("on-b", id_b),
        }
        assert listing["unreachable"] == []
        # an app's figures are gathered too
        stats = x.ok("GET", "/v1/apps/web/stats")
        assert {(i["name"], i["branch"]) for i in stats["items"]} == {
            ("on-a", id_a),
            ("on-b", id_b),
        }
        assert all(i["memory_rss"] >= 0 for i in stats["items"]) and stats["unreachable"] == []
    # and the instances that consume a queue (declared ones: none here)
    assert a.ok("GET", "/v1/apps/web/queues/jobs/consumers") == {"items": [], "unreachable": []}
    b.proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        listing = a.ok("GET", "/v1/apps/web/instances")
        took = time.monotonic() - started
        print(f"a listing with one branch silent answered in {took:.2f}s")
        assert [i["name"] for i in listing["items"]] == ["on-a"]
        [silent] = listing["unreachable"]
        assert silent["branch"] == id_b and silent["state"] in ("alive", "suspect")
    finally:
        b.proc.send_signal(signal.SIGCONT)


def test_creates_through_one_branch_are_placed_where_there_is_room(
    branchd_factory: Callable[..., Branchd], tmp_path: Path
) -> None:
    key = tmp_path / "cluster.key"
    key.write_text(generate_key() + "\n")
    key.chmod(0o600)
    a = branchd_factory("--cluster-key-file", str(key), state_dir=tmp_path / "a")
    join = f"http://127.0.0.1:{a.url.rsplit(':', 1)[1]}"
    b = branchd_factory(
        "--cluster-key-file", str(key), "--join", join, "--slots", "3",
        state_dir=tmp_path / "b",
    )  # fmt: skip
    for x in (a, b):
        wait_for(lambda x=x: len(alive(x)) == 2, 15)
    id_a, id_b = (x.ok("GET", "/v1/branch")["id"] for x in (a, b))
    # an app on a broker of its own: its instances may run on any branch
    a.ok("PUT", "/v1/apps/shop", {"broker": "amqp://guest:guest@127.0.0.1:5672//"}, 201)
    wait_for(lambda: b.call("GET", "/v1/apps/shop").status == 200, 10)
    placed = []
    for i in range(8):
        made = a.call("POST", "/v1/apps/shop/instances", {"name": f"p{i}", "command": TICKER})
        assert made.status == 201, made.text
        assert made.headers["Location"] == f"/v1/apps/shop/instances/p{i}"
        placed.append(made.body["branch"])
        # the next choice reads B's new count from its gossip: let it arrive
        on_b = placed.count(id_b)
        wait_for(lambda n=on_b: n == b.ok("GET", "/v1/branch")["capacity"]["instances"])
    print(f"8 creates through A: {placed.count(id_a)} on A, {placed.count(id_b)} on B (3 slots)")
    assert 1 <= placed.count(id_b) <= 3 and placed.count(id_a) >= 5
    # a name taken on another branch is a 409 from any branch
    taken = next(f"p{i}" for i, br in enumerate(placed) if br == id_b)
    wait_for(lambda: a.call("GET", f"/v1/apps/shop/instances/{taken}").status == 200, 10)
    again = a.call("POST", "/v1/apps/shop/instances", {"name": taken, "command": TICKER})
    assert again.status == 409 and id_b in again.body["error"]["message"]
    # pinned: there, or a 503 full that says why
    nowhere = a.call("POST", "/v1/apps/shop/instances?branch=nobody", {"command": TICKER})
    assert nowhere.status == 404 and "nobody" in nowhere.body["error"]["message"]
    pinned = a.call("POST", f"/v1/apps/shop/instances?branch={id_a}", {"command": TICKER})
    assert pinned.status == 201 and pinned.body["branch"] == id_a
    if placed.count(id_b) == 3:
        full = a.call("POST", f"/v1/apps/shop/instances?branch={id_b}", {"command": TICKER})
        assert full.status == 503 and full.body["error"]["code"] == "full"
    # a slot is a pool process: a worker of concurrency 4 does not fit in B's 3
    worker = {"kind": "celery", "concurrency": 4, "autostart": False}
    big = a.call("POST", f"/v1/apps/shop/instances?branch={id_b}", worker)
    assert big.status == 503 and big.body["error"]["code"] == "full", big.text
    assert "4 slots" in big.body["error"]["message"]
    assert b.ok("GET", "/v1/branch")["capacity"]["slots"] == 3
    # an app on the embedded broker: its instances run on the branch that declared it
    b.ok("PUT", "/v1/apps/local", {}, 201)
    wait_for(lambda: a.call("GET", "/v1/apps/local").status == 200, 10)
    if placed.count(id_b) < 3:
        home = a.call("POST", "/v1/apps/local/instances", {"command": TICKER})
        assert home.status == 201 and home.body["branch"] == id_b
    elsewhere = a.call("POST", f"/v1/apps/local/instances?branch={id_a}", {"command": TICKER})
    assert elsewhere.status == 422 and "embedded broker" in elsewhere.body["error"]["message"]


def test_a_drained_branch_takes_no_new_instance_until_undrained(
    pair: tuple[Branchd, Branchd],
) -> None:
    a, b = pair
    id_a, id_b = (x.ok("GET", "/v1/branch")["id"] for x in (a, b))
    a.ok("PUT", "/v1/apps/shop", {"broker": "amqp://guest:guest@127.0.0.1:5672//"}, status=201)
    wait_for(lambda: b.call("GET", "/v1/apps/shop").status == 200, 10)
    # drained through A: forwarded to B
    drained = a.ok("POST", f"/v1/branches/{id_b}/drain")
    assert drained == {"id": id_b, "draining": True, "move": None}
    wait_for(lambda: a.ok("GET", f"/v1/branches/{id_b}")["capacity"]["draining"], 10)
    for i in range(4):
        made = b.ok("POST", "/v1/apps/shop/instances", {"name": f"d{i}", "command": TICKER}, 201)
        assert made["branch"] == id_a  # through B itself too
    full = a.call("POST", f"/v1/apps/shop/instances?branch={id_b}", {"command": TICKER})
    assert full.status == 503 and "draining" in full.body["error"]["message"]
    assert a.call("POST", "/v1/branches/nobody/drain").status == 404
    undrained = b.ok("POST", "/v1/branches/self/undrain")
    assert undrained == {"id": id_b, "draining": False, "move": None}
    wait_for(lambda: not a.ok("GET", f"/v1/branches/{id_b}")["capacity"]["draining"], 10)
    pinned = a.call("POST", f"/v1/apps/shop/instances?branch={id_b}", {"command": TICKER})
    assert pinned.status == 201 and pinned.body["branch"] == id_b
    # a count create is not placed: refused in a cluster (422), before any name is reserved
    count = {"count": 2, "name": "c{n}", "command": TICKER}
    for x in (a, b):
        refused = x.call("POST", f"/v1/apps/shop/instances?branch={id_b}", count)
        assert refused.status == 422 and "one by one" in refused.body["error"]["message"]
    assert a.ok("POST", "/v1/apps/shop/instances", {"name": "c0", "command": TICKER}, 201)


def test_concurrent_creates_of_one_name_through_two_branches_make_one(
    pair: tuple[Branchd, Branchd],
) -> None:
    a, b = pair
    a.ok("PUT", "/v1/apps/shop", {"broker": "amqp://guest:guest@127.0.0.1:5672//"}, status=201)
    wait_for(lambda: b.call("GET", "/v1/apps/shop").status == 200, 10)
    rounds, codes = 50, []
    for i in range(rounds):
        codes.append(_race(a, b, f"same{i}"))
        # never two: the gathered listing (both branches') holds it once
        names = [x["name"] for x in a.ok("GET", "/v1/apps/shop/instances")["items"]]
        assert names.count(f"same{i}") == 1, (i, codes[-1], names)
    print(f"{rounds} rounds of two concurrent creates: {sorted(set(codes))}")
    assert all(c == (201, 409) for c in codes), codes


def _race(a: Branchd, b: Branchd, name: str) -> tuple[int, ...]:
    """Two creates of ``name`` at once, one through each branch: their statuses."""
    go = threading.Barrier(2)
    got: dict[str, int] = {}
    errors: list[str] = []

    def create(x: Branchd, who: str) -> None:
        go.wait()
        body = {"name": name, "command": ["true"], "autostart": False}
        reply = x.call("POST", "/v1/apps/shop/instances", body)
        got[who] = reply.status
        if reply.status not in (201, 409):
            errors.append(reply.text)  # (said when the test fails)

    threads = [threading.Thread(target=create, args=(x, w)) for x, w in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return tuple(sorted(got.values()))


def test_a_worker_is_driven_through_another_branch_and_a_drain_moves_instances_away(
    pair: tuple[Branchd, Branchd],
) -> None:
    """A Celery worker on B: its consumers, autoscale and stats through A.
    Then ``drain --move`` of B: its instances are made again on A one at a
    time, each new one running before the old one stops; one on B's own
    embedded broker cannot move and says why."""
    from branchctl.cli import main
    from click.testing import CliRunner

    from tests.brokers import REDIS_URL, reachable, unreachable

    if not reachable(REDIS_URL):
        unreachable(REDIS_URL)
    a, b = pair
    id_a, id_b = (x.ok("GET", "/v1/branch")["id"] for x in (a, b))
    tok = uuid.uuid4().hex[:8]
    app, queue, extra = f"shop-{tok}", f"default-{tok}", f"extra-{tok}"
    root = str(Path(__file__).resolve().parents[2])
    a.ok("PUT", f"/v1/apps/{app}", {"broker": REDIS_URL, "celery_app": "tests.celery_app.tasks",
                                     "env": {"PYTHONPATH": root}}, 201)  # fmt: skip
    wait_for(lambda: b.call("GET", f"/v1/apps/{app}").status == 200, 10)
    # (a worker's node name is NAME@host: unique to this test on the shared broker)
    w = f"w-{tok}"
    worker = {"name": w, "kind": "celery", "queues": [queue], "autoscale": {"min": 1, "max": 2}}
    assert a.call("POST", f"/v1/apps/{app}/instances?branch={id_b}", worker).status == 201
    inst = f"/v1/apps/{app}/instances/{w}"
    wait_for(lambda: b.instance(app, w)["state"] == "running", 60, 0.1)
    wait_for(lambda: a.call("GET", inst).status == 200, 10)
    # the runtime operations through A, answered by B's worker
    added = a.ok("PUT", inst + f"/queues/{extra}")
    assert {q["name"]: q["live"] for q in added["items"]} == {queue: True, extra: True}
    assert [q["name"] for q in a.ok("GET", inst + "/queues")["items"]] == [queue, extra]
    assert a.ok("DELETE", inst + f"/queues/{extra}")["items"][0]["name"] == queue
    assert a.ok("PUT", inst + "/autoscale", {"min": 1, "max": 3})["live"] == {"min": 1, "max": 3}
    assert a.ok("GET", inst + "/autoscale")["max"] == 3
    assert a.ok("GET", inst + "/stats")["celery"]["node"].startswith(f"{w}@")
    assert a.call("DELETE", inst).status == 204
    assert b.call("GET", inst).status == 404

    # B drains with --move: its instances go to A, each new one running first
    for name in ("p1", "p2"):
        made = {"name": name, "command": TICKER, "startsecs": 1}
        assert a.call("POST", f"/v1/apps/{app}/instances?branch={id_b}", made).status == 201
    b.ok("POST", f"/v1/apps/{app}/instances/p2/stop")
    b.ok("PUT", "/v1/apps/loc", {}, 201)  # on B's embedded broker: it stays on B
    b.ok("POST", "/v1/apps/loc/instances", {"name": "l1", "command": TICKER}, 201)
    wait_for(lambda: b.instance(app, "p1")["state"] == "running", 10)
    old_pid = b.instance(app, "p1")["pid"]
    started = b.ok("POST", "/v1/branches/self/drain?move=1", status=202)
    assert started["draining"] is True and started["move"]["state"] == "moving"
    gaps = []

    def done() -> dict[str, Any] | None:
        # at every look, p1 runs on one branch or the other (or both)
        items = a.ok("GET", f"/v1/apps/{app}/instances")["items"]
        if not any(i["name"] == "p1" and i["state"] == "running" for i in items):
            gaps.append(items)
        move = a.ok("GET", f"/v1/branches/{id_b}/drain")["move"]  # (forwarded to B)
        return move if move["state"] != "moving" else None

    move = wait_for(done, 30, 0.05)
    assert gaps == []
    assert move["moved"] == [{"instance": f"{app}/p1", "to": id_a},
                             {"instance": f"{app}/p2", "to": id_a}]  # fmt: skip
    assert [f["instance"] for f in move["failed"]] == ["loc/l1"]
    assert "embedded broker" in move["failed"][0]["error"]
    p1, p2 = a.instance(app, "p1"), a.instance(app, "p2")
    assert p1["branch"] == id_a and p1["state"] == "running" and p1["pid"] != old_pid
    assert p2["branch"] == id_a and p2["state"] == "stopped"  # made as it was
    assert not _alive(old_pid)
    wait_for(lambda: a.ok("GET", f"/v1/branches/{id_b}")["instances"] == ["loc/l1"], 10)
    # the CLI: the one that cannot move is said, and the exit is 1
    env = {"BRANCHD_STATE_DIR": str(b.state_dir.parent / "no-such-state")}
    r = CliRunner().invoke(
        main, ["--url", a.url, "--token", a.token, "branches", "drain", id_b, "--move"], env=env
    )
    assert r.exit_code == 1, r.output
    assert "loc/l1: not moved: app 'loc' is on this branch's embedded broker" in r.output
    assert "0 moved, 1 not moved" in r.output


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
