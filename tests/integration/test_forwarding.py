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
from collections.abc import Callable
from pathlib import Path

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
        "--cluster-key-file", str(key), "--join", join, "--max-instances", "3",
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
    assert a.ok("POST", f"/v1/branches/{id_b}/drain") == {"id": id_b, "draining": True}
    wait_for(lambda: a.ok("GET", f"/v1/branches/{id_b}")["capacity"]["draining"], 10)
    for i in range(4):
        made = b.ok("POST", "/v1/apps/shop/instances", {"name": f"d{i}", "command": TICKER}, 201)
        assert made["branch"] == id_a  # through B itself too
    full = a.call("POST", f"/v1/apps/shop/instances?branch={id_b}", {"command": TICKER})
    assert full.status == 503 and "draining" in full.body["error"]["message"]
    assert a.call("POST", "/v1/branches/nobody/drain").status == 404
    assert b.ok("POST", "/v1/branches/self/undrain") == {"id": id_b, "draining": False}
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

    def create(x: Branchd, who: str) -> None:
        go.wait()
        body = {"name": name, "command": ["true"], "autostart": False}
        got[who] = x.call("POST", "/v1/apps/shop/instances", body).status

    threads = [threading.Thread(target=create, args=(x, w)) for x, w in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tuple(sorted(got.values()))
