"""Clients of the branchd HTTP API v1 (docs/api.md): AsyncClient and its sync twin Client."""

from __future__ import annotations

import asyncio
import codecs
import ipaddress
import json
import logging
import os
import ssl
import types
from collections.abc import AsyncGenerator, Callable, Coroutine, Generator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote, urlsplit

import aiohttp

from branchctl.errors import ApiError, ConnectionFailed, NoAnswer
from branchctl.models import (
    ActionItem,
    App,
    Autoscale,
    Branch,
    Consumer,
    Instance,
    LintFinding,
    Member,
    Queue,
    QueueDepth,
    Stats,
)

__all__ = [
    "DEFAULT_URL",
    "AsyncClient",
    "Client",
    "find_token",
    "find_url",
    "token_file",
    "url_file",
]

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8400"
#: The file a daemon writes in its state dir, once it listens (handy with port 0).
URL_FILE = "branchd.url"
#: The file a daemon keeps its token in, in its state dir (mode 0600).
TOKEN_FILE = "token"


def state_dir(env: Mapping[str, str]) -> Path:
    """The state dir of this user's daemon.

    The rule copies the daemon's (branchd.config: ``BRANCHD_STATE_DIR``, else
    ``$XDG_STATE_HOME/branchd``, else ``~/.local/state/branchd``), since the
    client must not import branchd; keep the two in step.
    """
    path = env.get("BRANCHD_STATE_DIR")
    if not path:
        base = env.get("XDG_STATE_HOME") or os.path.join(env.get("HOME", "/tmp"), ".local", "state")
        path = os.path.join(base, "branchd")
    return Path(path).expanduser()


def url_file(env: Mapping[str, str]) -> Path:
    """Where the daemon of this user writes its URL: ``<state dir>/branchd.url``."""
    return state_dir(env) / URL_FILE


def token_file(env: Mapping[str, str]) -> Path:
    """Where the daemon of this user keeps its token: ``<state dir>/token``."""
    return state_dir(env) / TOKEN_FILE


def _is_local(url: str, env: Mapping[str, str]) -> bool:
    """``url`` is this machine's daemon: a loopback host, or the URL the state
    dir's daemon wrote (it may listen on every address)."""
    try:
        host = (urlsplit(_normalize_url(url)).hostname or "").rstrip(".")
    except ValueError:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        pass
    found, path = find_url(env)
    return path is not None and _normalize_url(found) == _normalize_url(url)


def find_token(env: Mapping[str, str], url: str) -> str | None:
    """The token of the local daemon for ``url``, when one is readable.

    ``$BRANCHD_TOKEN_FILE`` if set, else ``<state dir>/token`` for a daemon of
    this machine (``url`` loopback or the one its state dir holds): a token
    is never sent to another host unless it was given. None when the file is
    missing or unreadable (another user's daemon: give the token).
    """
    given = env.get("BRANCHD_TOKEN_FILE")
    if not given and not _is_local(url, env):
        return None
    path = Path(given).expanduser() if given else token_file(env)
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None
    if given and any(c.isspace() for c in text):
        # the daemon's file of named tokens ([tokens.NAME] tables), not one
        # token: the daemon's own, in its state dir, as without the variable
        return find_token({k: v for k, v in env.items() if k != "BRANCHD_TOKEN_FILE"}, url)
    return text or None


def find_url(env: Mapping[str, str]) -> tuple[str, Path | None]:
    """The URL of the local daemon, and the file it was read from.

    ``DEFAULT_URL`` (and None) when that file is missing, unreadable or empty:
    a daemon that never wrote one listens where it does by default.
    """
    path = url_file(env)
    try:
        url = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return DEFAULT_URL, None
    return (url, path) if url else (DEFAULT_URL, None)


_T = TypeVar("_T")


def _seg(name: str) -> str:
    """One path segment, percent-encoded; an empty name would name another route."""
    if not name:
        raise ApiError(422, "invalid", "bad name '': a name cannot be empty")
    return quote(name, safe="")


def _instance_path(app: str, name: str) -> str:
    return f"/v1/apps/{_seg(app)}/instances/{_seg(name)}"


def _queue_path(app: str, queue: str) -> str:
    return f"/v1/apps/{_seg(app)}/queues/{_seg(queue)}"


AutoscaleIn = Mapping[str, int] | tuple[int, int]
"""Autoscale bounds: ``{"min": n, "max": n}`` or a ``(min, max)`` pair."""


def _bounds(value: AutoscaleIn) -> dict[str, int]:
    if isinstance(value, tuple):
        low, high = value
        return {"min": low, "max": high}
    return dict(value)


async def _mark_sent(
    session: aiohttp.ClientSession,
    ctx: types.SimpleNamespace,
    params: aiohttp.TraceRequestHeadersSentParams,
) -> None:
    # A timeout after this point is the daemon's silence, not the network's.
    sent = ctx.trace_request_ctx
    if isinstance(sent, dict):
        sent["sent"] = True


def _normalize_url(url: str) -> str:
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


class AsyncClient:
    """An aiohttp client of one branchd daemon.

    Use it as an async context manager (or call ``close()``); the HTTP session
    is created on the first request. Every method raises ``ApiError`` when
    the daemon answers an error and ``ConnectionFailed`` when it cannot be
    reached or does not answer within ``timeout`` seconds.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        timeout: float = 30,
        ca: str | None = None,
    ) -> None:
        # No URL: the local daemon, found as branchctl finds it ($BRANCHD_URL,
        # then the branchd.url its state dir holds, then DEFAULT_URL).
        self.url = _normalize_url(url or os.environ.get("BRANCHD_URL") or find_url(os.environ)[0])
        # No token: the local daemon's, from the file it keeps (find_token).
        self.token = token or find_token(os.environ, self.url)
        self.timeout = timeout
        #: The CA that signed an https daemon's certificate (a self-signed one's
        #: own); None: $BRANCHD_TLS_CA, else the system's trust store.
        self.ca = ca or os.environ.get("BRANCHD_TLS_CA") or None
        self._session: aiohttp.ClientSession | None = None
        #: The branches the last listing could not reach in time (a cluster's
        #: listing names them rather than failing): ``{"branch", "state", "error"}``.
        self.unreachable: list[dict[str, Any]] = []

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session (the client can no longer be used)."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    # -- transport ---------------------------------------------------------

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            headers = {"Accept": "application/json"}
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
            trace = aiohttp.TraceConfig()
            trace.on_request_headers_sent.append(_mark_sent)
            tls = ssl.create_default_context(cafile=self.ca) if self.ca else None
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=tls) if tls is not None else None,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                trace_configs=[trace],
            )
        return self._session

    def _failed(self, exc: BaseException, sent: bool = False) -> ApiError:
        if isinstance(exc, TimeoutError):
            if sent:  # it got the request: slow, not unreachable
                return NoAnswer(self.url, self.timeout)
            return ConnectionFailed(self.url, f"no connection within {self.timeout:g}s", "timeout")
        if isinstance(exc, aiohttp.ClientConnectorError):
            err = exc.os_error
            if isinstance(err.errno, int) and err.errno > 0:  # "Connection refused"
                return ConnectionFailed(self.url, os.strerror(err.errno))
            if err.strerror:  # "Name or service not known"
                return ConnectionFailed(self.url, err.strerror)
        if isinstance(exc, aiohttp.InvalidURL):
            return ConnectionFailed(self.url, "invalid URL", "invalid_url")
        return ConnectionFailed(self.url, str(exc) or type(exc).__name__)

    async def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> tuple[int, bytes]:
        """Send one request; answer (status, body) of a 2xx, raise otherwise.
        ``timeout``: this request's own bound (default: the client's)."""
        log.debug("%s %s", method, path)
        sent = {"sent": False}  # set by _mark_sent once the request went out
        bound = aiohttp.ClientTimeout(total=self.timeout if timeout is None else timeout)
        try:
            async with self._get_session().request(
                method,
                self.url + path,
                json=body,
                params=params,
                trace_request_ctx=sent,
                timeout=bound,
            ) as resp:
                data = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            failed = self._failed(exc, sent["sent"])
            if timeout is not None and isinstance(failed, NoAnswer):
                failed = NoAnswer(self.url, timeout)
            raise failed from exc
        if status >= 400:
            raise ApiError.from_body(status, data)
        return status, data

    async def _json(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> tuple[int, Any]:
        status, data = await self._call(method, path, body, params, timeout)
        try:
            return status, json.loads(data)
        except ValueError:
            raise ApiError(
                status, "bad_response", f"{method} {path} answered something other than JSON"
            ) from None

    async def _delete(
        self, path: str, wait: bool, parse: Callable[[Any], _T]
    ) -> _T | None:
        """A DELETE: None once it is gone (204); without ``wait`` the daemon's 202
        answer, what it was when the delete began."""
        params = None if wait else {"wait": "false"}
        status, data = await self._call("DELETE", path, params=params)
        if status == 204 or not data:
            return None
        try:
            return self._parse(parse, json.loads(data), status)
        except ValueError:
            raise ApiError(
                status, "bad_response", "DELETE answered something other than JSON"
            ) from None

    @staticmethod
    def _parse(parse: Callable[[Any], _T], data: Any, status: int = 200) -> _T:
        try:
            return parse(data)
        except ValueError as exc:
            raise ApiError(status, "bad_response", f"unexpected answer: {exc}") from None

    def _items(self, parse: Callable[[Any], _T], data: Any) -> list[_T]:
        if not isinstance(data, dict) or not isinstance(data.get("items"), list):
            raise ApiError(200, "bad_response", 'unexpected answer: expected {"items": [...]}')
        return [self._parse(parse, item) for item in data["items"]]

    # -- branch --------------------------------------------------------------

    async def ping(self) -> bool:
        """True when the daemon answers ``{"ok": true}`` (no token needed)."""
        _, data = await self._json("GET", "/v1/ping")
        return isinstance(data, dict) and data.get("ok") is True

    async def branch(self) -> Branch:
        """The branch this client talks to: id, host, version, capacity; and
        the daemon's pid, state dir, supervision mode, instances by state and
        cluster members by state (what ``branchctl daemon status`` shows)."""
        _, data = await self._json("GET", "/v1/branch")
        return self._parse(Branch.from_json, data)

    async def branches(self) -> list[Member]:
        """The branches this daemon knows (itself, on a branch that is not in a cluster)."""
        _, data = await self._json("GET", "/v1/branches")
        return self._items(Member.from_json, data)

    async def member(self, branch_id: str = "self") -> Member:
        """One branch's whole record as the cluster knows it (``self``: this one)."""
        _, data = await self._json("GET", f"/v1/branches/{_seg(branch_id)}")
        return self._parse(Member.from_json, data)

    async def drain(
        self, branch_id: str = "self", on: bool = True, *, move: bool = False
    ) -> dict[str, Any]:
        """Drain a branch (no new instance placed there; its own keep running),
        or with ``on=False`` take new instances there again. ``move``: and
        make its instances again elsewhere, one at a time, each new one
        running before the old one stops (``drain_status`` follows it)."""
        verb = "drain" if on else "undrain"
        query = "?move=1" if move and on else ""
        _, data = await self._json("POST", f"/v1/branches/{_seg(branch_id)}/{verb}{query}")
        return dict(data)

    async def drain_status(self, branch_id: str = "self") -> dict[str, Any]:
        """Whether a branch drains, and where its last move stands (``move``:
        ``state`` moving/done/stopped, ``left``, ``moved``, ``failed``)."""
        _, data = await self._json("GET", f"/v1/branches/{_seg(branch_id)}/drain")
        return dict(data)

    async def leave(self) -> None:
        """Make this branch leave its cluster gracefully (the others see it "left")."""
        await self._json("POST", "/v1/branches/self/leave")

    async def cluster_keys(self) -> dict[str, Any]:
        """The cluster keys by id, with how many live branches hold and use each."""
        _, data = await self._json("GET", "/v1/cluster/keys")
        return dict(data)

    async def install_key(self, key: str) -> dict[str, Any]:
        """Rotation step 1: install ``key`` on every live branch (what each answered)."""
        _, data = await self._json("POST", "/v1/cluster/keys", {"key": key})
        return dict(data)

    async def use_key(self, key_id: str) -> dict[str, Any]:
        """Rotation step 2: every live branch seals with ``key_id`` from now on."""
        _, data = await self._json("POST", f"/v1/cluster/keys/{_seg(key_id)}/use")
        return dict(data)

    async def remove_key(self, key_id: str) -> dict[str, Any]:
        """Rotation step 3: remove ``key_id`` (not the primary) from every live branch."""
        _, data = await self._json("DELETE", f"/v1/cluster/keys/{_seg(key_id)}")
        return dict(data)

    async def exit_daemon(self, keep: bool = False) -> None:
        """Make the daemon exit: it first stops every instance, or with ``keep``
        leaves them running for the next branchd to adopt (an upgrade)."""
        await self._json("POST", "/v1/daemon/exit", {"keep": keep})

    async def exit_branch(self, keep: bool = False) -> dict[str, Any]:
        """The same through ``POST /v1/branch/exit?keep=1`` (a daemon of issue 15
        or later); answers ``{"exiting": true, "keep": ...}``, sent before it goes."""
        _, data = await self._json("POST", "/v1/branch/exit", params={"keep": str(int(keep))})
        return dict(data)

    # -- apps ----------------------------------------------------------------

    async def apps(self) -> list[App]:
        """Every app of the branch."""
        _, data = await self._json("GET", "/v1/apps")
        return self._items(App.from_json, data)

    async def get_app(self, name: str) -> App:
        """App ``name``; ``ApiError`` 404 when there is none."""
        _, data = await self._json("GET", f"/v1/apps/{_seg(name)}")
        return self._parse(App.from_json, data)

    async def put_app(
        self,
        name: str,
        env: Mapping[str, str] | None = None,
        defaults: Mapping[str, Any] | None = None,
        broker: str | None = None,
        celery_app: str | None = None,
        python: str | None = None,
        pool: str | None = None,
        args: Sequence[str] | None = None,
        autoscale: AutoscaleIn | None = None,
        mingle_gossip: bool | None = None,
        result_backend: str | None = None,
        limits: Mapping[str, Any] | None = None,
    ) -> tuple[App, bool]:
        """Create or replace an app; answer (app, created).

        Only the arguments given (not None) are sent; PUT resets the others
        to their defaults (no ``broker``: the embedded broker). ``autoscale``
        is ``{"min": n, "max": n}`` or a ``(min, max)`` pair. ``limits``: the
        worker limits by field name (``time_limit``, ``soft_time_limit``,
        ``max_tasks_per_child``, ``max_memory_per_child`` in bytes,
        ``prefetch_multiplier``, ``disable_prefetch``, ``task_overrides``).
        """
        body: dict[str, Any] = {}
        if env is not None:
            body["env"] = dict(env)
        if defaults is not None:
            body["defaults"] = dict(defaults)
        for key, value in (
            ("broker", broker),
            ("celery_app", celery_app),
            ("python", python),
            ("pool", pool),
            ("mingle_gossip", mingle_gossip),
            ("result_backend", result_backend),
        ):
            if value is not None:
                body[key] = value
        if args is not None:
            body["args"] = list(args)
        if autoscale is not None:
            body["autoscale"] = _bounds(autoscale)
        body.update({k: v for k, v in (limits or {}).items() if v is not None})
        status, data = await self._json("PUT", f"/v1/apps/{_seg(name)}", body)
        return self._parse(App.from_json, data, status), status == 201

    async def patch_app(self, name: str, changes: Mapping[str, Any]) -> App:
        """Change only what ``changes`` names and keep the rest (a JSON merge
        patch): ``{"env": {"K": "v", "OLD": None}, "pool": "solo", "broker": None}``
        sets K, removes OLD, changes the pool and goes back to the embedded broker.
        """
        _, data = await self._json("PATCH", f"/v1/apps/{_seg(name)}", dict(changes))
        return self._parse(App.from_json, data)

    async def celery_setup(self, name: str) -> dict[str, Any]:
        """Everything a producer or Celery's own CLI needs for app ``name``:
        ``config`` (Celery settings), ``env`` (the same as environment
        variables), ``celery_app``, ``python`` and ``cwd`` of its workers."""
        _, data = await self._json("GET", f"/v1/apps/{_seg(name)}/celery-config")
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
            raise ApiError(200, "bad_response", "unexpected answer: expected a celery config")
        return data

    async def celery_config(self, name: str) -> dict[str, Any]:
        """The Celery settings of app ``name``'s producers, for ``app.conf.update(...)``:
        ``broker_url``, ``broker_transport_options``, ``result_backend``,
        ``task_queues`` (where the app has them)."""
        return dict((await self.celery_setup(name))["config"])

    async def delete_app(self, name: str, wait: bool = True) -> App | None:
        """Remove an app; the daemon stops and removes its instances first.
        Answers once it is gone (None); with ``wait=False`` at once, with the
        app as it was (poll ``get_app`` until it answers 404)."""
        return await self._delete(f"/v1/apps/{_seg(name)}", wait, App.from_json)

    # -- instances -----------------------------------------------------------

    async def instances(self, app: str | None = None) -> list[Instance]:
        """The instances of ``app``, or of every app when ``app`` is None."""
        if app is not None:
            _, data = await self._json("GET", f"/v1/apps/{_seg(app)}/instances")
            self._note_unreachable(data)
            return self._items(Instance.from_json, data)
        self.unreachable = []
        apps = await self.apps()
        lists = await asyncio.gather(*(self._instances_if_any(a.name) for a in apps))
        return [instance for items in lists for instance in items]

    def _note_unreachable(self, data: Any) -> None:
        for u in data.get("unreachable", ()) if isinstance(data, dict) else ():
            if isinstance(u, dict) and u not in self.unreachable:
                self.unreachable.append(u)

    async def _instances_if_any(self, app: str) -> list[Instance]:
        try:
            return await self.instances(app)
        except ApiError as exc:
            if exc.code == "not_found":  # removed since we listed the apps
                return []
            raise

    async def get_instance(self, app: str, name: str) -> Instance:
        """Instance ``name`` of ``app``; ``ApiError`` 404 when there is none."""
        _, data = await self._json("GET", _instance_path(app, name))
        return self._parse(Instance.from_json, data)

    async def add_instance(self, app: str, *, branch: str | None = None, **fields: Any) -> Instance:
        """Create an instance from InstanceIn ``fields`` (``command=[...]``, ...); in a
        cluster it is placed where there is room, or on ``branch`` (an id or host name)."""
        params = {"branch": branch} if branch else None
        path = f"/v1/apps/{_seg(app)}/instances"
        status, data = await self._json("POST", path, fields, params)
        return self._parse(Instance.from_json, data, status)

    async def add_instances(
        self, app: str, count: int, name: str, *, start_at: int = 0, **fields: Any
    ) -> list[Instance]:
        """Create ``count`` instances from one set of InstanceIn ``fields``, named by
        the template ``name`` (``"worker_{n:02d}"``: ``{n}`` or ``{n:0Wd}``, numbered
        from ``start_at``); all or none (``ApiError`` naming the rule). On a single
        branch: a cluster refuses it (422), create them one by one there."""
        body = {**fields, "count": count, "name": name, "start_at": start_at}
        _, data = await self._json("POST", f"/v1/apps/{_seg(app)}/instances", body)
        return self._items(Instance.from_json, data)

    async def _app_action(
        self,
        app: str,
        action: str,
        rolling: bool,
        batch: int | None,
        wait: bool,
        timeout: float | None,
    ) -> list[ActionItem]:
        params: dict[str, str] = {} if wait else {"wait": "false"}
        if rolling:
            params["rolling"] = "1"
            if batch is not None:
                params["batch"] = str(batch)
        path = f"/v1/apps/{_seg(app)}/{action}"
        _, data = await self._json("POST", path, params=params or None, timeout=timeout)
        return self._items(ActionItem.from_json, data)

    async def start_app(
        self,
        app: str,
        *,
        rolling: bool = False,
        batch: int | None = None,
        wait: bool = True,
        timeout: float | None = None,
    ) -> list[ActionItem]:
        """Start every instance of ``app`` (on the branch asked) at once, or with
        ``rolling`` ``batch`` at a time (default 1); answers each one's outcome
        once all got there (``wait=False``: at once, ``pending``). ``timeout``
        bounds this call (default: the client's): a start waits for ``startsecs``."""
        return await self._app_action(app, "start", rolling, batch, wait, timeout)

    async def stop_app(
        self, app: str, *, wait: bool = True, timeout: float | None = None
    ) -> list[ActionItem]:
        """Stop every instance of ``app`` at once (each drains as a stop alone does);
        answers each one's outcome once all stopped (``wait=False``: at once)."""
        return await self._app_action(app, "stop", False, None, wait, timeout)

    async def restart_app(
        self,
        app: str,
        *,
        rolling: bool = False,
        batch: int | None = None,
        wait: bool = True,
        timeout: float | None = None,
    ) -> list[ActionItem]:
        """Restart every instance of ``app`` at once, or with ``rolling`` ``batch``
        at a time (the next batch once the one before runs again; a batch that
        does not stops the roll, the rest ``skipped``); answers each one's outcome
        (``wait=False``: at once, the roll goes on in the daemon)."""
        return await self._app_action(app, "restart", rolling, batch, wait, timeout)

    async def update_instance(self, app: str, name: str, **fields: Any) -> Instance:
        """Patch an instance (InstancePatch fields); it takes effect at the next start."""
        _, data = await self._json("PATCH", _instance_path(app, name), fields)
        return self._parse(Instance.from_json, data)

    async def delete_instance(self, app: str, name: str, wait: bool = True) -> Instance | None:
        """Stop and remove an instance; answers once it is gone (None).

        With ``wait=False`` the daemon answers at once with the instance as it
        is (still ``stopping``) and removes it once it has stopped.
        """
        return await self._delete(_instance_path(app, name), wait, Instance.from_json)

    async def _action(self, app: str, name: str, action: str, wait: bool = True) -> Instance:
        params = None if wait else {"wait": "false"}
        _, data = await self._json("POST", f"{_instance_path(app, name)}/{action}", params=params)
        return self._parse(Instance.from_json, data)

    async def start(self, app: str, name: str) -> Instance:
        """Start an instance; answers at once (usually ``starting``)."""
        return await self._action(app, name, "start")

    async def stop(self, app: str, name: str, wait: bool = True) -> Instance:
        """Stop an instance; answers once it has stopped (``wait=False``: at once).

        A stop can last the instance's ``stopwaitsecs``: past the client's
        timeout, use ``wait=False`` and poll ``get_instance``.
        """
        return await self._action(app, name, "stop", wait)

    async def restart(self, app: str, name: str, wait: bool = True) -> Instance:
        """Restart an instance; answers once the old process stopped (``wait=False``: at once)."""
        return await self._action(app, name, "restart", wait)

    async def stats(self, app: str, name: str) -> Stats:
        """Process-tree figures of an instance (CPU, RSS, processes) and, for a running Celery
        worker, its ``stats``, ``active`` tasks and live ``pool_size``.
        """
        _, data = await self._json("GET", f"{_instance_path(app, name)}/stats")
        return self._parse(Stats.from_json, data)

    async def lint_app(self, app: str) -> list[LintFinding]:
        """What in ``app``'s effective Celery config will hurt, one finding per
        trap, read from a running worker of it on the branch asked (409 if none)."""
        _, data = await self._json("GET", f"/v1/apps/{_seg(app)}/lint")
        return self._items(LintFinding.from_json, data)

    async def app_stats(self, app: str) -> list[Stats]:
        """Every instance of ``app`` with its process-tree figures (CPU, RSS,
        processes; no Celery part), from every live branch of a cluster (each
        names its ``branch``; silent branches land in ``unreachable``)."""
        _, data = await self._json("GET", f"/v1/apps/{_seg(app)}/stats")
        self.unreachable = []
        self._note_unreachable(data)
        return self._items(Stats.from_json, data)

    # -- queues (declarations of an app) -------------------------------------

    async def queues(self, app: str) -> list[Queue]:
        """The queue declarations of ``app``."""
        _, data = await self._json("GET", f"/v1/apps/{_seg(app)}/queues")
        return self._items(Queue.from_json, data)

    async def get_queue(self, app: str, queue: str) -> Queue:
        """The declaration of ``queue`` in ``app``."""
        _, data = await self._json("GET", _queue_path(app, queue))
        return self._parse(Queue.from_json, data)

    async def queue_consumers(self, app: str, queue: str) -> list[dict[str, Any]]:
        """The instances of ``app`` that consume ``queue`` (``app``, ``name``,
        ``branch``, ``state``), from every live branch of a cluster."""
        _, data = await self._json("GET", f"{_queue_path(app, queue)}/consumers")
        self.unreachable = []
        self._note_unreachable(data)
        return [dict(i) for i in data.get("items", ())]

    async def queue_depth(self, app: str, queue: str) -> QueueDepth:
        """How deep ``queue`` of ``app`` is now: ready on the broker, in flight in
        this branch's workers, consumers."""
        _, data = await self._json("GET", f"{_queue_path(app, queue)}/depth")
        return self._parse(QueueDepth.from_json, data)

    async def app_depth(self, app: str) -> list[QueueDepth]:
        """The depth of every queue of ``app``, read at once."""
        _, data = await self._json("GET", f"/v1/apps/{_seg(app)}/depth")
        return self._items(QueueDepth.from_json, data)

    async def set_scale(
        self,
        app: str,
        on: str,
        per_worker: int,
        min: int,
        max: int,
        down_after: float | None = None,
    ) -> App:
        """Scale ``app``'s workers on the depth of queue ``on``: pool size
        ``clamp(ceil((ready + in_flight) / per_worker), min, max)``, down only
        after ``down_after`` seconds (60 by default)."""
        scale: dict[str, Any] = {"on": on, "per_worker": per_worker, "min": min, "max": max}
        if down_after is not None:
            scale["down_after"] = down_after
        return await self.patch_app(app, {"scale": scale})

    async def clear_scale(self, app: str) -> App:
        """Stop scaling ``app`` on depth (its workers keep their last range)."""
        return await self.patch_app(app, {"scale": None})

    async def put_queue(
        self,
        app: str,
        queue: str,
        exchange: str | None = None,
        exchange_type: str | None = None,
        routing_key: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> tuple[Queue, bool]:
        """Declare (or replace) a queue of ``app``; answer (queue, created)."""
        body: dict[str, Any] = {}
        for key, value in (
            ("exchange", exchange),
            ("exchange_type", exchange_type),
            ("routing_key", routing_key),
        ):
            if value is not None:
                body[key] = value
        if options is not None:
            body["options"] = dict(options)
        status, data = await self._json("PUT", _queue_path(app, queue), body)
        return self._parse(Queue.from_json, data, status), status == 201

    async def delete_queue(self, app: str, queue: str) -> None:
        """Remove a queue declaration (first cancelled on every instance of the app)."""
        await self._call("DELETE", _queue_path(app, queue))

    # -- consumers and autoscale of a celery instance -------------------------

    async def consumers(self, app: str, name: str) -> list[Consumer]:
        """The queues a Celery instance is declared to consume and, while it runs, consumes."""
        _, data = await self._json("GET", f"{_instance_path(app, name)}/queues")
        return self._items(Consumer.from_json, data)

    async def add_consumer(self, app: str, name: str, queue: str) -> list[Consumer]:
        """Make the worker consume ``queue`` (no restart); answers once it confirmed."""
        path = f"{_instance_path(app, name)}/queues/{_seg(queue)}"
        _, data = await self._json("PUT", path)
        return self._items(Consumer.from_json, data)

    async def remove_consumer(self, app: str, name: str, queue: str) -> list[Consumer]:
        """Make the worker stop consuming ``queue``; answers once it confirmed."""
        path = f"{_instance_path(app, name)}/queues/{_seg(queue)}"
        _, data = await self._json("DELETE", path)
        return self._items(Consumer.from_json, data)

    async def autoscale(self, app: str, name: str) -> Autoscale:
        """The declared autoscale range of a Celery instance and, while it runs, the worker's live
        one.
        """
        _, data = await self._json("GET", f"{_instance_path(app, name)}/autoscale")
        return self._parse(Autoscale.from_json, data)

    async def set_autoscale(self, app: str, name: str, min: int, max: int) -> Autoscale:
        """Change the autoscale bounds of a worker (no restart); 422 when min > max."""
        body = {"min": min, "max": max}
        _, data = await self._json("PUT", f"{_instance_path(app, name)}/autoscale", body)
        return self._parse(Autoscale.from_json, data)

    # -- logs ----------------------------------------------------------------

    async def logs(self, app: str, name: str, stream: str = "stdout", tail: int = 100) -> str:
        """The last ``tail`` lines of an instance's stdout or stderr."""
        params = {"stream": stream, "tail": str(tail)}
        _, data = await self._call("GET", f"{_instance_path(app, name)}/logs", params=params)
        return data.decode("utf-8", errors="replace")

    async def reopen_logs(self) -> int:
        """Have the branch reopen its instances' log files by path (after an
        external logrotate moved them); how many files it reopened."""
        _, data = await self._json("POST", "/v1/logs/reopen")
        return int(data["reopened"])

    async def follow_logs(
        self, app: str, name: str, stream: str = "stdout", tail: int = 100
    ) -> AsyncGenerator[str, None]:
        """The last ``tail`` lines, then new output as it comes, until closed.

        Yields text chunks as they arrive (not necessarily whole lines). No
        read timeout applies; only connecting is bounded by ``timeout``.
        """
        path = f"{_instance_path(app, name)}/logs"
        params = {"stream": stream, "tail": str(tail), "follow": "1"}
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.timeout, sock_connect=self.timeout, sock_read=None
        )
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            async with self._get_session().get(
                self.url + path, params=params, timeout=timeout
            ) as resp:
                if resp.status >= 400:
                    raise ApiError.from_body(resp.status, await resp.read())
                async for chunk in resp.content.iter_any():
                    text = decoder.decode(chunk)
                    if text:
                        yield text
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._failed(exc) from exc
        tail_text = decoder.decode(b"", final=True)
        if tail_text:
            yield tail_text


    async def events(
        self,
        app: str | None = None,
        types: Sequence[str] | None = None,
        last_event_id: str | None = None,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The cluster's events as they happen (``GET /v1/events``), each a
        dict with its ``type`` and ``id`` (None for a ``gap`` or
        ``unreachable``, which say what the stream missed), until closed.
        Give ``last_event_id`` (an event's ``id``) to resume after it. No read
        timeout applies; only connecting is bounded by ``timeout``."""
        params = {}
        if app:
            params["app"] = app
        if types:
            params["types"] = ",".join(types)
        headers = {"Accept": "text/event-stream"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.timeout, sock_connect=self.timeout, sock_read=None
        )
        try:
            async with self._get_session().get(
                self.url + "/v1/events", params=params, headers=headers, timeout=timeout
            ) as resp:
                if resp.status >= 400:
                    raise ApiError.from_body(resp.status, await resp.read())
                event_id: str | None = None
                data = ""
                async for raw in resp.content:
                    line = raw.decode(errors="replace").rstrip("\r\n")
                    if line.startswith("id: "):
                        event_id = line[4:]
                    elif line.startswith("data: "):
                        data = line[6:]
                    elif not line and data:
                        yield {**json.loads(data), "id": event_id}
                        event_id, data = None, ""
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._failed(exc) from exc


class Client:
    """The synchronous twin of AsyncClient: same methods, blocking.

    Runs an AsyncClient on a private event loop (so it cannot be used from
    inside a running event loop). Use it as a context manager or call
    ``close()``.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        timeout: float = 30,
        ca: str | None = None,
    ) -> None:
        self._async = AsyncClient(url, token, timeout, ca)
        self._runner: asyncio.Runner | None = asyncio.Runner()

    @property
    def url(self) -> str:
        return self._async.url

    @property
    def unreachable(self) -> list[dict[str, Any]]:
        """The branches the last listing could not reach in time."""
        return self._async.unreachable

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            try:
                runner.run(self._async.close())
            finally:
                runner.close()

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        if self._runner is None:
            coro.close()
            raise RuntimeError("the client is closed")
        return self._runner.run(coro)

    def ping(self) -> bool:
        return self._run(self._async.ping())

    def branch(self) -> Branch:
        return self._run(self._async.branch())

    def branches(self) -> list[Member]:
        return self._run(self._async.branches())

    def member(self, branch_id: str = "self") -> Member:
        return self._run(self._async.member(branch_id))

    def drain(
        self, branch_id: str = "self", on: bool = True, *, move: bool = False
    ) -> dict[str, Any]:
        return self._run(self._async.drain(branch_id, on, move=move))

    def drain_status(self, branch_id: str = "self") -> dict[str, Any]:
        return self._run(self._async.drain_status(branch_id))

    def leave(self) -> None:
        self._run(self._async.leave())

    def cluster_keys(self) -> dict[str, Any]:
        return self._run(self._async.cluster_keys())

    def install_key(self, key: str) -> dict[str, Any]:
        return self._run(self._async.install_key(key))

    def use_key(self, key_id: str) -> dict[str, Any]:
        return self._run(self._async.use_key(key_id))

    def remove_key(self, key_id: str) -> dict[str, Any]:
        return self._run(self._async.remove_key(key_id))

    def exit_daemon(self, keep: bool = False) -> None:
        self._run(self._async.exit_daemon(keep))

    def exit_branch(self, keep: bool = False) -> dict[str, Any]:
        return self._run(self._async.exit_branch(keep))

    def apps(self) -> list[App]:
        return self._run(self._async.apps())

    def get_app(self, name: str) -> App:
        return self._run(self._async.get_app(name))

    def put_app(
        self,
        name: str,
        env: Mapping[str, str] | None = None,
        defaults: Mapping[str, Any] | None = None,
        broker: str | None = None,
        celery_app: str | None = None,
        python: str | None = None,
        pool: str | None = None,
        args: Sequence[str] | None = None,
        autoscale: AutoscaleIn | None = None,
        mingle_gossip: bool | None = None,
        result_backend: str | None = None,
        limits: Mapping[str, Any] | None = None,
    ) -> tuple[App, bool]:
        return self._run(
            self._async.put_app(
                name,
                env,
                defaults,
                broker=broker,
                celery_app=celery_app,
                python=python,
                pool=pool,
                args=args,
                autoscale=autoscale,
                mingle_gossip=mingle_gossip,
                result_backend=result_backend,
                limits=limits,
            )
        )

    def patch_app(self, name: str, changes: Mapping[str, Any]) -> App:
        return self._run(self._async.patch_app(name, changes))

    def celery_setup(self, name: str) -> dict[str, Any]:
        return self._run(self._async.celery_setup(name))

    def celery_config(self, name: str) -> dict[str, Any]:
        return self._run(self._async.celery_config(name))

    def delete_app(self, name: str, wait: bool = True) -> App | None:
        return self._run(self._async.delete_app(name, wait))

    def instances(self, app: str | None = None) -> list[Instance]:
        return self._run(self._async.instances(app))

    def get_instance(self, app: str, name: str) -> Instance:
        return self._run(self._async.get_instance(app, name))

    def add_instance(self, app: str, *, branch: str | None = None, **fields: Any) -> Instance:
        return self._run(self._async.add_instance(app, branch=branch, **fields))

    def add_instances(
        self, app: str, count: int, name: str, *, start_at: int = 0, **fields: Any
    ) -> list[Instance]:
        return self._run(self._async.add_instances(app, count, name, start_at=start_at, **fields))

    def start_app(
        self,
        app: str,
        *,
        rolling: bool = False,
        batch: int | None = None,
        wait: bool = True,
        timeout: float | None = None,
    ) -> list[ActionItem]:
        return self._run(
            self._async.start_app(app, rolling=rolling, batch=batch, wait=wait, timeout=timeout)
        )

    def stop_app(
        self, app: str, *, wait: bool = True, timeout: float | None = None
    ) -> list[ActionItem]:
        return self._run(self._async.stop_app(app, wait=wait, timeout=timeout))

    def restart_app(
        self,
        app: str,
        *,
        rolling: bool = False,
        batch: int | None = None,
        wait: bool = True,
        timeout: float | None = None,
    ) -> list[ActionItem]:
        return self._run(
            self._async.restart_app(app, rolling=rolling, batch=batch, wait=wait, timeout=timeout)
        )

    def update_instance(self, app: str, name: str, **fields: Any) -> Instance:
        return self._run(self._async.update_instance(app, name, **fields))

    def delete_instance(self, app: str, name: str, wait: bool = True) -> Instance | None:
        return self._run(self._async.delete_instance(app, name, wait))

    def start(self, app: str, name: str) -> Instance:
        return self._run(self._async.start(app, name))

    def stop(self, app: str, name: str, wait: bool = True) -> Instance:
        return self._run(self._async.stop(app, name, wait))

    def restart(self, app: str, name: str, wait: bool = True) -> Instance:
        return self._run(self._async.restart(app, name, wait))

    def stats(self, app: str, name: str) -> Stats:
        return self._run(self._async.stats(app, name))

    def app_stats(self, app: str) -> list[Stats]:
        return self._run(self._async.app_stats(app))

    def lint_app(self, app: str) -> list[LintFinding]:
        return self._run(self._async.lint_app(app))

    def queue_consumers(self, app: str, queue: str) -> list[dict[str, Any]]:
        return self._run(self._async.queue_consumers(app, queue))

    def queues(self, app: str) -> list[Queue]:
        return self._run(self._async.queues(app))

    def queue_depth(self, app: str, queue: str) -> QueueDepth:
        return self._run(self._async.queue_depth(app, queue))

    def app_depth(self, app: str) -> list[QueueDepth]:
        return self._run(self._async.app_depth(app))

    def set_scale(
        self,
        app: str,
        on: str,
        per_worker: int,
        min: int,
        max: int,
        down_after: float | None = None,
    ) -> App:
        return self._run(self._async.set_scale(app, on, per_worker, min, max, down_after))

    def clear_scale(self, app: str) -> App:
        return self._run(self._async.clear_scale(app))

    def get_queue(self, app: str, queue: str) -> Queue:
        return self._run(self._async.get_queue(app, queue))

    def put_queue(
        self,
        app: str,
        queue: str,
        exchange: str | None = None,
        exchange_type: str | None = None,
        routing_key: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> tuple[Queue, bool]:
        return self._run(
            self._async.put_queue(app, queue, exchange, exchange_type, routing_key, options)
        )

    def delete_queue(self, app: str, queue: str) -> None:
        self._run(self._async.delete_queue(app, queue))

    def consumers(self, app: str, name: str) -> list[Consumer]:
        return self._run(self._async.consumers(app, name))

    def add_consumer(self, app: str, name: str, queue: str) -> list[Consumer]:
        return self._run(self._async.add_consumer(app, name, queue))

    def remove_consumer(self, app: str, name: str, queue: str) -> list[Consumer]:
        return self._run(self._async.remove_consumer(app, name, queue))

    def autoscale(self, app: str, name: str) -> Autoscale:
        return self._run(self._async.autoscale(app, name))

    def set_autoscale(self, app: str, name: str, min: int, max: int) -> Autoscale:
        return self._run(self._async.set_autoscale(app, name, min, max))

    def logs(self, app: str, name: str, stream: str = "stdout", tail: int = 100) -> str:
        return self._run(self._async.logs(app, name, stream, tail))

    def reopen_logs(self) -> int:
        return self._run(self._async.reopen_logs())

    def follow_logs(
        self, app: str, name: str, stream: str = "stdout", tail: int = 100
    ) -> Generator[str, None, None]:
        """Blocking generator of AsyncClient.follow_logs; Ctrl-C ends it with KeyboardInterrupt."""
        agen = self._async.follow_logs(app, name, stream, tail)

        async def next_chunk() -> str | None:
            try:
                return await anext(agen)
            except StopAsyncIteration:
                return None

        try:
            while (chunk := self._run(next_chunk())) is not None:
                yield chunk
        finally:
            if self._runner is not None:
                self._runner.run(agen.aclose())

    def events(
        self,
        app: str | None = None,
        types: Sequence[str] | None = None,
        last_event_id: str | None = None,
    ) -> Generator[dict[str, Any], None, None]:
        """Blocking generator of AsyncClient.events."""
        agen = self._async.events(app, types, last_event_id)

        async def next_event() -> dict[str, Any] | None:
            try:
                return await anext(agen)
            except StopAsyncIteration:
                return None

        try:
            while (event := self._run(next_event())) is not None:
                yield event
        finally:
            if self._runner is not None:
                self._runner.run(agen.aclose())
