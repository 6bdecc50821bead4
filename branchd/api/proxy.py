"""The forwarder of a cluster: the raw request, carried to the branch that
must answer it, and that branch's answer streamed back unchanged.

Nomad's forward-first pattern at the HTTP layer (``api/forward.py`` decides
*whether*; this carries it). The target is always a member's own API URL,
from the membership (a client cannot name it: no open proxy); the request
carries ``X-Branchd-Hop`` (answered there, never forwarded twice) and a
proof that a member sent it (``Peers.prove``: sealed with the cluster key).
The answer's status, headers and body come back as they are, streamed (a
``logs?follow=1`` goes on through the hop); a 422 of the owner reaches the
caller as that 422. An owner that is dead, or that cannot be reached, is a
503 naming the branch and its state.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from branchd import lazy_aiohttp
from branchd.api.roles import CALLER_HEADER, PRINCIPAL, Principal
from branchd.errors import BranchUnreachable, Conflict, Full, Invalid, NotFound
from branchd.model import App
from branchd.placement import Recent, need_of, pick, pick_pinned
from branchd.views import HOP_HEADER, PROOF_HEADER, BranchRecord, Need

if TYPE_CHECKING:
    import ssl

log = logging.getLogger(__name__)

#: How long the owner may take to connect (s).
CONNECT_TIMEOUT = 5.0
#: How long it may take to start answering (s; a stop waits for the process,
#: up to its stopwaitsecs): sooner when the membership finds it dead.
ANSWER_TIMEOUT = 120.0
#: How often the owner's state is looked at while its answer is awaited (s).
_WATCH = 0.5

#: Hop-by-hop headers, and those the hop sets itself.
_DROPPED = frozenset(
    h.lower()
    for h in (
        "Host",
        "Authorization",
        "Connection",
        "Keep-Alive",
        "Transfer-Encoding",
        "Content-Length",
        "TE",
        "Upgrade",
        "Proxy-Authorization",
        "Origin",
        HOP_HEADER,
        PROOF_HEADER,
        CALLER_HEADER,
    )
)


class Peers(Protocol):
    """What the forwarder needs of the membership."""

    @property
    def self_id(self) -> str: ...
    def api_url_of(self, branch: str) -> tuple[str | None, str]:
        """The member's API URL (None: not known) and its state's name."""
        ...

    def prove(self, method: str, path: str, body: bytes) -> dict[str, str]:
        """The headers that prove to another member that this one sends it."""
        ...

    def others_alive(self) -> list[str]:
        """The ids of the other live members (a listing gathers from them)."""
        ...


class HttpForwarder:
    def __init__(
        self, peers: Peers, token: str | None = None, tls: ssl.SSLContext | None = None
    ) -> None:
        self._peers = peers
        self._session: Any = None
        #: This branch's own token, for its own calls in a cluster without a
        #: key (loopback only: there its branches share the token).
        self._token = token
        #: With TLS on, every hop is https and the peer's certificate verified
        #: by this context (the cluster CA, or the system's store).
        self._tls = tls

    def _url_of(self, branch: str) -> tuple[str | None, str]:
        url, state = self._peers.api_url_of(branch)
        if self._tls is not None and url is not None and not url.lower().startswith("https://"):
            # a forwarded request carries the caller's body and answer: never
            # in the clear from a branch that was told to use TLS
            raise BranchUnreachable(
                f"branch {branch} advertises {url}: plain http, and this branch "
                "calls its peers over TLS only",
                branch=branch,
                state=state,
            )
        return url, state

    async def forward(self, request: web.Request, branch: str) -> web.StreamResponse:
        if self._peers.api_url_of(branch)[1] == "unknown":  # (a path naming no member)
            raise NotFound(f"no branch {branch!r} is known here")
        resp = await self._request(request, branch, await request.read())
        try:
            out = web.StreamResponse(status=resp.status, reason=resp.reason)
            for k, v in resp.headers.items():
                if k.lower() not in _DROPPED:
                    out.headers.add(k, v)
            if resp.content_length is not None:
                out.content_length = resp.content_length
            await out.prepare(request)
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out
        finally:
            resp.release()

    async def fetch(
        self, request: web.Request, branch: str, timeout: float
    ) -> tuple[int, Any]:
        """``request`` (a GET) answered by ``branch`` as (status, JSON body),
        within ``timeout`` s; BranchUnreachable if it is not."""
        await lazy_aiohttp.loaded()  # (off the loop: the first client use loads it)
        import aiohttp

        url, state = self._url_of(branch)
        if url is None or state in ("dead", "left"):
            raise BranchUnreachable(f"branch {branch} is {state}", branch=branch, state=state)
        headers = self._hop_headers(request, b"", keep=False)
        session = self._client()
        try:
            async with asyncio.timeout(timeout):
                async with session.get(url.rstrip("/") + request.path_qs, headers=headers) as resp:
                    return resp.status, await resp.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            why = "no answer in time" if isinstance(exc, TimeoutError) else str(exc)
            raise BranchUnreachable(
                f"branch {branch} ({state}): {why}", branch=branch, state=state
            ) from None

    async def own(
        self, method: str, branch: str, path: str, body: Any = None, timeout: float = 30.0
    ) -> tuple[int, Any]:
        """A request of this branch's own (not a client's) answered by
        ``branch``: (status, JSON body); BranchUnreachable if it is not."""
        await lazy_aiohttp.loaded()  # (off the loop: the first client use loads it)
        import aiohttp

        url, state = self._url_of(branch)
        if url is None or state in ("dead", "left"):
            raise BranchUnreachable(f"branch {branch} is {state}", branch=branch, state=state)
        data = json.dumps(body).encode() if body is not None else b""
        headers = {HOP_HEADER: self._peers.self_id, **self._peers.prove(method, path, data)}
        if PROOF_HEADER not in headers and self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        if data:
            headers["Content-Type"] = "application/json"
        try:
            async with asyncio.timeout(timeout):
                async with self._client().request(
                    method, url.rstrip("/") + path, data=data or None, headers=headers
                ) as resp:
                    return resp.status, await resp.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            raise self._unreachable(branch, exc) from None

    async def open_get(self, branch: str, path: str, headers: Mapping[str, str]) -> Any:
        """A GET of this branch's own on ``branch``, streamed: the head of its
        answer (the caller reads the body and releases it); no read timeout
        (an event stream is quiet for long)."""
        await lazy_aiohttp.loaded()  # (off the loop: the first client use loads it)
        url, state = self._peers.api_url_of(branch)
        if url is None or state in ("dead", "left"):
            raise BranchUnreachable(f"branch {branch} is {state}", branch=branch, state=state)
        sent = {**headers, HOP_HEADER: self._peers.self_id, **self._peers.prove("GET", path, b"")}
        if PROOF_HEADER not in sent and self._token:
            sent["Authorization"] = f"Bearer {self._token}"
        return await self._client().get(url.rstrip("/") + path, headers=sent)

    async def send(
        self, request: web.Request, branch: str, body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        """``request`` (with ``body``) answered by ``branch``, whole: its
        status, headers and body (a create: it may be handed on if "full")."""
        import aiohttp

        resp = await self._request(request, branch, body)
        try:
            async with resp:
                return resp.status, dict(resp.headers), await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise self._unreachable(branch, exc) from None

    async def _request(self, request: web.Request, branch: str, body: bytes) -> Any:
        """The head of ``branch``'s answer to ``request`` (its body to read);
        BranchUnreachable when that member is gone, or silent (``_answer``)."""
        await lazy_aiohttp.loaded()  # (off the loop: the first client use loads it)
        import aiohttp  # the client side: loaded by a clustering branch only

        url, state = self._url_of(branch)
        if url is None or state in ("dead", "left"):
            raise BranchUnreachable(
                f"branch {branch} answers this, and it is {state}"
                + ("" if url else " (its address is not known)"),
                branch=branch,
                state=state,
            )
        headers = self._hop_headers(request, body, keep=True)
        sent = asyncio.ensure_future(
            self._client().request(
                request.method,
                url.rstrip("/") + request.path_qs,
                data=body or None,
                headers=headers,
                allow_redirects=False,
            )
        )
        try:
            return await self._answer(sent, branch)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise self._unreachable(branch, exc) from None

    def _unreachable(self, branch: str, exc: BaseException) -> BranchUnreachable:
        _, state = self._peers.api_url_of(branch)  # (as it is now: dead, maybe)
        return BranchUnreachable(
            f"branch {branch} ({state}) answers this and cannot be reached: "
            f"{type(exc).__name__}: {exc}".rstrip(": "),
            branch=branch,
            state=state,
        )

    def _hop_headers(self, request: web.Request, body: bytes, *, keep: bool) -> dict[str, str]:
        """The headers of one hop: the caller's own (``keep``; never the
        hop-by-hop ones), this branch as the hop, and its proof."""
        headers = {}
        if keep:
            headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROPPED}
        headers[HOP_HEADER] = self._peers.self_id
        who: Principal | None = request.get(PRINCIPAL)
        if who is not None:
            headers[CALLER_HEADER] = who.name  # (for the owner's audit line)
        proof = self._peers.prove(request.method, request.path_qs, body)
        if not proof and "Authorization" in request.headers:
            # a cluster without a key (loopback only): its branches share the
            # token, which this branch has just checked
            proof = {"Authorization": request.headers["Authorization"]}
        headers.update(proof)
        return headers

    def _client(self) -> Any:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._tls) if self._tls is not None else None,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT),
                auto_decompress=False,
            )
        return self._session

    async def _answer(self, sent: asyncio.Future[Any], branch: str) -> Any:
        """The owner's answer (its head); TimeoutError if the owner is found
        dead or gone while we wait (a stopped machine accepts the connection
        and never answers), or if no answer starts within ``ANSWER_TIMEOUT``."""
        waited = 0.0
        try:
            while True:
                done, _ = await asyncio.wait({sent}, timeout=_WATCH)
                if done:
                    return sent.result()
                waited += _WATCH
                _, state = self._peers.api_url_of(branch)
                if state in ("dead", "left") or waited >= ANSWER_TIMEOUT:
                    raise TimeoutError(f"no answer in {waited:.0f}s")
        finally:
            if not sent.done():
                sent.cancel()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


#: How long a gathered listing waits for the other branches (s).
GATHER_DEADLINE = 1.0


async def gather(
    forwarder: HttpForwarder,
    peers: Peers,
    request: web.Request,
    local: web.StreamResponse,
    deadline: float = GATHER_DEADLINE,
) -> web.StreamResponse:
    """A listing of every live branch: this one's answer (``local``) and the
    others', asked at once and awaited ``deadline`` s, as ``{"items": [...],
    "unreachable": [{"branch", "state", "error"}]}``. A branch that does not
    answer in time is named, never hidden, and never fails the listing."""
    others = peers.others_alive()
    results = await asyncio.gather(
        *(forwarder.fetch(request, b, deadline) for b in others), return_exceptions=True
    )
    items: list[Any] = []
    unreachable: list[dict[str, Any]] = []
    statuses: list[int] = []
    if isinstance(local, web.Response) and local.body is not None:
        statuses.append(local.status)
        if local.status == 200:
            items += json.loads(bytes(local.body))["items"]  # type: ignore[arg-type]
    for branch, result in zip(others, results, strict=True):
        if isinstance(result, BranchUnreachable):
            state = str(result.details.get("state", "unknown"))
            unreachable.append({"branch": branch, "state": state, "error": result.message})
        elif isinstance(result, BaseException):
            unreachable.append({"branch": branch, "state": "unknown", "error": repr(result)})
        else:
            status, body = result
            statuses.append(status)
            if status == 200 and isinstance(body, dict):
                items += body.get("items", [])
    if 200 not in statuses and not unreachable:
        return local  # nobody has it: this branch's own answer (a 404, a 422) says why
    items.sort(key=lambda i: (str(i.get("app", "")), str(i.get("name", ""))))
    return web.json_response({"items": items, "unreachable": unreachable})


class Placing(Peers, Protocol):
    """What placing a new instance needs of the membership."""

    def alive(self) -> list[BranchRecord]: ...
    def owner_of(self, app: str, name: str) -> str | None: ...
    async def reserve(self, app: str, name: str) -> None:
        """Reserve a new instance's name cluster-wide (``Conflict`` if taken)."""
        ...


async def place(
    forwarder: HttpForwarder,
    peers: Placing,
    request: web.Request,
    here: Callable[[], Awaitable[web.StreamResponse]],
    app: App,
    rng: random.Random,
    recent: Recent | None = None,
) -> web.StreamResponse:
    """A new instance of ``app``, created on the branch with spare capacity
    (``placement.pick``: better of two on free slots, the app's instances
    spread), or where ``?branch=`` pins it. A branch that answers ``full``
    (its live figures said no) hands it to the next choice; when all are
    full, 503 ``full`` naming the branches tried. An app on the embedded
    broker lives on the branch that declared it (its workers and producers
    share that machine's folder): its instances go there."""
    raw = await request.read()
    try:
        body = json.loads(raw) if raw.strip() else {}
    except ValueError:
        return await here()  # this branch's own answer says what is wrong with it
    if isinstance(body, dict) and "count" in body:
        # a count create (a name template) is refused by this branch's own
        # handler, before any name is reserved: it is not placed
        return await here()
    name = body.get("name") if isinstance(body, dict) else None
    if isinstance(name, str) and name:
        holder = peers.owner_of(app.name, name)
        if holder == peers.self_id:
            return await here()  # (its own answer: the name is taken here)
        if holder is not None:
            raise Conflict(
                f"instance {name!r} of app {app.name!r} exists on branch {holder}",
                branch=holder,
            )
        # two creates of one name through two branches: one 201, one 409
        await peers.reserve(app.name, name)
    now = asyncio.get_running_loop().time()
    live = recent.apply(peers.alive(), now) if recent is not None else peers.alive()
    pin = request.query.get("branch")
    embedded = app.celery.broker is None and app.origin
    home = (app.origin, *(r.hostname for r in live if r.id == app.origin))
    if embedded and pin and pin not in home:
        raise Invalid(
            f"app {app.name!r} is on the embedded broker of branch {app.origin}: its "
            "instances run there (its workers and producers share that machine's folder)"
        )
    # (the host's CPU count is not known yet: a worker of Celery's default
    # concurrency counts 1 here, and its host's admission counts its own)
    need = need_of(body, app) if isinstance(body, dict) else Need()
    if embedded:
        order: tuple[BranchRecord, ...] = (pick_pinned(live, str(app.origin), need),)
    elif pin:
        order = (pick_pinned(live, pin, need),)
    else:
        order = pick(live, need, rng, app=app.name)
    tried: list[str] = []
    for choice in order:
        if choice.id == peers.self_id:
            try:
                answer = await here()
            except Full:  # (its own admission: the record it was picked by was stale)
                tried.append(f"{choice.id} (full)")
                continue
            if not _full(answer):
                return answer
        else:
            try:
                status, headers, data = await forwarder.send(request, choice.id, raw)
            except BranchUnreachable as exc:
                tried.append(f"{choice.id} ({exc.message})")
                continue
            if not (status == 503 and b'"full"' in data):
                if status == 201 and recent is not None:
                    made = json.loads(data)  # (its name: given, or made up there)
                    recent.add(choice, f"{app.name}/{made.get('name')}", need.slots, now)
                out = web.Response(status=status, body=data, content_type="application/json")
                if "Location" in headers:
                    out.headers["Location"] = headers["Location"]
                return out
        tried.append(f"{choice.id} (full)")
    raise Full(f"no branch has room for an instance of {app.name!r}: tried {', '.join(tried)}")


def _full(answer: web.StreamResponse) -> bool:
    body = answer.body if isinstance(answer, web.Response) else None
    return answer.status == 503 and isinstance(body, bytes) and b'"full"' in body
