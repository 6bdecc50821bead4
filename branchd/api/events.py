"""``GET /v1/events``: the event bus as server-sent events.

The journal listens to the bus from the daemon's start (a synchronous
listener: no event is lost to a full queue) and keeps the last
:data:`BACKLOG` events, each numbered ``RUN-SEQ`` (``RUN``: this daemon's
start, in ms; ``SEQ`` from 1). Each stream is a task that reads the journal
from its own position, so a reconnect with ``Last-Event-ID`` gets exactly what
it missed; a position older than the backlog (or from a daemon run before
this one) is told by a ``gap`` event, then the backlog follows.

Cluster-wide: the branch a client asks answers with its own events and
opens, with this branch's proof, one stream to every other live member,
asking each only for its instance events (membership and declarations are
every branch's: this one already tells them). A merged stream's id is a
vector, ``BRANCH=RUN-SEQ,...``: a resume through any branch gives each
member its own position. A member that stops answering is told once by an
``unreachable`` event; members that join later are in the next connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlencode

from aiohttp import web

from branchd import events as ev
from branchd.errors import BadRequest
from branchd.views import HOP_HEADER

#: Events kept for a resume (~300 bytes each: under 1.5 MiB when full).
BACKLOG = 4096
#: A comment this often keeps proxies and idle clients from closing the stream (s).
KEEPALIVE = 15.0
#: How often a quiet stream checks that its client is still there (s): aiohttp
#: does not cancel a handler whose client left.
GONE_CHECK = 1.0

#: The event types a client may ask for (``?types=``).
TYPES = ("instance", "instance_added", "instance_removed", "runtime", "declaration", "member")
#: Those each branch tells of its own instances (a merged stream asks members for these).
LOCAL_TYPES = frozenset({"instance", "instance_added", "instance_removed", "runtime"})
#: Told whatever the filter: how the stream itself is doing.
ALWAYS = frozenset({"gap", "unreachable"})

_ID = re.compile(r"^(\d{1,20})-(\d{1,20})$")
_TYPES_RULE = f"types is a comma-separated list of {', '.join(TYPES)}"
_ID_RULE = "Last-Event-ID must be an id: line this API sent (RUN-SEQ, or BRANCH=RUN-SEQ,...)"


def wire(event: ev.Event, branch: str, time: float) -> dict[str, Any]:
    """An event's JSON form: its ``type``, the branch that saw it, when, and its fields."""
    head = {"branch": branch, "time": round(time, 3)}
    match event:
        case ev.InstanceChanged(app, name, state, pid, reason):
            body = {"type": "instance", "app": app, "name": name, "state": state.value}
            return {**body, "pid": pid, "reason": reason, **head}
        case ev.InstanceAdded(app, name):
            return {"type": "instance_added", "app": app, "name": name, **head}
        case ev.InstanceRemoved(app, name):
            return {"type": "instance_removed", "app": app, "name": name, **head}
        case ev.RuntimeChanged(app, name, what):
            return {"type": "runtime", "app": app, "name": name, "what": what, **head}
        case ev.DeclarationChanged(kind, app, name, deleted, remote):
            body = {"type": "declaration", "kind": kind, "app": app, "name": name}
            return {**body, "deleted": deleted, "remote": remote, **head}
        case ev.MemberChanged(id, addr, state, incarnation, reaped):
            body = {"type": "member", "id": id, "addr": addr, "state": state}
            return {**body, "incarnation": incarnation, "reaped": reaped, **head}
    # an event type newer than this table: told by name (the bus never fails a publisher)
    return {"type": type(event).__name__, **head}


@dataclass(frozen=True)
class Filter:
    """What a client asked for: one app's events, some types (None: all)."""

    app: str | None = None
    types: frozenset[str] | None = None

    def accepts(self, data: Mapping[str, Any]) -> bool:
        kind = data.get("type")
        if kind in ALWAYS:
            return True
        if self.types is not None and kind not in self.types:
            return False
        return self.app is None or data.get("app") == self.app


def parse_filter(query: Mapping[str, str]) -> Filter:
    app = query.get("app") or None
    types: frozenset[str] | None = None
    if "types" in query:
        asked = frozenset(t.strip() for t in query["types"].split(",") if t.strip())
        unknown = sorted(asked - set(TYPES))
        if unknown or not asked:
            raise BadRequest(f"unknown event type {', '.join(unknown) or '(none)'}: {_TYPES_RULE}")
        types = asked
    return Filter(app, types)


def parse_cursor(text: str | None) -> dict[str, str]:
    """A Last-Event-ID as ``{branch: RUN-SEQ}`` (a plain ``RUN-SEQ``: key ``""``)."""
    if text is None or not text.strip():
        return {}
    text = text.strip()
    if "=" not in text:
        if not _ID.match(text):
            raise BadRequest(f"bad Last-Event-ID {text[:80]!r}: {_ID_RULE}")
        return {"": text}
    out = {}
    for part in text.split(","):
        branch, _, pos = part.partition("=")
        if not branch or not _ID.match(pos):
            raise BadRequest(f"bad Last-Event-ID {text[:80]!r}: {_ID_RULE}")
        out[branch] = pos
    return out


def format_cursor(cursor: Mapping[str, str]) -> str:
    return ",".join(f"{b}={p}" for b, p in sorted(cursor.items()))


@dataclass(frozen=True, slots=True)
class Entry:
    """One event of the journal, kept as the event itself (a few slots) and its
    time; its JSON form is made when a stream reads it (the same, ``wire`` being
    pure): a backlog of dicts cost about 0.4 KiB an event, up to 1.5 MiB when
    full (issue 10, part 9)."""

    seq: int
    event: ev.Event
    branch: str
    time: float

    @property
    def data(self) -> dict[str, Any]:
        return wire(self.event, self.branch, self.time)


class Journal:
    """The last ``size`` events of this branch, numbered; streams wait on it."""

    def __init__(
        self, branch: str, run: int, clock: Callable[[], float], size: int = BACKLOG
    ) -> None:
        self.branch = branch
        self.run = run
        self._clock = clock
        self._entries: deque[Entry] = deque(maxlen=size)
        self._last = 0
        self._tick = asyncio.Event()
        #: streams connected now (the metrics show it)
        self.streams = 0

    @property
    def size(self) -> int:
        return self._entries.maxlen or 0

    @property
    def last(self) -> int:
        return self._last

    @property
    def first(self) -> int:
        """The oldest seq still kept (``last + 1`` when empty)."""
        return self._entries[0].seq if self._entries else self._last + 1

    def append(self, event: ev.Event) -> None:
        self._last += 1
        self._entries.append(Entry(self._last, event, self.branch, self._clock()))
        tick, self._tick = self._tick, asyncio.Event()
        tick.set()  # every stream waiting wakes; later ones wait on the new one

    def id_of(self, seq: int) -> str:
        return f"{self.run}-{seq}"

    def resume(self, position: str | None) -> tuple[int, dict[str, Any] | None]:
        """Where a stream that last saw ``position`` (``RUN-SEQ``) goes on
        (the last seq it saw), and the gap to tell it first, if any."""
        if position is None:
            return self._last, None  # a new stream: from now on
        m = _ID.match(position)
        run, seq = (int(m[1]), int(m[2])) if m else (-1, -1)
        if run != self.run or seq > self._last:
            why = "the daemon restarted" if run != self.run else "an id this run never sent"
            return self.first - 1, self.gap(None, f"{why}: what happened before is lost")
        return seq, None

    def after(self, seq: int) -> tuple[list[Entry], int]:
        """The entries after ``seq``, and how many after it are no longer kept."""
        lost = max(0, self.first - 1 - seq)
        if seq >= self._last:
            return [], lost
        skip = max(0, seq + 1 - self.first)
        return list(itertools.islice(self._entries, skip, None)), lost

    def gap(self, missed: int | None, why: str) -> dict[str, Any]:
        return {
            "type": "gap",
            "branch": self.branch,
            "missed": missed,
            "backlog": self.size,
            "reason": why,
        }

    async def wait(self, seq: int) -> None:
        """Return once an event after ``seq`` is in."""
        while self._last <= seq:
            await self._tick.wait()


@dataclass(frozen=True)
class Message:
    branch: str
    id: str | None  # None: a message about the stream (gap, unreachable)
    #: None: only a position (where the branch's stream starts), no event
    data: Mapping[str, Any] | None


def encode(event_id: str | None, data: Mapping[str, Any] | None) -> bytes:
    """One event; with no data, only an id (a client's resume point: the
    stream's start, dispatched as no event)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    if data is None:
        return f"{head}\n".encode()
    return f"{head}event: {data['type']}\ndata: {json.dumps(data)}\n\n".encode()


async def _local(
    journal: Journal, flt: Filter, position: str | None, out: asyncio.Queue[Message]
) -> None:
    seq, gap = journal.resume(position)
    # where this stream starts, first: a merged stream's id names every
    # member from then on, so a resume misses none that had no event yet
    await out.put(Message(journal.branch, journal.id_of(seq), None))
    if gap is not None:
        await out.put(Message(journal.branch, None, gap))
    while True:
        entries, lost = journal.after(seq)
        if lost:  # this stream fell a whole backlog behind (or resumed too late)
            why = f"older than the backlog of {journal.size} events"
            await out.put(Message(journal.branch, None, journal.gap(lost, why)))
        for entry in entries:
            seq = max(seq, entry.seq)
            data = entry.data
            if flt.accepts(data):
                await out.put(Message(journal.branch, journal.id_of(entry.seq), data))
        seq = max(seq, journal.first - 1)
        await journal.wait(seq)


class Opener(Protocol):
    async def open_get(self, branch: str, path: str, headers: Mapping[str, str]) -> Any:
        """``branch``'s streamed answer (an aiohttp response) to a GET of this branch's own."""
        ...


class Members(Protocol):
    @property
    def self_id(self) -> str: ...
    def others_alive(self) -> list[str]: ...


@dataclass(frozen=True)
class ClusterEvents:
    """What a merged stream needs: the live members, and a way to open theirs."""

    members: Members
    opener: Opener


async def _remote(
    peers: ClusterEvents,
    branch: str,
    flt: Filter,
    position: str | None,
    out: asyncio.Queue[Message],
) -> None:
    types = LOCAL_TYPES if flt.types is None else flt.types & LOCAL_TYPES
    query = urlencode({"types": ",".join(sorted(types)), **({"app": flt.app} if flt.app else {})})
    headers = {"Last-Event-ID": position} if position else {}
    why = "its stream ended"
    try:
        resp = await peers.opener.open_get(branch, f"/v1/events?{query}", headers)
        try:
            if resp.status != 200:
                why = f"it answered {resp.status}"
                return
            event_id: str | None = None
            data = ""
            async for raw in resp.content:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("id: "):
                    event_id = line[4:]
                elif line.startswith("data: "):
                    data = line[6:]
                elif not line and (data or event_id):
                    await out.put(Message(branch, event_id, json.loads(data) if data else None))
                    event_id, data = None, ""
        finally:
            resp.release()
    except Exception as exc:  # (aiohttp's client errors too: told, never raised)
        why = f"{type(exc).__name__}: {exc}"
    finally:
        msg = {"type": "unreachable", "branch": branch, "reason": why}
        with contextlib.suppress(asyncio.QueueFull):
            out.put_nowait(Message(branch, None, msg))


JOURNAL = web.AppKey("journal", Journal)
CLUSTER_EVENTS = web.AppKey("cluster_events", ClusterEvents)
#: The keep-alive interval (tests shorten it).
KEEPALIVE_KEY = web.AppKey("events_keepalive", float)


#: How long a merged stream waits for the members' streams to open (s).
OPEN_DEADLINE = 1.0


async def stream_events(request: web.Request) -> web.StreamResponse:
    journal = request.app[JOURNAL]
    flt = parse_filter(request.query)
    cursor = parse_cursor(request.headers.get("Last-Event-ID"))
    peers = request.app.get(CLUSTER_EVENTS)
    merged = peers is not None and HOP_HEADER not in request.headers
    queue: asyncio.Queue[Message] = asyncio.Queue(256)  # a slow client holds its producers
    tasks = []
    opened = set()  # the members whose streams are opening
    if merged and peers is not None:
        own = cursor.get(journal.branch, cursor.get(""))
        tasks.append(asyncio.ensure_future(_local(journal, flt, own, queue)))
        if flt.types is None or flt.types & LOCAL_TYPES:
            for branch in peers.members.others_alive():
                remote = _remote(peers, branch, flt, cursor.get(branch), queue)
                tasks.append(asyncio.ensure_future(remote))
                opened.add(branch)
    else:
        own = cursor.get("", cursor.get(journal.branch))
        tasks.append(asyncio.ensure_future(_local(journal, flt, own, queue)))
    position = {b: p for b, p in cursor.items() if b}
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # (a proxy in front must not hold events back)
        }
    )
    journal.streams += 1
    try:
        # The members' streams open first (each tells where it starts; a
        # second at most): what happens once the answer's head is out is on
        # the stream, wherever it happens.
        early: list[Message] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(OPEN_DEADLINE):
                while opened:
                    msg = await queue.get()
                    early.append(msg)
                    if msg.data is None or msg.data.get("type") == "unreachable":
                        opened.discard(msg.branch)
        await response.prepare(request)
        await response.write(b": branchd events\n\n")
        loop = asyncio.get_running_loop()
        keepalive = request.app.get(KEEPALIVE_KEY, KEEPALIVE)
        quiet_until = loop.time() + keepalive
        while True:
            if early:
                msg = early.pop(0)
            else:
                try:
                    msg = await asyncio.wait_for(queue.get(), min(GONE_CHECK, keepalive))
                except TimeoutError:
                    if request.transport is None or request.transport.is_closing():
                        break
                    if loop.time() >= quiet_until:
                        await response.write(b": keep-alive\n\n")
                        quiet_until = loop.time() + keepalive
                    continue
            event_id = msg.id
            if merged and event_id is not None:
                position[msg.branch] = event_id
                event_id = format_cursor(position)
            await response.write(encode(event_id, msg.data))
            quiet_until = loop.time() + keepalive
    except ConnectionError:
        pass  # the client left
    finally:
        journal.streams -= 1
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    return response
