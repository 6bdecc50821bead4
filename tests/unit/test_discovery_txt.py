"""The TXT record of a branch's zeroconf announcement (``cluster.discovery``):
written and read back, kept under 200 bytes, and a malformed one refused
with a message that says what is wrong; the addresses zeroconf refuses."""

from __future__ import annotations

import pytest

from branchd.cluster import discovery
from branchd.cluster.discovery import (
    TXT_MAX,
    Announcement,
    Peer,
    ZeroconfDiscovery,
    decode,
    encode,
    multicast_ip,
)
from branchd.errors import BadMessage, ConfigError

ME = Announcement("3f2a9c1e0b7d4e5f8a6b1c2d3e4f5a6b", "0.1.0", 8080, 7946, 1_718_000_000_123)
#: Every field at its longest.
WIDEST = Announcement("x" * 63, "v" * 32, 65535, 65535, 2**64 - 1)


def txt(*strings: bytes) -> bytes:
    return b"".join(bytes((len(s),)) + s for s in strings)


def test_an_announcement_reads_back_as_written() -> None:
    assert decode(encode(ME)) == ME
    assert decode(encode(WIDEST)) == WIDEST


def test_the_record_is_length_prefixed_key_value_strings_led_by_the_layout_version() -> None:
    record = encode(Announcement("b1", "0.1.0", 80, 7946, 5))
    assert record == txt(b"v=1", b"id=b1", b"ver=0.1.0", b"api=80", b"gossip=7946", b"epoch=5")


def test_the_widest_announcement_stays_under_200_bytes() -> None:
    assert TXT_MAX == 200
    assert len(encode(WIDEST)) <= TXT_MAX


def test_a_record_over_the_limit_is_refused_both_ways(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BadMessage, match="201 bytes, over 200"):
        decode(encode(ME) + txt(b"pad=" + b"p" * (201 - len(encode(ME)) - 5)))
    monkeypatch.setattr(discovery, "TXT_MAX", 100)
    with pytest.raises(ValueError, match="over 100"):
        encode(WIDEST)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("id", "", "branch id"),
        ("id", "a.b", "branch id"),
        ("id", "x" * 64, "branch id"),
        ("version", "0.1 beta", "version"),
        ("api_port", 0, "api port"),
        ("gossip_port", 65536, "gossip port"),
        ("epoch", -1, "epoch"),
    ],
)
def test_a_field_that_cannot_be_written_is_refused(field: str, value: object, message: str) -> None:
    fields = {**ME.__dict__, field: value}
    with pytest.raises(ValueError, match=message):
        encode(Announcement(**fields))


GOOD = [b"v=1", b"id=b1", b"ver=0.1.0", b"api=80", b"gossip=7946", b"epoch=5"]


def with_(key: bytes, value: bytes | None) -> bytes:
    """GOOD with ``key`` given ``value`` (None: left out)."""
    strings = [s for s in GOOD if not s.startswith(key + b"=")]
    return txt(*strings, *([key + b"=" + value] if value is not None else []))


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (b"", "without v, id, ver, api, gossip, epoch"),
        (txt(*GOOD)[:-3], "truncated"),
        (txt(*GOOD, b"flag"), "not key=value"),
        (txt(*GOOD, b"=x"), "not key=value"),
        (txt(*GOOD, b"id=b2"), "'id' twice"),
        (txt(*GOOD, b"x=\xff"), "not ASCII"),
        (with_(b"gossip", None), "without gossip"),
        (with_(b"v", b"2"), "v='2', this release reads v=1"),
        (txt(b"v=9", b"who=b1"), "v='9', this release reads v=1"),  # before what is missing
        (with_(b"v", None), "without v"),
        (with_(b"id", b"a b"), "id not a branch id"),
        (with_(b"ver", b""), "ver not a version"),
        (with_(b"api", b"0"), "api not a number in 1-65535"),
        (with_(b"api", b"+80"), "api not a number"),
        (with_(b"gossip", b"\xc2\xb2".decode().encode("utf-8")), "not ASCII"),
        (with_(b"gossip", b"70000"), "gossip not a number"),
        (with_(b"epoch", b"-5"), "epoch not a number"),
        (with_(b"epoch", b"1" * 21), "epoch not a number"),
    ],
)
def test_a_malformed_record_is_refused_with_what_is_wrong(record: bytes, message: str) -> None:
    with pytest.raises(BadMessage, match=message.replace("(", r"\(").replace("+", r"\+")):
        decode(record)


def test_keys_of_a_later_release_are_ignored() -> None:
    assert decode(txt(*GOOD, b"zone=eu", b"draining=")) == Announcement("b1", "0.1.0", 80, 7946, 5)


def test_a_peer_is_reached_at_the_announced_ports_of_the_address_found() -> None:
    peer = Peer.of(ME, "10.213.0.2")
    assert peer.id == ME.id and peer.epoch == ME.epoch and peer.version == "0.1.0"
    assert peer.api_url == "http://10.213.0.2:8080"
    assert peer.gossip_addr == "10.213.0.2:7946"


@pytest.mark.parametrize(
    "addr", ["127.0.0.1", "127.1.2.3", "0.0.0.0", "224.0.0.251", "::1", "fe80::1"]
)
def test_zeroconf_refuses_an_address_without_one_multicast_interface(addr: str) -> None:
    with pytest.raises(ConfigError, match="zeroconf"):
        multicast_ip(addr)
    with pytest.raises(ConfigError):
        ZeroconfDiscovery(ME, addr, lambda peer: None)


def test_zeroconf_refuses_a_name_and_takes_a_lan_address() -> None:
    with pytest.raises(ConfigError, match="needs an IP address"):
        multicast_ip("branch-1.local")
    assert multicast_ip("10.213.0.1") == "10.213.0.1"


async def test_start_refuses_an_address_that_is_not_this_host_s() -> None:
    # a documentation address (TEST-NET-3), no interface's here: refused before
    # any socket opens
    service = ZeroconfDiscovery(ME, "203.0.113.77", lambda peer: None)
    with pytest.raises(ConfigError, match="not an address of this host"):
        await service.start()
    await service.close()
