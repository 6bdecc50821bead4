"""HTTP handlers of API v1 and the route table the OpenAPI document is built from."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from branchd.api import events as events_api
from branchd.api import precheck, schemas
from branchd.errors import BadRequest, Conflict, Full, Invalid, NotFound
from branchd.model import (
    MAX_BATCH,
    NAME_PATTERN,
    NAME_RE,
    NAME_RULE,
    QUEUE_NAME_PATTERN,
    QUEUE_NAME_RULE,
    Action,
    App,
    State,
    valid_name,
    valid_queue_name,
)
from branchd.views import BranchRecord, app_answer, queue_answer

if TYPE_CHECKING:
    # jsonschema itself is imported by _validator, for the first body that
    # precheck cannot vouch for (an invalid one, mostly): with referencing,
    # rpds and attrs it is about 3 MiB resident (issue 10, part 9).
    from jsonschema.protocols import Validator

    # the services' Protocols, for the type checker only: a plain branch's
    # daemon never imports api/backend.py (issue 10, part 9)
    from branchd.api.backend import Cluster, Local, Moves

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

LOCAL: web.AppKey[Local] = web.AppKey("local")
#: This branch's record, from the service that keeps it (never psutil in a handler).
BRANCH: web.AppKey[Callable[[], BranchRecord]] = web.AppKey("branch")
#: Builds the OpenAPI document (0.2 ms) for each request, rarely made: kept,
#: it was 130 KiB of the daemon's resident memory (issue 10, part 9).
OPENAPI: web.AppKey[Callable[[], dict[str, Any]]] = web.AppKey("openapi")
#: Instance listings built at once (none: no limit; see ApiSection.listings_at_once).
LISTINGS = web.AppKey("listings", asyncio.Semaphore)
#: Membership; absent on a cluster of one.
CLUSTER: web.AppKey[Cluster] = web.AppKey("cluster")
#: Sets this branch's draining flag (kept across restarts); absent: no cluster.
DRAIN: web.AppKey[Callable[[bool], None]] = web.AppKey("drain")
#: Moves this branch's instances elsewhere (``drain --move``); absent: no cluster.
MOVES: web.AppKey[Moves] = web.AppKey("moves")
#: The one route of the peer channel (sealed bodies, not JSON; see cluster/service.py).
PEER_PATH = "/v1/cluster/peer"
#: Asks the daemon to exit; True: leave the instances running (an upgrade).
EXIT: web.AppKey[Callable[[bool], None]] = web.AppKey("exit")
#: What the process answering is (pid, state dir, supervision mode), for
#: ``GET /v1/branch``; absent: a server that is no daemon (tests).
DAEMON: web.AppKey[Mapping[str, Any]] = web.AppKey("daemon")

MAX_TAIL = 10_000
#: How often a follow=1 answer checks that its client is still there.
_GONE_CHECK = 0.5


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    ok: int = 200
    response: schemas.Schema | None = None  # None: no body (204) or not JSON
    body: schemas.Schema | None = None
    text: bool = False  # text/plain answer
    binary: bool = False  # application/octet-stream body and answer (sealed)
    query: tuple[tuple[str, schemas.Schema], ...] = field(default_factory=tuple)
    #: 202 with this body: answered before the work ended (``wait=false``).
    accepted: schemas.Schema | None = None
    #: text/event-stream answer (server-sent events, until the client leaves)
    stream: bool = False


def _local(request: web.Request) -> Local:
    return request.app[LOCAL]


def _strict_name(value: str) -> bool:
    # NAME_RE ends in "$", which in Python also matches before a final "\n"
    # ("a\n" passed, then broke the Location header and made odd log paths):
    # the whole string must match.
    return valid_name(value) and NAME_RE.fullmatch(value) is not None


#: What each name in a path is, for its error ("{name}" is an instance's).
_NAMED = {"app": "app", "name": "instance", "queue": "queue"}


def _name(request: web.Request, key: str) -> str:
    value = request.match_info[key]
    if key == "queue":
        if not valid_queue_name(value):
            raise Invalid(f"bad queue name {value!r}: {QUEUE_NAME_RULE}")
    elif not _strict_name(value):
        raise Invalid(f"bad {_NAMED.get(key, key)} name {value!r}: {NAME_RULE}")
    return value


async def _body(request: web.Request, schema: schemas.Schema) -> dict[str, Any]:
    return _checked(schema, await _json_object(request))


async def _json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object (not yet checked against a schema)."""
    raw = await request.read()
    if not raw.strip():
        data: Any = {}
    else:
        try:
            data = json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
        except _NotFinite as exc:
            raise Invalid(f"body: {exc}") from None
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("request body is not valid JSON") from None
        except RecursionError:
            raise BadRequest("request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    return data


def _checked(schema: schemas.Schema, data: dict[str, Any]) -> dict[str, Any]:
    # precheck vouches for most valid bodies; jsonschema judges (and words) the rest
    if precheck.check(schema, data) is not True:
        _validate(schema, data)
    return _as_ints(schema, data)  # type: ignore[no-any-return]


def _validate(schema: schemas.Schema, data: Any) -> None:
    """jsonschema's verdict, and its message for the first (best) error."""
    validator = _validator(schema)
    from jsonschema.exceptions import best_match  # loaded by _validator already

    error = best_match(validator.iter_errors(data))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "body"
        if error.validator == "pattern" and error.validator_value == NAME_PATTERN:
            # The rule in words rather than the regex alone.
            raise Invalid(f"{where}: bad name {error.instance!r}: {NAME_RULE}")
        if error.validator == "pattern" and error.validator_value == QUEUE_NAME_PATTERN:
            raise Invalid(f"{where}: bad name {error.instance!r}: {QUEUE_NAME_RULE}")
        raise Invalid(f"{where}: {error.message}")


def _as_ints(schema: schemas.Schema, data: Any) -> Any:
    """Make the integers JSON Schema accepts as 2.0 real ints, as the model expects
    (a float ``log_max_bytes`` broke log rotation)."""
    kind = schema.get("type")
    integer = kind == "integer" or (isinstance(kind, list) and "integer" in kind)
    if integer and isinstance(data, float):
        return int(data)
    for sub in schema.get("oneOf", ()) or schema.get("anyOf", ()):
        if data is not None and sub.get("type") != "null":
            return _as_ints(sub, data)
    if isinstance(data, dict):
        props = schema.get("properties", {})
        return {k: _as_ints(props[k], v) if k in props else v for k, v in data.items()}
    if isinstance(data, list) and isinstance(schema.get("items"), dict):
        return [_as_ints(schema["items"], v) for v in data]
    return data


class _NotFinite(ValueError):
    pass


def _finite(text: str) -> float:
    # float("1e400") is inf, which passes every "maximum" check and would be
    # stored, then served as Infinity: not JSON either.
    value = float(text)
    if not math.isfinite(value):
        raise _NotFinite(f"number {text} is out of range (numbers must be finite)")
    return value


def _no_constant(word: str) -> Any:
    # Python's json takes NaN and Infinity, which are not JSON: NaN passes every
    # "minimum"/"maximum" and would be stored, then served as invalid JSON.
    raise ValueError(f"{word} is not JSON")


_VALIDATORS: dict[int, Validator] = {}


def _validator(schema: schemas.Schema) -> Validator:
    key = id(schema)
    if key not in _VALIDATORS:
        from jsonschema import Draft202012Validator  # lazily: see TYPE_CHECKING above

        _VALIDATORS[key] = Draft202012Validator(schema)
    return _VALIDATORS[key]


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # allow_nan=False: never emit NaN or Infinity, which are not JSON
    return web.json_response(data, status=status, headers=headers, dumps=_dumps)


#: json.dumps(data, allow_nan=False), the same text, without making an encoder
#: for each call (a listing calls it once per item)
_dumps: Callable[[Any], str] = json.JSONEncoder(allow_nan=False).encode


def _json_items(items: Iterable[Any]) -> web.Response:
    """``_json({"items": [...]})``, the same bytes, each item encoded as soon as
    it is made: a listing of 200 instances holds one item's dict at a time, not
    200 of them (whose high-water mark stayed in the daemon's heap: 1.5 MiB of
    its resident memory after the first listing; issue 10, part 9)."""
    # (bytes from the start: the whole answer is not held as text and bytes at once;
    # the encoder writes ASCII, ensure_ascii being on)
    body = b'{"items": [' + b", ".join(_dumps(item).encode() for item in items) + b"]}"
    return web.Response(body=body, content_type="application/json", charset="utf-8")


# branch -------------------------------------------------------------------


async def ping(request: web.Request) -> web.Response:
    return _json({"ok": True})


def branch_info(request: web.Request) -> dict[str, Any]:
    return request.app[BRANCH]().to_json()


async def get_branch(request: web.Request) -> web.Response:
    """Its record and, from a daemon, what ``branchctl daemon status`` shows
    beside it: the process, its instances by state, its cluster's members by
    state."""
    body = branch_info(request)
    daemon = request.app.get(DAEMON)
    if daemon is None:
        return _json(body)
    body.update(daemon)
    views = await _local(request).instances.list_instances()
    states = Counter(v.runtime.state.value for v in views)
    body["instance_states"] = {s.value: states[s.value] for s in State}
    cluster = request.app.get(CLUSTER)
    if cluster is None:
        body["cluster"] = None
    else:
        members = Counter(str(m.get("state")) for m in cluster.branches())
        body["cluster"] = {"members": dict(sorted(members.items()))}
    return _json(body)


def _solo(request: web.Request, *, names: bool) -> dict[str, Any]:
    """This branch as a cluster of one lists it."""
    rec = request.app[BRANCH]()
    body = rec.to_json()
    if not names:
        body.pop("instances")
        body.pop("running")
    return {
        **body,
        "state": "alive",
        "incarnation": 0,
        "self": True,
        "age": 0.0,
        "since": 0.0,
    }


def _cluster(request: web.Request) -> Cluster:
    cluster = request.app.get(CLUSTER)
    if cluster is None:
        raise Conflict(
            "this branch is not in a cluster (start it with --cluster-key or --join)"
        )
    return cluster


async def list_branches(request: web.Request) -> web.Response:
    cluster = request.app.get(CLUSTER)
    if cluster is None:
        return _json({"items": [_solo(request, names=False)]})
    return _json({"items": cluster.branches()})


async def get_branch_by_id(request: web.Request) -> web.Response:
    branch_id = request.match_info["id"]
    cluster = request.app.get(CLUSTER)
    if cluster is not None:
        return _json(cluster.branch(branch_id))
    me = _solo(request, names=True)
    if branch_id not in ("self", me["id"]):
        raise NotFound(f"no branch {branch_id!r} is known here (a cluster of one)")
    return _json(me)


async def leave(request: web.Request) -> web.Response:
    """Say goodbye to the cluster (the others see "left"); the daemon runs on
    alone, answering for itself."""
    spent = await _cluster(request).leave()
    return _json({"left": True, "told": spent}, status=202)


async def drain(request: web.Request) -> web.Response:
    """``?move=1``: and move its instances elsewhere, one at a time (202:
    the move goes on; ``GET .../drain`` says where it stands)."""
    move = _flag(request.query.get("move", "0"), "move")
    answer = _draining(request, True)
    if move:
        answer["move"] = request.app[MOVES].start()
    return _json(answer, status=202 if move else 200)


async def undrain(request: web.Request) -> web.Response:
    return _json(_draining(request, False))


async def drain_status(request: web.Request) -> web.Response:
    _draining(request, None)
    me = request.app[BRANCH]()
    return _json({"id": me.id, "draining": me.capacity.draining, "move": _moves(request)})


def _moves(request: web.Request) -> dict[str, Any] | None:
    moves = request.app.get(MOVES)
    return moves.current() if moves is not None else None


def _draining(request: web.Request, on: bool | None) -> dict[str, Any]:
    """This branch takes no new instance (``on``) or takes them again (its
    own keep running), or (None) is only looked at. Another branch's id was
    forwarded to it already."""
    branch_id = request.match_info["id"]
    me = request.app[BRANCH]()
    if branch_id not in ("self", me.id):
        raise NotFound(f"no branch {branch_id!r} is known here")
    setter = request.app.get(DRAIN)
    if setter is None:
        raise Conflict("this branch cannot be drained (not in a cluster)")
    if on is not None:
        setter(on)  # (an undrain stops a move after the instance under way)
    return {"id": me.id, "draining": on, "move": _moves(request)}


async def peer(request: web.Request) -> web.Response:
    body = await request.read()
    answer = _cluster(request).peer(body)
    return web.Response(body=answer, content_type="application/octet-stream")


async def list_keys(request: web.Request) -> web.Response:
    return _json(await _cluster(request).keys())


async def install_key(request: web.Request) -> web.Response:
    body = await _body(request, schemas.KEY_IN)
    return _json(await _cluster(request).install_key(body["key"]))


async def use_key(request: web.Request) -> web.Response:
    return _json(await _cluster(request).use_key(request.match_info["id"]))


async def remove_key(request: web.Request) -> web.Response:
    return _json(await _cluster(request).remove_key(request.match_info["id"]))


async def daemon_exit(request: web.Request) -> web.StreamResponse:
    body = await _body(request, schemas.EXIT_IN)
    return await _exit(request, bool(body.get("keep", False)))


async def branch_exit(request: web.Request) -> web.StreamResponse:
    """``?keep=1``: the upgrade path without signals (as SIGUSR2); without
    it every instance stops first (as SIGTERM)."""
    await _body(request, schemas.EMPTY)
    return await _exit(request, _flag(request.query.get("keep", "0"), "keep"))


async def _exit(request: web.Request, keep: bool) -> web.StreamResponse:
    on_exit = request.app.get(EXIT)
    if on_exit is None:
        raise Conflict("this server cannot be told to exit")
    # The answer is written out before the exit begins: the exit closes the
    # listener, and a client must learn that its request was taken.
    response = _json({"exiting": True, "keep": keep}, status=202)
    await response.prepare(request)
    await response.write_eof()
    asyncio.get_running_loop().call_soon(on_exit, keep)
    return response


async def openapi(request: web.Request) -> web.Response:
    return _json(request.app[OPENAPI]())


# apps -----------------------------------------------------------------------


def _app_json(request: web.Request, app: App, *, listing: bool = False) -> dict[str, Any]:
    celery = _local(request).celery
    broker, backend = celery.effective_broker(app), celery.effective_backend(app)
    return app_answer(app, broker, backend, listing=listing)


async def list_apps(request: web.Request) -> web.Response:
    apps = await _local(request).apps.list_apps()
    return _json({"items": [_app_json(request, a, listing=True) for a in apps]})


async def put_app(request: web.Request) -> web.Response:
    name = _name(request, "app")
    body = await _body(request, schemas.APP_IN)
    celery = {k: v for k, v in body.items() if k not in ("env", "defaults")}
    app, created = await _local(request).apps.put_app(
        name, body.get("env", {}), body.get("defaults", {}), celery
    )
    return _json(_app_json(request, app), status=201 if created else 200)


async def get_app(request: web.Request) -> web.Response:
    app = await _local(request).apps.get_app(_name(request, "app"))
    return _json(_app_json(request, app))


async def patch_app(request: web.Request) -> web.Response:
    body = await _body(request, schemas.APP_PATCH)
    app = await _local(request).apps.patch_app(_name(request, "app"), body)
    return _json(_app_json(request, app))


async def celery_config(request: web.Request) -> web.Response:
    return _json(await _local(request).celery.celery_config(_name(request, "app")))


# queues (declarations) ----------------------------------------------------------


async def list_queues(request: web.Request) -> web.Response:
    queues = await _local(request).apps.list_queues(_name(request, "app"))
    return _json({"items": [queue_answer(q) for q in queues]})


async def get_queue(request: web.Request) -> web.Response:
    queue = await _local(request).apps.get_queue(_name(request, "app"), _name(request, "queue"))
    return _json(queue_answer(queue))


async def put_queue(request: web.Request) -> web.Response:
    app, name = _name(request, "app"), _name(request, "queue")
    body = await _body(request, schemas.QUEUE_IN)
    queue, created = await _local(request).apps.put_queue(app, name, body)
    return _json(queue_answer(queue), status=201 if created else 200)


async def delete_queue(request: web.Request) -> web.Response:
    await _local(request).celery.delete_queue(_name(request, "app"), _name(request, "queue"))
    return web.Response(status=204)


# queue depth (issue 16, part 4) ------------------------------------------------------


async def queue_depth(request: web.Request) -> web.Response:
    app, queue = _name(request, "app"), _name(request, "queue")
    return _json(await _local(request).depth.queue_depth(app, queue))


async def app_depth(request: web.Request) -> web.Response:
    return _json({"items": await _local(request).depth.app_depth(_name(request, "app"))})


# consumers and autoscale of a running worker --------------------------------------


async def list_consumers(request: web.Request) -> web.Response:
    items = await _local(request).celery.consumers(_name(request, "app"), _name(request, "name"))
    return _json({"items": items})


async def add_consumer(request: web.Request) -> web.Response:
    app, name, queue = _name(request, "app"), _name(request, "name"), _name(request, "queue")
    await _body(request, schemas.EMPTY)
    return _json({"items": await _local(request).celery.add_consumer(app, name, queue)})


async def remove_consumer(request: web.Request) -> web.Response:
    app, name, queue = _name(request, "app"), _name(request, "name"), _name(request, "queue")
    return _json({"items": await _local(request).celery.remove_consumer(app, name, queue)})


async def get_autoscale(request: web.Request) -> web.Response:
    app, name = _name(request, "app"), _name(request, "name")
    return _json(await _local(request).celery.get_autoscale(app, name))


async def put_autoscale(request: web.Request) -> web.Response:
    app, name = _name(request, "app"), _name(request, "name")
    body = await _body(request, schemas.AUTOSCALE_IN)
    if not body:
        raise Invalid("body: 'min' and 'max' are required")
    if body["min"] > body["max"]:
        raise Invalid(f"autoscale min ({body['min']}) is greater than max ({body['max']})")
    return _json(await _local(request).celery.set_autoscale(app, name, body["min"], body["max"]))


async def delete_app(request: web.Request) -> web.Response:
    wait = _wait(request)
    app = await _local(request).instances.delete_app(_name(request, "app"), wait=wait)
    if not wait:
        return _json(_app_json(request, app), status=202)
    return web.Response(status=204)


# instances --------------------------------------------------------------------


async def list_instances(request: web.Request) -> web.Response:
    app = _name(request, "app")
    slots = request.app.get(LISTINGS)
    async with slots if slots is not None else contextlib.nullcontext():
        if slots is not None:
            # Hold the slot across one turn of the loop: a listing is all
            # synchronous work, so without this turn each would take the free
            # slot, build and give it back in one go, and a hundred would run
            # back to back before the loop reads the next request (a ping).
            await asyncio.sleep(0)
        views = await _local(request).instances.list_instances(app)
        return _json_items(v.to_json(listing=True) for v in views)


async def create_instance(request: web.Request) -> web.Response:
    app = _name(request, "app")
    data = await _json_object(request)
    if "count" in data:
        return await _create_instances(request, app, _checked(schemas.INSTANCES_IN, data))
    body = _checked(schemas.INSTANCE_IN, data)
    if CLUSTER in request.app:
        # admission control: this branch's own live figures have the last word
        # (the sender chose on gossiped ones); "full" sends it to the next choice
        # (placement: a cluster's only, imported by its first create here)
        from branchd.placement import need_of, why_not

        me = request.app[BRANCH]()
        need = need_of(body, await _local(request).apps.get_app(app), cpus=me.capacity.cpus)
        reason = why_not(me, need)
        if reason is not None:
            raise Full(f"branch {me.id} has no room for {need}: {reason}")
    if "name" in body and not _strict_name(body["name"]):
        raise Invalid(f"name: bad instance name {body['name']!r}: {NAME_RULE}")
    view = await _local(request).instances.create_instance(app, body)
    location = f"/v1/apps/{app}/instances/{view.spec.name}"
    return _json(view.to_json(), status=201, headers={"Location": location})


#: Why a count create is refused in a cluster.
COUNT_IN_CLUSTER = (
    "count: a count create makes its instances on one branch, and this one is in a "
    "cluster, where each new instance is placed where there is room: create them one "
    "by one (branchctl instances add APP --name NAME ...)"
)


async def _create_instances(request: web.Request, app: str, body: dict[str, Any]) -> web.Response:
    """``count`` instances from one template: 201 with them all, or one error
    naming the rule and nothing created."""
    if CLUSTER in request.app:
        raise Invalid(COUNT_IN_CLUSTER)
    fields = {k: v for k, v in body.items() if k not in ("count", "name", "start_at")}
    views = await _local(request).groups.create_instances(
        app, fields, body["count"], body["name"], body.get("start_at", 0)
    )
    return _json({"items": [v.to_json() for v in views]}, status=201)


def _app_action(action: Action) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        app, wait = _name(request, "app"), _wait(request)
        rolling = _flag(request.query.get("rolling", "0"), "rolling")
        batch = 1
        if "batch" in request.query:
            try:
                batch = int(request.query["batch"])
            except ValueError:
                raise BadRequest("batch must be an integer") from None
            if not rolling:
                raise Invalid("batch: a batch size needs rolling=1 (without it all act at once)")
            if not 1 <= batch <= MAX_BATCH:
                raise Invalid(f"batch {batch} is out of range: 1 to {MAX_BATCH}")
        if rolling and action is Action.STOP:
            raise Invalid(
                "rolling: a stop has no batch to wait for (rolling is for start and restart)"
            )
        items = await _local(request).groups.act(
            app, action, rolling=rolling, batch=batch, wait=wait
        )
        return _json({"items": [i.to_json() for i in items]}, status=200 if wait else 202)

    return handler


async def get_instance(request: web.Request) -> web.Response:
    instances = _local(request).instances
    view = await instances.get_instance(_name(request, "app"), _name(request, "name"))
    return _json(view.to_json())


async def patch_instance(request: web.Request) -> web.Response:
    app, name = _name(request, "app"), _name(request, "name")
    body = await _body(request, schemas.INSTANCE_PATCH)
    view = await _local(request).instances.update_instance(app, name, body)
    return _json(view.to_json())


def _wait(request: web.Request) -> bool:
    """``?wait=false``: answer at once, the instance as it is (a stop can take
    its whole stopwaitsecs, longer than a client's HTTP timeout)."""
    return _flag(request.query.get("wait", "1"), "wait")


async def delete_instance(request: web.Request) -> web.Response:
    app, name, wait = _name(request, "app"), _name(request, "name"), _wait(request)
    view = await _local(request).instances.delete_instance(app, name, wait=wait)
    if not wait:
        return _json(view.to_json(), status=202)
    return web.Response(status=204)


def _action(method: str, *, waits: bool = False) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        app, name = _name(request, "app"), _name(request, "name")
        extra = {"wait": _wait(request)} if waits else {}
        view = await getattr(_local(request).instances, method)(app, name, **extra)
        return _json(view.to_json())

    return handler


async def stats(request: web.Request) -> web.Response:
    instances = _local(request).instances
    result = await instances.instance_stats(_name(request, "app"), _name(request, "name"))
    return _json(result.to_json())


async def app_stats(request: web.Request) -> web.Response:
    """Every instance of an app with its figures (a cluster gathers them)."""
    items = await _local(request).instances.app_stats(_name(request, "app"))
    return _json({"items": [s.listed() for s in items]})


async def app_lint(request: web.Request) -> web.Response:
    """The traps in an app's Celery config, read from a running worker here."""
    items = await _local(request).celery.lint(_name(request, "app"))
    return _json({"items": items})


async def queue_consumers(request: web.Request) -> web.Response:
    """The instances of an app that consume a queue (a cluster gathers them)."""
    app, queue = _name(request, "app"), request.match_info["queue"]
    views = await _local(request).instances.list_instances(app)
    items = [
        {"app": v.spec.app, "name": v.spec.name, "branch": v.spec.branch,
         "state": v.runtime.state.value}
        for v in views
        if queue in v.spec.queues
    ]  # fmt: skip
    return _json({"items": items})


def _flag(value: str, key: str) -> bool:
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no", ""):
        return False
    raise BadRequest(f"{key} must be 0 or 1")


async def logs(request: web.Request) -> web.StreamResponse:
    app, name = _name(request, "app"), _name(request, "name")
    stream = request.query.get("stream", "stdout")
    if stream not in ("stdout", "stderr"):
        raise BadRequest("stream must be stdout or stderr")
    try:
        tail = int(request.query.get("tail", "100"))
    except ValueError:
        raise BadRequest("tail must be an integer") from None
    if not 0 <= tail <= MAX_TAIL:
        raise BadRequest(f"tail must be between 0 and {MAX_TAIL}")
    follow = _flag(request.query.get("follow", "0"), "follow")
    logs = _local(request).logs
    lines = await logs.read_logs(app, name, stream, tail)
    text = "".join(line if line.endswith("\n") else line + "\n" for line in lines)
    if not follow:
        return web.Response(text=text, content_type="text/plain")
    response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    await response.prepare(request)
    await response.write(text.encode())
    # aiohttp does not cancel a handler when its client leaves, and a quiet log
    # gives no write to fail on: watch the connection, or the follower stays.
    pump = asyncio.ensure_future(_pump(logs.follow_logs(app, name, stream), response))
    try:
        while not pump.done():
            await asyncio.wait({pump}, timeout=_GONE_CHECK)
            if request.transport is None or request.transport.is_closing():
                break
    finally:
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await pump
    return response


async def reopen_logs(request: web.Request) -> web.Response:
    """This branch's log files reopened by path (after an external logrotate)."""
    await _body(request, schemas.EMPTY)
    return _json({"reopened": await _local(request).logs.reopen()})


async def _pump(lines: AsyncIterator[str], response: web.StreamResponse) -> None:
    try:
        async for line in lines:
            # follow() yields lines without their newline.
            await response.write(line.encode() + b"\n")
    finally:
        aclose = getattr(lines, "aclose", None)
        if aclose is not None:
            await aclose()


async def events(request: web.Request) -> web.StreamResponse:
    if events_api.JOURNAL not in request.app:
        raise NotFound("this server keeps no event journal")
    return await events_api.stream_events(request)


async def metrics(request: web.Request) -> web.Response:
    # the scrape, at the first one (what it reads is counted by api/meters.py)
    from branchd.api import metrics as metrics_api

    return await metrics_api.scrape(request, _local(request))


async def not_found(request: web.Request) -> web.Response:
    """The catch-all: 405 (with Allow) if the path exists for other methods, else 404."""
    allowed: set[str] = set()
    this = request.match_info.route.resource
    for resource in request.app.router.resources():
        if resource is not this:
            _, methods = await resource.resolve(request)
            allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise NotFound(f"no route {request.path}")


_TAIL_Q = (
    ("stream", {"type": "string", "enum": ["stdout", "stderr"]}),
    ("tail", {"type": "integer", "minimum": 0, "maximum": MAX_TAIL}),
    ("follow", {"type": "string", "enum": ["0", "1"]}),
)

_WAIT_Q = (("wait", {"type": "string", "enum": ["0", "1", "false", "true"]}),)

_ACTION_Q = (
    *_WAIT_Q,
    ("rolling", {"type": "string", "enum": ["0", "1", "false", "true"]}),
    ("batch", {"type": "integer", "minimum": 1, "maximum": MAX_BATCH}),
)

_EVENTS_Q = (
    ("app", schemas.NAME),
    ("types", {"type": "string", "pattern": "^[a-z_]+(,[a-z_]+)*$"}),
)

INST = "/v1/apps/{app}/instances/{name}"
QUEUE = "/v1/apps/{app}/queues/{queue}"

ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/ping", ping, "Liveness check (no token needed)", response=schemas.PING),
    Route("GET", "/v1/branch", get_branch, "This branch", response=schemas.BRANCH),
    Route(
        "GET",
        "/v1/branches",
        list_branches,
        "Known branches",
        response=schemas.items(schemas.BRANCH_ENTRY),
    ),
    Route(
        "GET",
        "/v1/branches/{id}",
        get_branch_by_id,
        "One branch's whole record (``self``: the answering one)",
        response=schemas.BRANCH_ENTRY,
    ),
    Route(
        "POST",
        "/v1/branches/self/leave",
        leave,
        "Leave the cluster gracefully: the others see this branch \"left\", never dead",
        ok=202,
        response={"type": "object"},
    ),
    Route(
        "POST",
        "/v1/branches/{id}/drain",
        drain,
        "Drain a branch: it takes no new instance (placement skips it, and it answers "
        "full); its own keep running, or with ?move=1 are made again elsewhere one at a "
        "time, each new one running before the old one stops (202)",
        response=schemas.DRAINING,
        query=(("move", {"type": "string", "enum": ["0", "1", "false", "true"]}),),
        accepted=schemas.DRAINING,
    ),
    Route(
        "GET",
        "/v1/branches/{id}/drain",
        drain_status,
        "Whether a branch drains, and where its last move (drain ?move=1) stands",
        response=schemas.DRAINING,
    ),
    Route(
        "POST",
        "/v1/branches/{id}/undrain",
        undrain,
        "Take new instances again",
        response=schemas.DRAINING,
    ),
    Route(
        "GET",
        "/v1/cluster/keys",
        list_keys,
        "The cluster keys (by id, never the key) and how many live branches hold each",
        response=schemas.KEYS,
    ),
    Route(
        "POST",
        "/v1/cluster/keys",
        install_key,
        "Rotation step 1: install a key on every live branch (each still seals with its primary)",
        response=schemas.KEY_STEP,
        body=schemas.KEY_IN,
    ),
    Route(
        "POST",
        "/v1/cluster/keys/{id}/use",
        use_key,
        "Rotation step 2: every live branch seals with this key from now on",
        response=schemas.KEY_STEP,
    ),
    Route(
        "DELETE",
        "/v1/cluster/keys/{id}",
        remove_key,
        "Rotation step 3: remove a key (not the primary) from every live branch",
        response=schemas.KEY_STEP,
    ),
    Route(
        "POST",
        PEER_PATH,
        peer,
        "Between branches: push-pull, records, key steps (sealed with the cluster key)",
        binary=True,
    ),
    Route("GET", "/v1/openapi.json", openapi, "This document", response={"type": "object"}),
    Route(
        "POST",
        "/v1/daemon/exit",
        daemon_exit,
        "Exit the daemon: stop every instance first, or with keep leave them running "
        "for the next branchd to adopt (an upgrade)",
        ok=202,
        response=schemas.EXITING,
        body=schemas.EXIT_IN,
    ),
    Route(
        "POST",
        "/v1/branch/exit",
        branch_exit,
        "Exit the daemon (the upgrade path without signals): keep=1 leaves every "
        "instance running for the next branchd on this state dir to adopt (as SIGUSR2); "
        "without it every instance is stopped first (as SIGTERM). Answered before the exit",
        ok=202,
        response=schemas.EXITING,
        query=(("keep", {"type": "string", "enum": ["0", "1", "false", "true"]}),),
    ),
    Route("GET", "/v1/apps", list_apps, "List apps", response=schemas.items(schemas.APP)),
    Route(
        "PUT",
        "/v1/apps/{app}",
        put_app,
        "Create (201) or replace (200) an app",
        ok=201,
        response=schemas.APP,
        body=schemas.APP_IN,
    ),
    Route("GET", "/v1/apps/{app}", get_app, "One app", response=schemas.APP),
    Route(
        "PATCH",
        "/v1/apps/{app}",
        patch_app,
        "Change the fields named (env and defaults merge; null removes a key "
        "or resets a setting); keep the rest",
        response=schemas.APP,
        body=schemas.APP_PATCH,
    ),
    Route(
        "GET",
        "/v1/apps/{app}/celery-config",
        celery_config,
        "The Celery settings a producer (or Celery's own CLI) needs for this app",
        response=schemas.CELERY_CONFIG,
    ),
    Route(
        "DELETE",
        "/v1/apps/{app}",
        delete_app,
        "Stop and remove an app's instances, then it (wait=false: answer 202 at once)",
        ok=204,
        query=_WAIT_Q,
        accepted=schemas.APP,
    ),
    Route(
        "GET",
        "/v1/apps/{app}/instances",
        list_instances,
        "Instances of an app; in a cluster, gathered from every live branch (each "
        "instance names its branch; those that did not answer within 1 s are listed "
        "in unreachable)",
        response=schemas.gathered(schemas.INSTANCE),
    ),
    Route(
        "POST",
        "/v1/apps/{app}/instances",
        create_instance,
        "Create an instance; with count, that many from one name template, all or none "
        "(on a single branch)",
        ok=201,
        response=schemas.INSTANCE_CREATED,
        body=schemas.INSTANCE_CREATE,
    ),
    *(
        Route(
            "POST",
            f"/v1/apps/{{app}}/{action.value}",
            _app_action(action),
            f"{action.value.capitalize()} every instance of the app on this branch, at once"
            + (
                " (waits until each stopped; wait=false: 202 at once)"
                if action is Action.STOP
                else " or rolling=1 with batch=N (the next batch once the one before runs "
                "again); waits for each outcome (wait=false: 202 at once)"
            ),
            response=schemas.APP_ACTION,
            query=_WAIT_Q if action is Action.STOP else _ACTION_Q,
            accepted=schemas.APP_ACTION,
        )
        for action in Action
    ),
    Route("GET", INST, get_instance, "One instance", response=schemas.INSTANCE),
    Route(
        "PATCH",
        INST,
        patch_instance,
        "Change an instance (effective at its next start)",
        response=schemas.INSTANCE,
        body=schemas.INSTANCE_PATCH,
    ),
    Route(
        "DELETE",
        INST,
        delete_instance,
        "Stop and remove an instance (wait=false: 202 at once, removed once stopped)",
        ok=204,
        query=_WAIT_Q,
        accepted=schemas.INSTANCE,
    ),
    Route(
        "POST",
        INST + "/start",
        _action("start_instance"),
        "Start an instance",
        response=schemas.INSTANCE,
    ),
    Route(
        "POST",
        INST + "/stop",
        _action("stop_instance", waits=True),
        "Stop an instance (waits for it; wait=false: answers at once, still stopping)",
        response=schemas.INSTANCE,
        query=_WAIT_Q,
    ),
    Route(
        "POST",
        INST + "/restart",
        _action("restart_instance", waits=True),
        "Restart an instance (waits for the stop; wait=false: answers at once)",
        response=schemas.INSTANCE,
        query=_WAIT_Q,
    ),
    Route(
        "GET",
        INST + "/logs",
        logs,
        "Tail (and follow) an instance's output",
        text=True,
        query=_TAIL_Q,
    ),
    Route(
        "POST",
        "/v1/logs/reopen",
        reopen_logs,
        "Reopen this branch's instance log files by path, after an external logrotate "
        "moved them (a child that writes its file directly keeps the one it has)",
        response=schemas.REOPENED,
    ),
    Route(
        "GET",
        "/v1/apps/{app}/stats",
        app_stats,
        "Every instance of an app with its process-tree figures, from every live branch",
        response=schemas.gathered(schemas.STATS_ITEM),
    ),
    Route(
        "GET",
        "/v1/apps/{app}/lint",
        app_lint,
        "What in an app's effective Celery config will hurt, one line per trap (read "
        "with remote control conf from a running worker of it on this branch; 409 if none)",
        response=schemas.items(schemas.LINT_ITEM),
    ),
    Route(
        "GET",
        QUEUE + "/consumers",
        queue_consumers,
        "The instances of an app that consume a queue, from every live branch",
        response=schemas.gathered(schemas.CONSUMER_ITEM),
    ),
    Route(
        "GET",
        INST + "/stats",
        stats,
        "Process-tree figures of an instance (plus Celery's stats and active tasks)",
        response=schemas.STATS,
    ),
    Route(
        "GET",
        "/v1/apps/{app}/queues",
        list_queues,
        "Queue declarations of an app",
        response=schemas.items(schemas.QUEUE),
    ),
    Route("GET", QUEUE, get_queue, "One queue declaration", response=schemas.QUEUE),
    Route(
        "GET",
        QUEUE + "/depth",
        queue_depth,
        "A queue's depth: ready messages and consumers as the broker counts them, in "
        "flight (running + reserved) as this branch's workers hold them; a queue of the "
        "app (declared, consumed by an instance, in its defaults) or Celery's default "
        "'celery'",
        response=schemas.DEPTH,
    ),
    Route(
        "GET",
        "/v1/apps/{app}/depth",
        app_depth,
        "The depth of every queue of an app (declared, consumed by an instance, in its "
        "defaults), read at once; Celery's default 'celery' too when a worker consumes it "
        "or it holds messages",
        response=schemas.items(schemas.DEPTH),
    ),
    Route(
        "PUT",
        QUEUE,
        put_queue,
        "Declare (201) or replace (200) a queue: exchange, type, routing key, options",
        ok=201,
        response=schemas.QUEUE,
        body=schemas.QUEUE_IN,
    ),
    Route(
        "DELETE",
        QUEUE,
        delete_queue,
        "Cancel a queue on every instance of the app, then forget it",
        ok=204,
    ),
    Route(
        "GET",
        INST + "/queues",
        list_consumers,
        "Queues a celery instance consumes (wanted and live)",
        response=schemas.items(schemas.CONSUMER),
    ),
    Route(
        "PUT",
        INST + "/queues/{queue}",
        add_consumer,
        "Make a running worker consume a queue, no restart (persisted first)",
        response=schemas.items(schemas.CONSUMER),
        body=schemas.EMPTY,
    ),
    Route(
        "DELETE",
        INST + "/queues/{queue}",
        remove_consumer,
        "Make a running worker stop consuming a queue (persisted first)",
        response=schemas.items(schemas.CONSUMER),
    ),
    Route(
        "GET",
        INST + "/autoscale",
        get_autoscale,
        "Declared and live concurrency range of a celery instance",
        response=schemas.AUTOSCALE,
    ),
    Route(
        "PUT",
        INST + "/autoscale",
        put_autoscale,
        "Change a worker's concurrency range at runtime, no restart",
        response=schemas.AUTOSCALE,
        body=schemas.AUTOSCALE_IN,
    ),
    # issue 17, parts 1 and 2 (api/events.py, api/metrics.py)
    Route(
        "GET",
        "/v1/events",
        events,
        "Follow the cluster's events (server-sent events; Last-Event-ID resumes)",
        stream=True,
        query=_EVENTS_Q,
    ),
    Route(
        "GET",
        "/metrics",
        metrics,
        "This branch in Prometheus' text format (no token with --metrics-public)",
        text=True,
    ),
)
