"""The aiohttp application: middlewares (errors, origin, auth, JSON only) and
the routes of v1."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from branchd.api import dashboard, meters, openapi
from branchd.api.events import CLUSTER_EVENTS, JOURNAL, ClusterEvents, Journal
from branchd.api.forward import (
    Directory,
    Forwarder,
    LocalDirectory,
    NoForwarder,
    Scope,
    Target,
    scope_of,
)
from branchd.api.roles import (
    CALLER_HEADER,
    PRINCIPAL,
    Principal,
    TokenBook,
    refusal,
    role_needed,
)
from branchd.api.routes import (
    BRANCH,
    CLUSTER,
    DAEMON,
    DRAIN,
    EXIT,
    LISTINGS,
    LOCAL,
    MOVES,
    OPENAPI,
    PEER_PATH,
    ROUTES,
    Handler,
    not_found,
)
from branchd.config import NamedToken, Role
from branchd.errors import (
    BranchdError,
    Forbidden,
    Misdirected,
    UnsupportedMediaType,
)
from branchd.views import HOP_HEADER, PROOF_HEADER, BranchRecord

if TYPE_CHECKING:
    from branchd.api.backend import Cluster, Local, Moves

log = logging.getLogger(__name__)
#: One line per write (who, method, path, status): its own logger, so that an
#: operator may send it elsewhere.
audit_log = logging.getLogger("branchd.audit")

TOKEN = web.AppKey("token", str)
#: Every token in force, with its role (the named ones replaced on SIGHUP).
TOKENS = web.AppKey("tokens", TokenBook)
#: Methods that change nothing: not audited.
_READS = frozenset({"GET", "HEAD", "OPTIONS"})
#: The daemon listens on loopback only: a Host of any other name is refused.
LOOPBACK = web.AppKey("loopback", bool)
#: What a request body may be declared as. A web page can send text/plain,
#: a form or multipart to any port without a preflight, never these.
JSON_TYPES = frozenset({"application/json", "application/merge-patch+json"})

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


def _error(status: int, code: str, message: str, **headers: str) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=headers or None
    )


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes a JSON error; never a traceback on the wire."""
    try:
        return await handler(request)
    except BranchdError as exc:
        return web.json_response(exc.to_wire(), status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, f"http_{exc.status}")
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
        return _error(exc.status, code, exc.reason, **headers)
    except ConnectionResetError:
        # The client left (e.g. in the middle of sending its body): nobody to
        # answer, and nothing wrong with the daemon.
        log.debug("client left during %s %s", request.method, request.path)
        return _error(400, "bad_request", "connection lost")
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return _error(500, "internal", "internal error; see the branchd log")


def loopback_host(host: str) -> bool:
    """``localhost`` (and ``*.localhost``, which browsers keep on loopback), or a
    loopback address, with or without a port."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8400
        name = host[1 : host.find("]")] if "]" in host else host
    else:
        name, sep, port = host.rpartition(":")
        if not sep or not port.isdigit():
            name = host
    name = name.rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@web.middleware
async def origin_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Only this daemon's own origin (a web page's requests are refused, token
    or not) and, on a loopback bind, only a loopback Host (DNS rebinding: a
    page on ``evil.example`` whose name now resolves to 127.0.0.1)."""
    host = request.headers.get("Host")
    if request.app[LOOPBACK] and host is not None and not loopback_host(host):
        raise Misdirected(
            f"Host {host!r} is not this daemon's: on a loopback bind it answers "
            "to localhost and loopback addresses only"
        )
    origin = request.headers.get("Origin")
    if origin is not None and origin.lower() != f"{request.scheme}://{host or ''}".lower():
        raise Forbidden(f"cross-origin requests are refused (Origin {origin!r})")
    return await handler(request)


@web.middleware
async def json_only_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A request body must be declared JSON: ``text/plain`` and forms are what
    a page can send cross-origin without a preflight."""
    if request.path == PEER_PATH:
        # sealed bytes: the cluster key speaks (or, with no key, the token);
        # a page cannot seal, and without a cluster the route answers 409
        return await handler(request)
    if request.body_exists and request.content_type not in JSON_TYPES:
        raise UnsupportedMediaType(
            f"a request body must be Content-Type: application/json, not {request.content_type!r}"
        )
    return await handler(request)


@web.middleware
async def audit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A line for every write, whatever its outcome (outermost: a 401 or 403
    is audited too). The peer channel's push-pulls are the branches' own
    traffic, several a second: not audited."""
    if request.method in _READS or request.path == PEER_PATH:
        return await handler(request)
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        who: Principal | None = request.get(PRINCIPAL)
        audit_log.info(
            "audit: %s %s %s -> %d",
            who.name if who is not None else "-",
            request.method,
            request.path_qs,
            status,
        )


def _template(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else ""


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    book = request.app.get(TOKENS)
    cluster = request.app.get(CLUSTER)
    if request.path == PEER_PATH and cluster is not None and cluster.sealed:
        # A peer call is sealed with the cluster key (AES-GCM, timestamped,
        # replay-checked): that is its authentication, since branches need
        # not share a token. One that does not open is refused (403) there.
        return await handler(request)
    proof = request.headers.get(PROOF_HEADER)
    if proof is not None and cluster is not None:
        # Forwarded by a member, which checked its caller's token and role;
        # the proof (sealed with the cluster key) names this method, path
        # and body. The caller's name is for the audit line only.
        body = await request.read()
        if cluster.verify(proof, request.method, request.path_qs, body):
            caller = request.headers.get(CALLER_HEADER, "-")[:64]
            hop = request.headers.get(HOP_HEADER, "?")[:64]
            request[PRINCIPAL] = Principal(f"{caller} via {hop}", Role.ADMIN)
            return await handler(request)
        raise Forbidden("a forwarded request whose proof does not hold (not from a member)")
    template = _template(request)
    needed = role_needed(request.method, template) if template else Role.READ
    public = dashboard.is_public(request.path) or (
        request.path == "/metrics" and request.app.get(meters.PUBLIC, False)
    )
    if book is None or not book.enabled or needed is None or public:
        # (no token, the dashboard's own files (no data in them), or public metrics)
        return await handler(request)
    given = request.headers.get("Authorization", "")
    scheme, _, value = given.partition(" ")
    who = book.who(value.strip()) if scheme.lower() == "bearer" else None
    if who is None:
        return _error(
            401,
            "unauthorized",
            "a valid bearer token is required",
            **{"WWW-Authenticate": "Bearer"},
        )
    request[PRINCIPAL] = who
    if not who.role.allows(needed):
        raise Forbidden(
            refusal(request.method, template, needed, who),
            needs=needed.value,
            has=who.role.value,
        )
    return await handler(request)


FORWARDER = web.AppKey("forwarder", Forwarder)
#: Gathers a listing from every live branch, given this branch's own answer.
Gatherer = Callable[[web.Request, web.StreamResponse], Awaitable[web.StreamResponse]]
GATHERER: web.AppKey[Gatherer] = web.AppKey("gatherer")
#: Places a new instance on the branch with room, given how to make it here.
Placer = Callable[
    [web.Request, Callable[[], Awaitable[web.StreamResponse]]], Awaitable[web.StreamResponse]
]
PLACER: web.AppKey[Placer] = web.AppKey("placer")
DIRECTORY = web.AppKey("directory", Directory)
#: Each route's scope, by (method, path template).
SCOPES: web.AppKey[dict[tuple[str, str], Scope]] = web.AppKey("scopes")


@web.middleware
async def forward_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Forward first: the directory says which branch answers this route's target."""
    resource = request.match_info.route.resource
    scope = request.app[SCOPES].get((request.method, resource.canonical if resource else ""))
    if scope is None or HOP_HEADER in request.headers:
        # no route: answered here (404, 405); forwarded once: answered here
        return await handler(request)
    info = request.match_info
    if scope is Scope.GATHER and GATHERER in request.app:
        # a listing: this branch's items and every other live branch's
        return await request.app[GATHERER](request, await handler(request))
    if scope is Scope.PLACEMENT and PLACER in request.app:
        # a new instance: the branch with room makes it (this one, maybe)
        return await request.app[PLACER](request, lambda: handler(request))
    target = Target(scope, info.get("app"), info.get("name"), info.get("id"))
    owner = request.app[DIRECTORY].owner(target)
    if owner is None:
        return await handler(request)
    return await request.app[FORWARDER].forward(request, owner)


def make_app(
    local: Local,
    *,
    token: str | None,
    max_body: int,
    tokens: TokenBook | tuple[NamedToken, ...] = (),
    listings_at_once: int = 1,
    loopback: bool = True,
    branch: Callable[[], BranchRecord],
    on_exit: Callable[[bool], None] | None = None,
    directory: Directory | None = None,
    forwarder: Forwarder | None = None,
    cluster: Cluster | None = None,
    gatherer: Gatherer | None = None,
    placer: Placer | None = None,
    drain: Callable[[bool], None] | None = None,
    moves: Moves | None = None,
    daemon: Mapping[str, Any] | None = None,
    journal: Journal | None = None,
    cluster_events: ClusterEvents | None = None,
    metric_sources: meters.Sources | None = None,
    metrics_public: bool = False,
) -> web.Application:
    app = web.Application(
        # the audit outermost (it sees the status sent), then errors (every
        # failure is JSON), then origin and Host, then auth and roles, then
        # JSON bodies only, then forward first
        middlewares=[
            meters.timing_middleware,  # (outermost: every answer is timed)
            audit_middleware,
            errors_middleware,
            origin_middleware,
            auth_middleware,
            json_only_middleware,
            forward_middleware,
        ],
        client_max_size=max_body,
    )
    app[LOCAL] = local
    if listings_at_once > 0:
        app[LISTINGS] = asyncio.Semaphore(listings_at_once)
    app[DIRECTORY] = directory if directory is not None else LocalDirectory()
    recorder = app[meters.RECORDER] = meters.Recorder()
    app[FORWARDER] = meters.TimedForwarder(
        forwarder if forwarder is not None else NoForwarder(), recorder
    )
    app[meters.SOURCES] = metric_sources if metric_sources is not None else meters.Sources()
    app[meters.PUBLIC] = metrics_public
    trees = app[meters.TREES] = meters.Trees()

    async def _close_trees(_: web.Application) -> None:
        await trees.close()

    app.on_cleanup.append(_close_trees)
    if journal is not None:
        app[JOURNAL] = journal
    if cluster_events is not None:
        app[CLUSTER_EVENTS] = cluster_events
    app[SCOPES] = {(r.method, r.path): scope_of(r.method, r.path) for r in ROUTES}
    app[BRANCH] = branch
    if cluster is not None:
        app[CLUSTER] = cluster
    if gatherer is not None:
        app[GATHERER] = gatherer
    if placer is not None:
        app[PLACER] = placer
    if drain is not None:
        app[DRAIN] = drain
    if moves is not None:
        app[MOVES] = moves
    app[LOOPBACK] = loopback
    if token:
        app[TOKEN] = token
    app[TOKENS] = tokens if isinstance(tokens, TokenBook) else TokenBook(token or None, tokens)
    if on_exit is not None:
        app[EXIT] = on_exit
    if daemon is not None:
        app[DAEMON] = daemon
    app[OPENAPI] = lambda: openapi.build(ROUTES)
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)
    dashboard.add_routes(app)  # "/" and its files (no data, no token)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app
