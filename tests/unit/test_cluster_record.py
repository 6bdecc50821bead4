"""The branch record on the gossip (``cluster/record.py``) and the keyring file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from branchd.cluster.gossip import META_MAX
from branchd.cluster.keyring import Keyring, generate_key, parse_key
from branchd.cluster.record import from_meta, names_digest, record_from_json, to_meta
from branchd.cluster.service import load_keyring, save_keyring
from branchd.errors import BadMessage
from branchd.views import BranchRecord, Capacity

CAP = Capacity(
    8, (0.51234, 0.25, 0.125), 16 << 30, 9 << 30, 3, max_instances=100, slots=128, slots_used=9
)
REC = BranchRecord(
    id="b" * 32,
    hostname="m1.example",
    version="0.1.0",
    started_at=1764590000.123456,
    address="10.0.0.1:8400",
    capacity=CAP,
    epoch=1764590000123,
    api_url="http://10.0.0.1:8400",
    gossip_addr="10.0.0.1:8401",
    instances=("shop/w1", "shop/w2", "web/a"),
    running=("shop/w1", "web/a"),
)


def test_the_meta_carries_what_placement_reads_and_a_digest_of_the_names() -> None:
    meta = to_meta(REC)
    back = from_meta(meta)
    assert back.api_url == REC.api_url and back.hostname == "m1.example"
    assert back.capacity == Capacity(
        8, (0.51, 0.25, 0.12), 16 << 30, 9 << 30, 3, 100, slots=128, slots_used=9
    )
    assert back.capacity.free_slots == 119 and back.capacity.free_instances == 97
    assert back.digest == names_digest(REC.instances, REC.running)
    rec = back.record(REC.id, REC.epoch, REC.gossip_addr, REC.instances, REC.running)
    assert rec.address == "10.0.0.1:8400" and rec.instances == REC.instances
    assert rec.running == REC.running


def test_the_meta_fits_the_members_meta_even_with_long_names() -> None:
    many = tuple(f"shop/worker-{i:04d}" for i in range(1000))
    big = {"hostname": "h" * 300, "version": "v" * 300, "instances": many, "running": many}
    long = BranchRecord(**{**REC.__dict__, **big})
    assert len(to_meta(long).encode()) <= META_MAX  # (names ride as a digest only)


def test_the_digest_changes_when_a_worker_starts_or_stops() -> None:
    names = ["shop/w1", "shop/w2"]
    assert names_digest(names, ()) == names_digest(names)  # (what an older branch gossips)
    assert names_digest(names, ["shop/w1"]) != names_digest(names)
    assert names_digest(names, ["shop/w1"]) != names_digest(names, ["shop/w2"])
    assert names_digest(names, ["shop/w2", "shop/w1"]) == names_digest(names, names)
    # a running worker is not taken for one more name
    assert names_digest(["a/1"], ["a/1"]) != names_digest(["a/1", "a/1"])


def test_the_digest_changes_with_the_set_of_names_only() -> None:
    assert names_digest(["a/1", "b/2"]) == names_digest(["b/2", "a/1"])
    assert names_digest(["a/1"]) != names_digest(["a/1", "a/2"])
    assert names_digest(["a/12"]) != names_digest(["a/1", "2"])


def test_draining_rides_only_when_set() -> None:
    drained = Capacity(**{**CAP.__dict__, "draining": True})
    draining = BranchRecord(**{**REC.__dict__, "capacity": drained})
    assert '"d"' not in to_meta(REC) and from_meta(to_meta(draining)).capacity.draining


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("nope", "not JSON"),
        ("[]", "not an object"),
        ("{}", "lacks"),
        (json.dumps({**json.loads(to_meta(REC)), "c": -1}), "malformed"),
        (json.dumps({**json.loads(to_meta(REC)), "l": [1]}), "three numbers"),
        (json.dumps({**json.loads(to_meta(REC)), "u": 5}), "malformed"),
    ],
)
def test_a_bad_meta_is_one_clear_error(text: str, error: str) -> None:
    with pytest.raises(BadMessage, match=error):
        from_meta(text)


def test_a_whole_record_comes_back_from_its_json() -> None:
    back = record_from_json(json.loads(json.dumps(REC.to_json())))
    assert back.capacity.load == (0.51, 0.25, 0.12)  # answers round the load
    assert back == BranchRecord(**{**REC.__dict__, "capacity": back.capacity})
    with pytest.raises(BadMessage, match="not a branch record"):
        record_from_json({"id": "x"})
    # an older branch's record says nothing of its running workers: none
    old = REC.to_json()
    del old["running"]
    assert record_from_json(old).running == ()


def test_the_keyring_file_outlives_a_restart_and_takes_a_new_given_key(tmp_path: Path) -> None:
    path = tmp_path / "cluster-keys"
    assert load_keyring(path, None) is None
    first, second = generate_key(), generate_key()
    ring = load_keyring(path, first)
    assert ring == Keyring.of(parse_key(first))
    ring = ring.install(parse_key(second)).use(parse_key(second).id)
    save_keyring(path, ring)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_keyring(path, None) == ring
    assert load_keyring(path, first) == ring  # held already: nothing changes
    third = generate_key()
    grown = load_keyring(path, third)
    assert grown is not None and grown.primary == ring.primary and len(grown.keys) == 3
    path.write_text("garbage")
    with pytest.raises(BadMessage, match="not a keyring"):
        load_keyring(path, first)


def test_a_record_is_told_again_only_when_it_changed_enough() -> None:
    from branchd.cluster.service import TELL_AT_LEAST_EVERY, worth_telling

    def w(**cap: object) -> BranchRecord:
        return BranchRecord(**{**REC.__dict__, "capacity": Capacity(**{**CAP.__dict__, **cap})})

    assert not worth_telling(REC, REC, 5.0)
    assert not worth_telling(REC, w(load=(0.6, 0.3, 0.1)), 5.0)  # a tenth of a point
    assert worth_telling(REC, w(load=(0.9, 0.3, 0.1)), 5.0)
    assert worth_telling(REC, w(instances=4), 0.1)
    assert worth_telling(REC, w(draining=True), 0.1)
    assert not worth_telling(REC, w(memory_free=(9 << 30) - (100 << 20)), 5.0)
    assert worth_telling(REC, w(memory_free=8 << 30), 5.0)
    assert worth_telling(REC, BranchRecord(**{**REC.__dict__, "instances": ("x/y",)}), 0.1)
    assert worth_telling(REC, BranchRecord(**{**REC.__dict__, "running": ()}), 0.1)
    assert worth_telling(REC, REC, TELL_AT_LEAST_EVERY)


def test_every_branch_picks_the_same_reserver_for_a_name() -> None:
    from branchd.cluster.names import reserver

    ids = [f"b{i}" for i in range(5)]
    picks = {reserver("shop/w1", order) for order in (ids, ids[::-1], sorted(ids, key=hash))}
    assert len(picks) == 1
    spread = {reserver(f"shop/w{i}", ids) for i in range(200)}
    assert spread == set(ids)  # the names' reservers spread over the branches
