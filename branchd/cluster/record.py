"""A branch's record as it rides on the gossip: its compact *meta*, and back.

Pure: no I/O. Every member carries at most 512 bytes of meta on its alive
rumours (``gossip.META_MAX``), so the meta holds what placement reads
(capacity, draining) and where the branch is reached, but not the names of
its instances nor of its running Celery workers: a digest of both instead,
and whoever wants them fetches the whole record over HTTP when the digest
changes (``service.py``).

The meta is a JSON object of short keys (a packet capture stays readable):

====  ====================================================
u     API URL
h     hostname
v     version
s     started at (wall clock, s)
c     cpu count
l     load averages (1, 5, 15 min; 2 decimals)
mt    memory total (bytes)
mf    memory free (bytes)
n     instances held
x     max instances
sl    slots (pool processes it may run)
su    slots taken by its instances
d     draining (1) or not (absent)
i     digest of the instance names and running workers (8 hex digits)
====  ====================================================
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from branchd.errors import BadMessage
from branchd.views import BranchRecord, Capacity


def names_digest(names: Iterable[str], running: Iterable[str] = ()) -> str:
    """8 hex digits that change when the set of names does, or the set of
    running workers among them. Without running workers it is the digest of
    the names alone, as a branch that does not say which run gossips it."""
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(name.encode())
        h.update(b"\x00")
    up = sorted(running)
    if up:
        h.update(b"\x01")  # (no name holds it: names and running never mix)
        for name in up:
            h.update(name.encode())
            h.update(b"\x00")
    return h.hexdigest()[:8]


def to_meta(record: BranchRecord) -> str:
    """The record's meta (what changes with each refresh: load, free memory)."""
    c = record.capacity
    fields: dict[str, Any] = {
        "u": record.api_url,
        "h": record.hostname[:64],
        "v": record.version[:32],
        "s": round(record.started_at, 3),
        "c": c.cpus,
        "l": [round(x, 2) for x in c.load],
        "mt": c.memory_total,
        "mf": c.memory_free,
        "n": c.instances,
        "x": c.max_instances,
        "sl": c.slots,
        "su": c.slots_used,
        "i": names_digest(record.instances, record.running),
    }
    if c.draining:
        fields["d"] = 1
    return json.dumps(fields, separators=(",", ":"))


@dataclass(frozen=True)
class Meta:
    """A member's meta, read: its record without the instance names."""

    api_url: str
    hostname: str
    version: str
    started_at: float
    capacity: Capacity
    digest: str

    def record(
        self,
        member_id: str,
        epoch: int,
        gossip_addr: str,
        names: tuple[str, ...],
        running: tuple[str, ...] = (),
    ) -> BranchRecord:
        host = self.api_url.split("://", 1)[-1].rstrip("/")
        return BranchRecord(
            id=member_id,
            hostname=self.hostname,
            version=self.version,
            started_at=self.started_at,
            address=host,
            capacity=self.capacity,
            epoch=epoch,
            api_url=self.api_url,
            gossip_addr=gossip_addr,
            instances=names,
            digest=self.digest,
            running=running,
        )


def from_meta(text: str) -> Meta:
    """The meta of a member; ``BadMessage`` if it is not one."""
    try:
        v = json.loads(text)
    except ValueError:
        raise BadMessage("a member's meta is not JSON") from None
    if not isinstance(v, dict):
        raise BadMessage("a member's meta is not an object")
    try:
        load = v["l"]
        if not (isinstance(load, list) and len(load) == 3):
            raise BadMessage("a member's meta: l must be three numbers")
        capacity = Capacity(
            cpus=_int(v["c"]),
            load=(float(load[0]), float(load[1]), float(load[2])),
            memory_total=_int(v["mt"]),
            memory_free=_int(v["mf"]),
            instances=_int(v["n"]),
            max_instances=_int(v["x"]),
            draining=bool(v.get("d", 0)),
            slots=_int(v.get("sl", 0)),
            slots_used=_int(v.get("su", 0)),
        )
        return Meta(
            api_url=_str(v["u"]),
            hostname=_str(v["h"]),
            version=_str(v["v"]),
            started_at=float(v["s"]),
            capacity=capacity,
            digest=_str(v["i"]),
        )
    except KeyError as exc:
        raise BadMessage(f"a member's meta lacks {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise BadMessage(f"a member's meta is malformed: {exc}") from None


def _int(v: object) -> int:
    if type(v) is not int or v < 0:
        raise ValueError(f"{v!r} is not a count")
    return v


def _str(v: object) -> str:
    if not isinstance(v, str):
        raise ValueError(f"{v!r} is not text")
    return v


def record_from_json(v: Any) -> BranchRecord:
    """A whole record as a branch's API writes it (``BranchRecord.to_json``),
    the answer of a record fetch; ``BadMessage`` if it is not one."""
    try:
        c = v["capacity"]
        load = c["load"]
        return BranchRecord(
            id=_str(v["id"]),
            hostname=_str(v["hostname"]),
            version=_str(v["version"]),
            started_at=float(v["started_at"]),
            address=_str(v["address"]),
            capacity=Capacity(
                cpus=_int(c["cpus"]),
                load=(float(load[0]), float(load[1]), float(load[2])),
                memory_total=_int(c["memory_total"]),
                memory_free=_int(c["memory_free"]),
                instances=_int(c["instances"]),
                max_instances=_int(c.get("max_instances", 0)),
                draining=bool(c.get("draining", False)),
                slots=_int(c.get("slots", 0)),
                slots_used=_int(c.get("slots_used", 0)),
            ),
            epoch=_int(v.get("epoch", 0)),
            api_url=_str(v.get("api_url", "")),
            gossip_addr=_str(v.get("gossip_addr", "")),
            instances=tuple(_str(n) for n in v.get("instances", ())),
            # (a branch older than the split across the cluster: none said)
            running=tuple(_str(n) for n in v.get("running", ())),
        )
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise BadMessage(f"not a branch record: {exc!r}") from None
