"""The wire form: every message there and back, compounds within the budget,
piggybacked updates trimmed from the end, and bad bytes always ``BadMessage``."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from branchd.cluster import codec
from branchd.cluster.codec import DATAGRAM_BUDGET, decode, encode, encode_update, pack, unpack
from branchd.cluster.messages import (
    Ack,
    Gossip,
    MemberState,
    Message,
    Nack,
    Ping,
    PingReq,
    Sync,
    Update,
)
from branchd.errors import BadMessage, BranchdError


def upd(i: int, state: MemberState = MemberState.ALIVE) -> Update:
    addr = f"10.0.{i // 256}.{i % 256}:8401"
    return Update(f"branch-{i:04d}", addr, 1700000000 + i, i, state, "b0")


U = (upd(1), upd(2, MemberState.SUSPECT), upd(3, MemberState.DEAD), upd(4, MemberState.LEFT))
EVERY: list[Message] = [
    Ping("b0", "10.0.0.1:8401", 1, "b1", U),
    Ack("b1", "10.0.0.2:8401", 1, U[:1]),
    PingReq("b0", "10.0.0.1:8401", 2, "b2", "10.0.0.3:8401", U),
    Nack("b3", "10.0.0.4:8401", 2),
    Gossip("b0", "10.0.0.1:8401", U),
    Sync("b0", "10.0.0.1:8401", U, True),
    Sync("b0", "10.0.0.1:8401", (), False),
]


@pytest.mark.parametrize("msg", EVERY, ids=lambda m: type(m).__name__)
def test_every_message_comes_back_as_itself(msg: Message) -> None:
    assert decode(encode(msg)) == msg
    [datagram] = pack([msg])
    assert unpack(datagram) == [msg]


def test_an_update_carries_its_meta_as_a_seventh_field_only_when_it_has_one() -> None:
    plain = Update("b1", "a:1", 1, 0, MemberState.ALIVE, "b1")
    with_meta = replace(plain, meta='{"u":"http://h:8400"}')
    assert encode_update(plain) == b'["b1","a:1",1,0,"a","b1"]'
    assert encode_update(with_meta) == b'["b1","a:1",1,0,"a","b1","{\\"u\\":\\"http://h:8400\\"}"]'
    msg = Gossip("b1", "a:1", (plain, with_meta))
    assert decode(encode(msg)) == msg
    with pytest.raises(BadMessage, match="6 or 7 fields"):
        decode(b'["g","b1","a:1",[["b1","a:1",1,0,"a","b1","m","extra"]]]')
    with pytest.raises(BadMessage, match="meta"):
        decode(b'["g","b1","a:1",[["b1","a:1",1,0,"a","b1",7]]]')


def test_the_form_is_compact_and_readable() -> None:
    data = encode(Nack("b3", "10.0.0.4:8401", 2))
    assert data == b'["n","b3","10.0.0.4:8401",2,[]]'
    assert pack([Nack("b3", "a:1", 2)]) == [b'[1,["n","b3","a:1",2,[]]]']
    refused = Nack("b3", "a:1", 2, refused=True)
    assert encode(refused) == b'["n","b3","a:1",2,1,[]]' and decode(encode(refused)) == refused
    with pytest.raises(BadMessage, match="nack refused"):
        decode(b'["n","b3","a:1",2,0,[]]')


# hypothesis: any message there and back ---------------------------------------------

_text = hs.text(max_size=30)
_int = hs.integers(min_value=0, max_value=codec.MAX_INT)
_updates = hs.lists(
    hs.builds(Update, _text, _text, _int, _int, hs.sampled_from(list(MemberState)), _text, _text),
    max_size=8,
).map(tuple)
_messages: hs.SearchStrategy[Message] = hs.one_of(
    hs.builds(Ping, _text, _text, _int, _text, _updates),
    hs.builds(Ack, _text, _text, _int, _updates),
    hs.builds(PingReq, _text, _text, _int, _text, _text, _updates),
    hs.builds(Nack, _text, _text, _int, _updates, hs.booleans()),
    hs.builds(Gossip, _text, _text, _updates),
    hs.builds(Sync, _text, _text, _updates, hs.booleans()),
)


@settings(max_examples=300, deadline=None)
@given(_messages)
def test_any_message_round_trips(msg: Message) -> None:
    assert decode(encode(msg)) == msg


def _flat(datagrams: list[bytes]) -> list[Message]:
    return [m for d in datagrams for m in unpack(d)]


@settings(max_examples=200, deadline=None)
@given(hs.lists(_messages.filter(lambda m: not isinstance(m, Sync)), max_size=40))
def test_a_batch_packs_within_the_budget_in_order(msgs: list[Message]) -> None:
    datagrams = pack(msgs, 600)
    assert all(len(d) <= 600 for d in datagrams)
    back = _flat(datagrams)
    assert [type(m) for m in back] == [type(m) for m in msgs]
    for sent, got in zip(msgs, back, strict=True):  # updates: a prefix, kept in order
        assert not isinstance(sent, Sync) and not isinstance(got, Sync)
        assert got.updates == sent.updates[: len(got.updates)]


# compound packing -------------------------------------------------------------------


def test_small_messages_share_one_datagram() -> None:
    msgs = [Ack(f"b{i}", "10.0.0.9:8401", i) for i in range(20)]
    [datagram] = pack(msgs)
    assert unpack(datagram) == msgs


def test_many_messages_split_into_as_many_datagrams_as_needed() -> None:
    msgs: list[Message] = [Gossip("b0", "10.0.0.1:8401", (upd(i), upd(i + 1))) for i in range(60)]
    datagrams = pack(msgs)
    assert len(datagrams) > 1
    assert all(len(d) <= DATAGRAM_BUDGET for d in datagrams)
    assert _flat(datagrams) == msgs  # nothing trimmed: each fits a datagram of its own
    # greedy: each datagram but the last could not take the next message
    sizes = [len(encode(m)) + 1 for m in msgs]
    assert len(datagrams) <= sum(sizes) // (DATAGRAM_BUDGET - 4) + 1


def test_an_exact_fit_is_kept_and_one_byte_more_is_not() -> None:
    [d] = pack([Nack("b3", "a:1", 2)])
    assert pack([Nack("b3", "a:1", 2)], len(d)) == [d]
    with pytest.raises(ValueError, match="does not fit"):
        pack([Nack("b3", "a:1", 2)], len(d) - 1)


# trimming ---------------------------------------------------------------------------


def test_piggybacked_updates_are_trimmed_keeping_the_first() -> None:
    many = tuple(upd(i) for i in range(100))  # ~ 4 KB of rumours
    ping = Ping("b0", "10.0.0.1:8401", 9, "b1", many)
    [datagram] = pack([ping])
    assert len(datagram) <= DATAGRAM_BUDGET
    [got] = unpack(datagram)
    assert isinstance(got, Ping) and (got.seq, got.target) == (9, "b1")
    assert 0 < len(got.updates) < 100 and got.updates == many[: len(got.updates)]
    # as many as fit: one more would not
    one_more = Ping("b0", "10.0.0.1:8401", 9, "b1", many[: len(got.updates) + 1])
    assert len(codec._compound([encode(one_more)])) > DATAGRAM_BUDGET


def test_a_full_message_goes_to_a_new_datagram_rather_than_being_trimmed() -> None:
    ack = Ack("b1" * 40, "10.0.0.2:8401", 1)
    big = Gossip("b0", "10.0.0.1:8401", tuple(upd(i) for i in range(24)))
    assert len(encode(big)) < DATAGRAM_BUDGET - 4 < len(encode(big)) + len(encode(ack))
    datagrams = pack([ack, big, ack])
    assert len(datagrams) == 3 and _flat(datagrams) == [ack, big, ack]


def test_a_sync_is_never_trimmed() -> None:
    view = Sync("b0", "10.0.0.1:8401", tuple(upd(i) for i in range(100)), True)
    with pytest.raises(ValueError, match="push-pull"):
        pack([view])
    assert decode(encode(view)) == view  # over HTTP, whole


# bad bytes --------------------------------------------------------------------------

BAD = [
    b"",
    b"\xff\xfe\x00garbage",
    b"[1,",
    b"{}",
    b"[]",
    b"[2]",
    b"[true]",
    b"[1.0]",
    b'[1,["x","a","b",[]]]',
    b'[1,["n","a","b",1]]',
    b'[1,["n","a","b",-1,[]]]',
    b'[1,["n","a","b",true,[]]]',
    b'[1,["n","a","b",1.5,[]]]',
    b'[1,["n",1,"b",1,[]]]',
    b'[1,["n","a","b",1,{}]]',
    b'[1,["n","a","b",1,[["i","a",1,1,"z","o"]]]]',
    b'[1,["n","a","b",1,[["i","a",1,1,"a"]]]]',
    b'[1,["s","a","b",2,[]]]',
    b'[1,["s","a","b",true,[]]]',
    b'[1,["n","a","b",' + b"9" * 5000 + b",[]]]",
    b'[1,["n","a","b",1e400,[]]]',
    b'[1,["n","a","b",NaN,[]]]',
    b"[" * 5000,
    b"[1," + b"[" * 5000 + b"]" * 5000 + b"]",
    b"[1,[]]",
    b"[1,null]",
]


@pytest.mark.parametrize("data", BAD, ids=lambda d: repr(d[:24]))
def test_bad_bytes_are_one_clear_error(data: bytes) -> None:
    with pytest.raises(BadMessage) as caught:
        unpack(data)
    assert isinstance(caught.value, BranchdError) and caught.value.code == "bad_message"


@settings(max_examples=500, deadline=None)
@given(hs.binary(max_size=200))
def test_random_bytes_never_raise_anything_else(data: bytes) -> None:
    with contextlib.suppress(BadMessage):
        unpack(data)


@settings(max_examples=300, deadline=None)
@given(_messages, hs.data())
def test_a_mangled_datagram_is_bad_or_a_message(msg: Message, data: hs.DataObject) -> None:
    raw = bytearray(codec._compound([encode(msg)]))
    i = data.draw(hs.integers(0, len(raw) - 1))
    raw[i] = data.draw(hs.integers(0, 255))
    cut = data.draw(hs.integers(0, len(raw)))
    for candidate in (bytes(raw), bytes(raw[:cut])):
        try:
            got = unpack(candidate)
        except BadMessage:
            continue
        assert all(isinstance(m, Ping | Ack | PingReq | Nack | Gossip | Sync) for m in got)


def test_a_message_kind_is_json_of_arrays() -> None:
    assert json.loads(encode(EVERY[0]))[0] == "p"
