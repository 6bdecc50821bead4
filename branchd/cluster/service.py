"""The cluster as the daemon runs it: gossip on UDP, push-pull and peer calls
over HTTP, joins, this branch's record on the gossip, and the directory.

``ClusterService`` is built by ``daemon.py`` when the branch clusters (a
key or a join, ``ClusterSection.enabled``); a cluster of one builds none.
It owns:

- the ``Gossip`` service on a ``UdpTransport``, its periodic push-pulls
  carried over HTTP to the member's API (``POST /v1/cluster/peer``): a whole
  view of a thousand members does not fit a datagram;
- the *peer channel*: one route, every body sealed with the cluster key
  (AES-GCM, timestamped, replay-checked, like every datagram), carrying
  ``sync`` (push-pull), ``record`` (a branch's whole record), the key
  operations and the declarations' ``decl.*`` (``replica.py``); without a
  key (loopback only) it is plain and needs the token;
- joins: ``--join`` URLs (and what discovery finds) are tried with backoff
  until one answers, and again whenever this branch finds itself alone
  (DNS names are re-resolved at each try);
- this branch's record on the gossip: its meta (``record.to_meta``) is set
  on every refresh of the branch service and on every instance change;
- the instance names across the cluster (``names.py``): another branch's
  fetched when its digest changes, a new name's reservation, a name found
  on two branches; and the running Celery workers of each app on the other
  branches (``running_elsewhere``; ``on_running`` is told of each app whose
  count changed), over which the app's rate limits are split;
- the keyring, kept in ``<state dir>/cluster-keys`` (0600) so that a
  rotation outlives a restart; each key operation is carried out here and
  on every live member, one call per step.

The API reads it through the ``Cluster`` Protocol of ``api/backend.py``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from branchd.clock import Scheduler
from branchd.cluster import codec, seal
from branchd.cluster.gossip import Gossip, MemberView
from branchd.cluster.keyring import Keyring, parse_key
from branchd.cluster.messages import MemberState, Sync
from branchd.cluster.names import Holder, Holdings, Names
from branchd.cluster.peerhttp import PeerHttp
from branchd.cluster.record import Meta, from_meta, to_meta
from branchd.cluster.replica import OPS as DECL_OPS
from branchd.cluster.replica import DeclarationSync, Declared
from branchd.cluster.timing import MembershipConfig
from branchd.cluster.transport import UdpTransport
from branchd.errors import BadMessage, BadRequest, BranchdError, Forbidden, NotFound
from branchd.events import EventBus
from branchd.views import PROOF_HEADER, BranchRecord

if TYPE_CHECKING:
    import ssl

log = logging.getLogger(__name__)

#: The one route of the peer channel.
PEER_PATH = "/v1/cluster/peer"
#: How long a peer call may take (a push-pull of a large view included).
PEER_TIMEOUT = 5.0
#: The names of other branches' instances are checked when a member changed
#: (its meta, its state) or our record did, at most once per NAMES_EVERY,
#: and at least once per NAMES_IDLE (a fetch that failed is tried again): a
#: look at each member's meta (read once per new meta), a fetch only when
#: its digest changed; so a new instance (or a worker that starts or stops)
#: elsewhere is known here within NAMES_EVERY once its new meta has come,
#: and an idle cluster does not look five times a second for nothing.
NAMES_EVERY = 0.2
NAMES_IDLE = 2.0


class PeerClient(Protocol):
    """Posts one peer-channel body to a branch's API and returns its answer's body."""

    async def post(self, api_url: str, body: bytes) -> bytes: ...
    async def close(self) -> None: ...


class HttpPeerClient:
    """The peer channel over HTTP (``peerhttp``: not aiohttp's client, whose
    modules a clustered branch would otherwise carry for this alone)."""

    def __init__(self, token: str | None, tls: ssl.SSLContext | None = None) -> None:
        self._token = token
        #: With TLS on: https only, the peer's certificate verified by this
        #: context (the cluster CA, or the system's store).
        self._tls = tls
        self._http = PeerHttp(tls)

    async def post(self, api_url: str, body: bytes) -> bytes:
        if self._tls is not None and not api_url.lower().startswith("https://"):
            raise PeerRefused(f"{api_url} is plain http; this branch calls its peers over TLS only")
        headers = {"Content-Type": "application/octet-stream"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        url = api_url.rstrip("/") + PEER_PATH
        status, data = await self._http.post(url, body, headers, PEER_TIMEOUT)
        if status != 200:
            raise PeerRefused(f"{url} answered {status}: {data[:200]!r}")
        return data

    async def close(self) -> None:
        await self._http.close()


class PeerRefused(Exception):
    """A peer answered, but not with what was asked (wrong key, a 4xx)."""


@dataclass(frozen=True)
class Settings:
    """What the service needs of the configuration, resolved by the daemon."""

    branch_id: str
    epoch: int
    gossip_bind: str  # HOST:PORT the UDP socket binds
    gossip_advertise: str | None  # what others dial (None: the socket's address)
    join: tuple[str, ...]
    membership: MembershipConfig
    join_retry_max: float = 30.0
    keys_path: Path | None = None


def load_keyring(path: Path, given: str | None) -> Keyring | None:
    """The keyring kept in ``path`` (a rotation outlives a restart), with the
    ``--cluster-key`` given installed in it if missing; without a file, a
    keyring of the given key; None without either."""
    from branchd.state import read_token  # (a small file reader, no token semantics)

    text = read_token(path)
    if text is None:
        return Keyring.of(parse_key(given)) if given else None
    try:
        v = json.loads(text)
        keys = tuple(parse_key(k) for k in v["keys"])
        ring = Keyring(keys, str(v["primary"]))
    except (ValueError, KeyError, TypeError, BranchdError) as exc:
        raise BadMessage(f"{path} is not a keyring ({exc}); remove it to start over") from None
    if given:
        key = parse_key(given)
        if ring.get(key.id) is None:
            log.info("installing the given cluster key %s beside the kept ones", key.id)
            ring = ring.install(key)
    return ring


def save_keyring(path: Path, ring: Keyring) -> None:
    from branchd.state import write_private

    body = {"primary": ring.primary, "keys": [k.text() for k in ring.keys]}
    write_private(path, json.dumps(body) + "\n")


#: A record is told again at least this often (s), changed or not much.
TELL_AT_LEAST_EVERY = 60.0
def worth_telling(told: BranchRecord, now: BranchRecord, since: float) -> bool:
    """Whether ``now`` differs enough from the record last ``told`` (``since``
    seconds ago) to be a new rumour: where it is reached, what it holds, a
    draining flag, a load moved by a quarter or a tenth, free memory by 5 %
    of the total; and, whatever it is, once every ``TELL_AT_LEAST_EVERY``."""
    a, b = told.capacity, now.capacity
    if since >= TELL_AT_LEAST_EVERY:
        return True
    def where_and_what(r: BranchRecord) -> tuple[object, ...]:
        c = r.capacity
        where = (r.api_url, r.gossip_addr, r.version)
        held = (r.instances, r.running)
        return (*where, *held, c.max_instances, c.slots, c.slots_used, c.draining, c.cpus)

    if where_and_what(told) != where_and_what(now) or a.instances != b.instances:
        return True
    if abs(a.load[0] - b.load[0]) > max(0.25, 0.1 * a.load[0]):
        return True
    return abs(a.memory_free - b.memory_free) > 0.05 * max(a.memory_total, b.memory_total, 1)


async def sleep(scheduler: Scheduler, seconds: float) -> None:
    """Wait on the scheduler (a fake one in tests)."""
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    timer = scheduler.call_at(scheduler.clock.monotonic() + seconds, wake)
    try:
        await fut
    finally:
        timer.cancel()


class ClusterService:
    def __init__(
        self,
        settings: Settings,
        *,
        scheduler: Scheduler,
        bus: EventBus,
        record: Callable[[], BranchRecord],
        keyring: Keyring | None,
        client: PeerClient,
        declarations: Declared | None = None,
        holdings: Holdings | None = None,
    ) -> None:
        self._s = settings
        self._sched = scheduler
        self._clock = scheduler.clock
        self._bus = bus
        self._record = record
        self._keyring = keyring
        self._client = client
        self._seen = seal.Seen()  # the peer channel's replay window
        self._seen_meta: dict[str, tuple[str, float]] = {}  # id: (meta, when it came)
        self._metas: dict[str, tuple[str, Meta | None]] = {}  # id: (meta, read)
        self._said: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._pending_urls: list[str] = []
        self._join_wake = asyncio.Event()
        self._names_wake = asyncio.Event()
        self._dropped = 0
        self._started = self._clock.monotonic()
        self._announced: tuple[BranchRecord, float] | None = None
        #: Who holds which instance name; reservations; collisions.
        self.names = Names(self, scheduler.clock, holdings)
        #: Told of each app whose count of running workers on the other
        #: branches changed (after a names step): the app's rate limits are
        #: split anew. Set by whoever listens.
        self.on_running: Callable[[str], None] | None = None
        self.gossip = Gossip(
            settings.branch_id,
            settings.gossip_advertise,
            settings.epoch,
            lambda receiver, refusal: UdpTransport.open(
                settings.gossip_bind, receiver, refusal=refusal
            ),
            scheduler,
            settings.membership,
            keyring,
            bus,
            push_pull=self._push_pull,
            meta=to_meta(record()),
        )
        self.gossip.on_change = self._names_wake.set
        #: Apps and queues on every branch (none: a test's cluster of records alone).
        self.declarations = (
            DeclarationSync(
                declarations, call=self.call, peers=self._peers, scheduler=scheduler, bus=bus
            )
            if declarations is not None
            else None
        )

    # life ------------------------------------------------------------------------

    @property
    def gossip_addr(self) -> str | None:
        return self.gossip.address

    @property
    def sealed(self) -> bool:
        """Peer calls are sealed with the cluster key (else they need the token)."""
        return self._keyring is not None

    async def start(self) -> None:
        self._started = self._clock.monotonic()
        try:
            await self.gossip.start(())
        except OSError as exc:
            raise BadRequest(
                f"cannot bind the gossip on {self._s.gossip_bind}: {exc.strerror}"
            ) from None
        self.announce()
        self._tasks.append(asyncio.create_task(self._join_loop(), name="cluster-join"))
        self._tasks.append(asyncio.create_task(self._names_loop(), name="cluster-names"))
        if self.declarations is not None:
            self.declarations.start()

    def announce(self) -> None:
        """Our record changed: put its meta on the gossip when the change
        matters (``worth_telling``), since each new meta is a rumour every
        member hears: a load that moves by a hundredth every 5 s would cost
        each branch a burst of gossip packets per refresh for nothing."""
        self._names_wake.set()  # our names may now collide with another's
        try:
            rec = self._record()
            now = self._clock.monotonic()
            last = self._announced
            if last is not None and not worth_telling(last[0], rec, now - last[1]):
                return
            self.gossip.set_meta(to_meta(rec))
            self._announced = (rec, now)
        except Exception as exc:
            self._once("announce", exc)

    def join(self, urls: Iterable[str]) -> None:
        """Join through these API URLs too (discovery's finds): tried soon."""
        for url in urls:
            if url != self._record().api_url and url not in self._pending_urls:
                self._pending_urls.append(url)
                self._join_wake.set()

    async def leave(self, timeout: float = 3.0) -> bool:
        return await self.gossip.leave(timeout)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.declarations is not None:
            await self.declarations.close()
        self.gossip.close()
        await self._client.close()

    # reading ---------------------------------------------------------------------

    def members(self) -> tuple[MemberView, ...]:
        return self.gossip.members()

    def branches(self) -> list[dict[str, Any]]:
        """Every member known, as ``GET /v1/branches`` lists them."""
        return [self._entry(m, names=False) for m in self.gossip.members()]

    def branch(self, branch_id: str) -> dict[str, Any]:
        for m in self.gossip.members():
            if m.id == branch_id or (branch_id == "self" and m.is_self):
                entry = self._entry(m, names=True)
                if m.is_self:
                    entry["gossip"] = self.counters()
                return entry
        raise NotFound(f"no branch {branch_id!r} is known here")

    def counters(self) -> dict[str, Any]:
        """What this branch's gossip sent, got and dropped, and the peer calls
        it refused (not sealed with a key held here): its own entry shows it."""
        st = self.gossip.stats()
        return {
            "datagrams_sent": st.datagrams_sent,
            "datagrams_received": st.datagrams_received,
            "bytes_sent": st.transport.bytes_sent,
            "bytes_received": st.transport.bytes_received,
            # datagrams whose peer's host answered that nothing listens there
            "datagrams_refused": st.transport.refused,
            "dropped": dict(st.dropped),
            "bad_messages": st.bad_messages,
            "peer_calls_dropped": self._dropped,
            # instance names found on this branch and another, and copies given up here
            "name_collisions": self.names.collisions,
            "copies_given_up": self.names.given_up,
        }

    def alive(self) -> list[BranchRecord]:
        """The live branches' records, this one included (placement reads it)."""
        out = []
        for m in self.gossip.members():
            if m.state is MemberState.ALIVE:
                rec = self._record_of(m)
                if rec is not None:
                    out.append(rec)
        return out

    def owner_of(self, app: str, name: str) -> str | None:
        """The id of the live branch that holds instance ``app/name``, if known:
        this branch first, whose own record is never stale (another's names
        may still list an instance just moved here from it, or just removed)."""
        key = f"{app}/{name}"
        if key in self._record().instances:
            return self.self_id
        for rec in self.alive():
            if key in rec.instances:
                return rec.id
        return None

    async def reserve(self, app: str, name: str) -> None:
        """Reserve ``app/name`` for a create through this branch (``names.py``)."""
        await self.names.reserve(app, name)

    def running_elsewhere(self, app: str) -> int:
        """How many of ``app``'s Celery workers run on the other branches, as
        their records said at the last names step (alive and suspect ones: a
        suspect branch's workers most likely still take tasks)."""
        return self.names.elsewhere(app)

    # what the names need of the membership (names.Members) ---------------------------

    def holders(self) -> list[Holder]:
        out = []
        for m in self.gossip.members():
            if m.is_self or m.state is not MemberState.ALIVE:
                continue
            meta = self._meta(m)
            if meta is not None and meta.api_url:
                out.append(Holder(m.id, meta.api_url, meta.digest))
        return out

    def live_ids(self) -> list[str]:
        return [m.id for m in self.gossip.members() if m.state is MemberState.ALIVE]

    def own_names(self) -> tuple[str, ...]:
        return self._record().instances

    def draining(self) -> bool:
        return self._record().capacity.draining

    def _peers(self) -> list[tuple[str, str]]:
        """The live members but this one whose API is known: (id, API URL)."""
        out = []
        for m in self.gossip.members():
            if m.is_self or m.state is not MemberState.ALIVE:
                continue
            meta = self._meta(m)
            if meta is not None and meta.api_url:
                out.append((m.id, meta.api_url))
        return out

    def _record_of(self, m: MemberView) -> BranchRecord | None:
        if m.is_self:
            return self._record()
        meta = self._meta(m)
        if meta is None:
            return None
        # names fetched for an older digest are used until the new ones come
        # (within one names step): all but the one just made or removed are
        # right, and without them none of its instances would be found
        names = self.names.names_of(m.id, meta.digest)
        known = names or self.names.known(m.id)
        return meta.record(m.id, m.epoch, m.addr, known, self.names.running_of(m.id))

    def _meta(self, m: MemberView) -> Meta | None:
        """``m``'s meta, read once per new meta (every request and every names
        step looks at every member's)."""
        if not m.meta:
            return None
        known = self._metas.get(m.id)
        if known is not None and known[0] == m.meta:
            return known[1]
        try:
            meta: Meta | None = from_meta(m.meta)
        except BadMessage as exc:
            self._once(f"meta:{m.id}", exc)
            meta = None
        self._metas[m.id] = (m.meta, meta)
        return meta

    def _entry(self, m: MemberView, *, names: bool) -> dict[str, Any]:
        now = self._clock.monotonic()
        rec = self._record_of(m)
        if m.is_self:
            age = max(0.0, self._clock.wall() - rec.refreshed) if rec and rec.refreshed else 0.0
        else:
            seen = self._seen_meta.get(m.id)
            if seen is None or seen[0] != m.meta:
                self._seen_meta[m.id] = seen = (m.meta, now)
            age = now - seen[1]
        entry: dict[str, Any] = {
            "id": m.id,
            "state": m.state.value,
            "incarnation": m.incarnation,
            "epoch": m.epoch,
            "gossip_addr": m.addr,
            "self": m.is_self,
            "age": round(age, 1),
            # (our own run's start is this service's: the core's clock starts at 0)
            "since": round(now - (self._started if m.is_self else m.since), 1),
        }
        if rec is not None:
            body = rec.to_json()
            body.pop("gossip_addr", None)
            body.pop("epoch", None)
            if not names:
                body.pop("instances", None)
                body.pop("running", None)
            elif not m.is_self and self.names.names_of(m.id, from_meta(m.meta).digest) is None:
                body["instances_stale"] = True  # not fetched yet
            entry.update(body)
        else:
            entry.update({"api_url": "", "hostname": "", "version": "", "capacity": None})
        return entry

    # forwarding: who answers, and the proof that a member asks ---------------------

    @property
    def self_id(self) -> str:
        return self._s.branch_id

    def api_url_of(self, branch: str) -> tuple[str | None, str]:
        for m in self.gossip.members():
            if m.id == branch:
                meta = self._meta(m) if not m.is_self else None
                url = self._record().api_url if m.is_self else (meta.api_url if meta else None)
                return url or None, m.state.value
        return None, "unknown"

    def others_alive(self) -> list[str]:
        members = self.gossip.members()
        return [m.id for m in members if m.state is MemberState.ALIVE and not m.is_self]

    def prove(self, method: str, path: str, body: bytes) -> dict[str, str]:
        """``X-Branchd-Forwarded``: the request's method, path and body digest
        sealed with the cluster key (timestamped, with a nonce); none without
        a key (the branches then share the token)."""
        if self._keyring is None:
            return {}
        claim = json.dumps(
            {"m": method, "p": path, "b": hashlib.sha256(body).hexdigest(), "f": self.self_id},
            separators=(",", ":"),
        ).encode()
        frame = seal.seal(self._keyring, claim, self._clock.wall(), secrets.token_bytes(12))
        return {PROOF_HEADER: base64.b64encode(frame).decode()}

    def verify(self, proof: str, method: str, path: str, body: bytes) -> bool:
        """A forwarded request's proof opens with a key held here, is fresh
        and unseen, and names this very request."""
        if self._keyring is None:
            return False
        try:
            frame = base64.b64decode(proof, validate=True)
        except ValueError:
            return False
        opened = seal.unseal(self._keyring, frame, self._clock.wall(), self._seen)
        if isinstance(opened, seal.Dropped):
            self._dropped += 1
            return False
        payload, self._seen = opened
        try:
            claim = json.loads(payload)
        except ValueError:
            return False
        return isinstance(claim, dict) and (claim.get("m"), claim.get("p"), claim.get("b")) == (
            method,
            path,
            hashlib.sha256(body).hexdigest(),
        )

    # the peer channel: the answering side ------------------------------------------

    def peer(self, body: bytes) -> bytes:
        """Answer one peer-channel body (the API's ``POST /v1/cluster/peer``)."""
        request = self._open(body)
        op, args = request.get("op"), request.get("args", {})
        if not isinstance(args, dict):
            raise BadRequest("peer call: args must be an object")
        answer: Any
        match op:
            case "sync":
                msg = codec.decode(json.dumps(args.get("message")).encode())
                if not isinstance(msg, Sync):
                    raise BadRequest("peer call sync: the message is not a push-pull")
                answer = {"message": json.loads(codec.encode(self.gossip.exchange(msg)))}
            case "record":
                answer = {"record": self._record().to_json()}
            case "reserve":
                app, name, by = (str(args.get(k, "")) for k in ("app", "name", "by"))
                answer = {"ok": self.names.reserve_here(app, name, by)}
            case "copy":
                answer = self.names.copy(str(args.get("app", "")), str(args.get("name", "")))
            case op if op in DECL_OPS and self.declarations is not None:
                answer = self.declarations.answer(op, args)
            case "keys":
                answer = self.local_keys()
            case "keys.install":
                answer = self.local_install(str(args.get("key", "")))
            case "keys.use":
                answer = self.local_use(str(args.get("id", "")))
            case "keys.remove":
                answer = self.local_remove(str(args.get("id", "")))
            case _:
                raise BadRequest(f"peer call: unknown op {op!r}")
        return self._close(answer)

    def _open(self, body: bytes) -> dict[str, Any]:
        payload = body
        if self._keyring is not None:
            opened = seal.unseal(self._keyring, body, self._clock.wall(), self._seen)
            if isinstance(opened, seal.Dropped):
                self._dropped += 1
                raise Forbidden(
                    f"peer call dropped: {opened.reason.value} (not sealed with a cluster "
                    "key held here)"
                )
            payload, self._seen = opened
        try:
            v = json.loads(payload)
        except ValueError:
            raise BadRequest("peer call: the body is not JSON") from None
        if not isinstance(v, dict):
            raise BadRequest("peer call: the body is not an object")
        return v

    def _close(self, answer: Any) -> bytes:
        data = json.dumps(answer, separators=(",", ":")).encode()
        if self._keyring is None:
            return data
        return seal.seal(self._keyring, data, self._clock.wall(), secrets.token_bytes(12))

    # the peer channel: the calling side --------------------------------------------

    async def call(self, api_url: str, op: str, args: dict[str, Any]) -> Any:
        data = self._close({"op": op, "args": args})
        answer = await self._client.post(api_url, data)
        if self._keyring is not None:
            opened = seal.unseal(self._keyring, answer, self._clock.wall(), self._seen)
            if isinstance(opened, seal.Dropped):
                raise PeerRefused(f"the answer of {api_url} dropped: {opened.reason.value}")
            answer, self._seen = opened
        return json.loads(answer)

    def _push_pull(self, addr: str, sync: Sync) -> Awaitable[Sync] | None:
        view = next((m for m in self.gossip.members() if m.addr == addr), None)
        meta = self._meta(view) if view is not None else None
        if meta is None or not meta.api_url:
            return None  # no API known for it: datagrams
        return self._sync_with(meta.api_url, sync)

    async def _sync_with(self, api_url: str, sync: Sync) -> Sync:
        answer = await self.call(api_url, "sync", {"message": json.loads(codec.encode(sync))})
        msg = codec.decode(json.dumps(answer["message"]).encode())
        if not isinstance(msg, Sync):
            raise BadMessage(f"{api_url} answered a push-pull with {type(msg).__name__}")
        return msg

    # joining -----------------------------------------------------------------------

    async def _join_once(self, urls: list[str]) -> bool:
        joined = False
        for url in urls:
            try:
                self.gossip.merge(await self._sync_with(url, self.gossip.own_view()))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._once(f"join:{url}:{type(exc).__name__}", exc, f"cannot join via {url}")
                continue
            log.info("joined the cluster via %s", url)
            joined = True
        return joined

    def _alone(self) -> bool:
        return not any(
            m.state in (MemberState.ALIVE, MemberState.SUSPECT)
            for m in self.gossip.members()
            if not m.is_self
        )

    def _known(self, url: str) -> bool:
        """A live member already answers at this API URL."""
        for m in self.gossip.members():
            meta = self._meta(m) if not m.is_self else None
            if m.is_self and url == self._record().api_url:
                return True
            if meta is not None and meta.api_url == url and m.state is MemberState.ALIVE:
                return True
        return False

    async def _join_loop(self) -> None:
        """The ``--join`` URLs while alone (at the start, and whenever all the
        others are gone), and each URL discovery found that is not a member."""
        backoff = 1.0
        while True:
            found, self._pending_urls = self._pending_urls, []
            urls = [u for u in found if not self._known(u)]
            if self._alone():
                urls += [u for u in self._s.join if u not in urls]
            wait = self._s.join_retry_max
            if urls:
                joined = await self._join_once(urls)
                if not joined and self._alone():
                    # nobody answered: try again soon, the found ones too
                    self._pending_urls[:0] = [u for u in found if u not in self._pending_urls]
                    backoff = min(backoff * 2, self._s.join_retry_max)
                    wait = backoff
                else:
                    backoff = 1.0
            self._join_wake.clear()
            if self._pending_urls and wait == self._s.join_retry_max:
                continue  # found while we were joining
            await _first(sleep(self._sched, wait), self._join_wake.wait())

    # the names of other branches' instances -------------------------------------------

    async def _names_loop(self) -> None:
        while True:
            try:
                await self._names_step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._once("names", exc)
            await sleep(self._sched, NAMES_EVERY)
            if not self._names_wake.is_set():
                await _first(
                    sleep(self._sched, NAMES_IDLE - NAMES_EVERY), self._names_wake.wait()
                )
            self._names_wake.clear()

    async def _names_step(self) -> None:
        """Fetch the names of those whose digest changed, then look for names
        held twice."""
        for holder in self.holders():
            try:
                await self.names.fetch(holder)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                cause = f"record:{holder.id}:{type(exc).__name__}"
                self._once(cause, exc, f"cannot fetch {holder.id}")
        known = {m.id for m in self.gossip.members()}
        self.names.forget_others_than(known)
        for gone in set(self._metas) - known:
            del self._metas[gone]
        self._recount()
        await self.names.check()

    def _recount(self) -> None:
        """Count each app's workers running elsewhere; tell ``on_running`` of
        each app whose count changed (a worker started or stopped there, a
        branch came, died or left)."""
        counted = [
            m.id
            for m in self.gossip.members()
            if not m.is_self and m.state in (MemberState.ALIVE, MemberState.SUSPECT)
        ]
        for app in self.names.recount(counted):
            if self.on_running is None:
                continue
            try:
                self.on_running(app)
            except Exception as exc:  # a listener's failure is its own
                self._once(f"on_running:{type(exc).__name__}", exc, "re-splitting the rates")

    # keys ----------------------------------------------------------------------------

    def _ring(self) -> Keyring:
        if self._keyring is None:
            raise NotFound("this cluster has no key (started without --cluster-key)")
        return self._keyring

    def local_keys(self) -> dict[str, Any]:
        ring = self._ring()
        return {"primary": ring.primary, "keys": list(ring.ids)}

    def _set_ring(self, ring: Keyring) -> None:
        if ring is self._keyring:
            return
        self._keyring = ring
        self.gossip.use_keyring(ring)
        if self._s.keys_path is not None:
            save_keyring(self._s.keys_path, ring)

    def local_install(self, text: str) -> dict[str, Any]:
        self._set_ring(self._ring().install(parse_key(text)))
        return self.local_keys()

    def local_use(self, key_id: str) -> dict[str, Any]:
        self._set_ring(self._ring().use(key_id))
        return self.local_keys()

    def local_remove(self, key_id: str) -> dict[str, Any]:
        self._set_ring(self._ring().remove(key_id))
        return self.local_keys()

    async def keys(self) -> dict[str, Any]:
        """Every key and how many live branches hold it, and use it as primary."""
        self._ring()
        answers = await self._everywhere("keys", {})
        held: dict[str, dict[str, int]] = {}
        for a in answers.values():
            if isinstance(a, dict):
                for kid in a["keys"]:
                    row = held.setdefault(kid, {"installed": 0, "primary": 0})
                    row["installed"] += 1
                    row["primary"] += int(a["primary"] == kid)
        return {
            "items": [{"id": k, **v} for k, v in sorted(held.items())],
            "branches": len(answers),
            "errors": {b: a for b, a in answers.items() if isinstance(a, str)},
        }

    async def install_key(self, key: str) -> dict[str, Any]:
        """Rotation step 1: install ``key`` here, then on every live member."""
        self.local_install(key)  # here first: a bad key fails here, and goes nowhere
        return await self._step("keys.install", {"key": key})

    async def use_key(self, key_id: str) -> dict[str, Any]:
        """Rotation step 2: seal with ``key_id`` here, then on every live member."""
        self.local_use(key_id)
        return await self._step("keys.use", {"id": key_id})

    async def remove_key(self, key_id: str) -> dict[str, Any]:
        """Rotation step 3: remove ``key_id`` here, then on every live member."""
        self.local_remove(key_id)
        return await self._step("keys.remove", {"id": key_id})

    async def _step(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """What every live branch answered to one key step (ours is done)."""
        answers = await self._everywhere(op, args, skip_self=True)
        answers[self._s.branch_id] = self.local_keys()
        return {
            "branches": {b: ("ok" if isinstance(a, dict) else a) for b, a in answers.items()},
            "keys": self.local_keys(),
        }

    async def _everywhere(
        self, op: str, args: dict[str, Any], *, skip_self: bool = False
    ) -> dict[str, Any]:
        """``op`` on every live branch (this one by a direct call unless
        skipped): its answer, or the text of its failure."""
        out: dict[str, Any] = {}
        calls: dict[str, Awaitable[Any]] = {}
        for m in self.gossip.members():
            if m.state is not MemberState.ALIVE:
                continue
            if m.is_self:
                if not skip_self:
                    out[m.id] = self.local_keys()
                continue
            meta = self._meta(m)
            if meta is None:
                out[m.id] = "its API is not known yet"
                continue
            calls[m.id] = self.call(meta.api_url, op, args)
        results = await asyncio.gather(*calls.values(), return_exceptions=True)
        for mid, result in zip(calls, results, strict=True):
            out[mid] = f"{type(result).__name__}: {result}" if isinstance(
                result, BaseException
            ) else result
        return out

    # failures --------------------------------------------------------------------------

    def _once(self, cause: str, exc: BaseException, what: str = "") -> None:
        first = cause not in self._said
        self._said.add(cause)
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "cluster: %s%s%s",
            what,
            ": " if what else "",
            exc,
        )


async def _first(*aws: Awaitable[Any]) -> None:
    """Wait for the first of ``aws``; cancel the others."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
