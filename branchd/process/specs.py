"""Pure: user fields → declarations (with kind defaults), declarations → JSON views."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from branchd.celery.urls import broker_url_problem, is_embedded_url, result_backend_problem
from branchd.errors import Invalid
from branchd.model import (
    CELERY_FIELDS,
    LIMIT_FIELDS,
    NULLABLE_SPEC_FIELDS,
    ORDER_FIELDS,
    POLICY_FIELDS,
    POOLS,
    PROBE_FIELDS,
    SPEC_FIELDS,
    App,
    Autorestart,
    Autoscale,
    CelerySettings,
    Desired,
    InstanceSpec,
    Kind,
    Limits,
    ScalePolicy,
    startretries_from,
    umask_from,
    valid_name,
)
from branchd.process.probes import probe_text

#: Instance fields a user may set (in a create, a patch or an app's defaults).
SETTABLE = POLICY_FIELDS + SPEC_FIELDS + CELERY_FIELDS + ORDER_FIELDS

#: Celery workers take time to start and must be given time to finish their
#: tasks on a stop (supervisord's 10 s kills long tasks; Celery's own sample
#: uses 600 s). startsecs is the time allowed to answer a first ping.
CELERY_DEFAULTS: Mapping[str, Any] = {"startsecs": 30.0, "stopwaitsecs": 600.0}


def autoscale_from(value: Any) -> Autoscale | None:
    if value is None:
        return None
    auto = Autoscale(min=int(value["min"]), max=int(value["max"]))
    if auto.min > auto.max:
        raise Invalid(f"autoscale min ({auto.min}) is greater than max ({auto.max})")
    if auto.max < 1:
        raise Invalid("autoscale max must be at least 1")
    return auto


def scale_from(value: Any) -> ScalePolicy | None:
    """An app's depth scaling policy (issue 16, part 5), checked as a whole."""
    if value is None:
        return None
    policy = ScalePolicy.from_wire(value)
    if policy.min > policy.max:
        raise Invalid(f"scale min ({policy.min}) is greater than max ({policy.max})")
    if policy.max < 1 or policy.per_worker < 1:
        raise Invalid("scale max and per_worker must be at least 1")
    if policy.down_after < 0:
        raise Invalid("scale down_after must not be negative")
    return policy


def build_spec(
    app: App, name: str, fields: Mapping[str, Any], branch: str, now: float
) -> InstanceSpec:
    """Instance fields over the app's defaults over the kind's defaults."""
    kind = Kind(fields.get("kind", Kind.PROCESS))
    check_kind_fields(kind, fields)
    base = dict(CELERY_DEFAULTS) if kind == Kind.CELERY else {}
    defaults = _one_concurrency(app.defaults, fields)
    if kind == Kind.CELERY:  # (an app's probes are for its processes: a worker has its ping)
        defaults = {k: v for k, v in defaults.items() if k not in PROBE_FIELDS}
    merged = {**base, **defaults, **fields}
    return apply_fields(
        InstanceSpec(app=app.name, name=name, command=(), branch=branch, created_at=now), merged
    )


def creation_fields(spec: InstanceSpec) -> dict[str, Any]:
    """The create body that makes ``spec`` again, on another branch (a move):
    its name and kind and every field a user may set, as the spec has them now
    (the app's defaults it took included: a default changed since does not
    change it on the way); created running only if it is wanted running."""
    wire = spec.to_wire()
    keys = [k for k in SETTABLE if spec.kind == Kind.CELERY or k not in CELERY_FIELDS]
    if spec.kind == Kind.CELERY:
        keys = [k for k in keys if k not in PROBE_FIELDS]
    if spec.kind == Kind.CELERY:
        keys.remove("command")  # (built from the app)
    body = {k: wire[k] for k in keys if wire.get(k) is not None}
    body.update(name=spec.name, kind=spec.kind.value, autostart=spec.desired == Desired.RUNNING)
    return body


#: Instance fields whose null is a value of their own, kept as given: none (no
#: cwd, umask, env file, probe, cgroup or memory limit), or the app's setting,
#: read at each start (pool, autoscale or concurrency, each limit).
NULL_IS_A_VALUE = frozenset(
    {
        *NULLABLE_SPEC_FIELDS,
        "ready",
        "live",
        "memory_limit",
        "pool",
        "autoscale",
        "concurrency",
        *LIMIT_FIELDS,
    }
)


def reset_fields(
    spec: InstanceSpec, defaults: Mapping[str, Any], fields: Mapping[str, Any]
) -> dict[str, Any]:
    """A patch's ``fields`` with each other null put back to the field's
    default: the app's instance ``defaults`` (as a create takes them), else
    the kind's, else the built-in one. ``command`` has none: refused."""
    if "command" in fields and fields["command"] is None:
        raise Invalid(
            "command cannot be reset: a process instance needs one (give the new argv), "
            "and a celery instance has none (its argv is built from the app)"
        )
    out = dict(fields)
    builtin: dict[str, Any] | None = None
    for key, value in fields.items():
        if value is not None or key in NULL_IS_A_VALUE or key not in SETTABLE:
            continue
        if defaults.get(key) is not None and not (
            spec.kind == Kind.CELERY and key in PROBE_FIELDS
        ):
            out[key] = defaults[key]
        elif spec.kind == Kind.CELERY and key in CELERY_DEFAULTS:
            out[key] = CELERY_DEFAULTS[key]
        else:
            if builtin is None:
                blank = InstanceSpec(app=spec.app, name=spec.name, command=(), branch="")
                builtin = replace(blank, kind=spec.kind).to_wire()
            out[key] = builtin[key]
    return out


def check_kind_fields(kind: Kind, fields: Mapping[str, Any]) -> None:
    """Refuse fields given for an instance that its kind has no use for (an
    app's defaults may hold them for its other kind: only what is given counts)."""
    if kind == Kind.PROCESS:
        extra = sorted(k for k in fields if k in CELERY_FIELDS)
        if extra:
            raise Invalid(
                f"{', '.join(extra)}: only for a celery instance (this one is a process); "
                "give kind celery, or leave them out"
            )
    if kind == Kind.CELERY:
        probes = sorted(k for k in fields if k in PROBE_FIELDS)
        if probes:
            raise Invalid(
                f"{', '.join(probes)}: only for a process instance (a celery worker is "
                "ready once it answers a ping, and its health rounds restart a hung one)"
            )


def _one_concurrency(under: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
    """``under`` without the concurrency setting that ``fields`` overrides: an
    autoscale range and a fixed concurrency are two answers to one question,
    and the one given last wins (given together: refused)."""
    given = {k for k in ("autoscale", "concurrency") if fields.get(k) is not None}
    if len(given) == 2:
        raise Invalid(
            "autoscale and concurrency: give one (a range the worker can change at runtime, "
            "or a fixed size), not both"
        )
    out = dict(under)
    for key in given:
        out.pop("concurrency" if key == "autoscale" else "autoscale", None)
    return out


def apply_fields(spec: InstanceSpec, fields: Mapping[str, Any]) -> InstanceSpec:
    """``spec`` with ``fields`` applied; raises Invalid on a bad mix."""
    unknown = set(fields) - set(SETTABLE) - {"kind"}
    if unknown:
        raise Invalid(f"unknown field(s): {', '.join(sorted(unknown))}")
    kind = Kind(fields.get("kind", spec.kind))
    pol: dict[str, Any] = {k: fields[k] for k in POLICY_FIELDS if k in fields}
    if "autorestart" in pol:
        pol["autorestart"] = Autorestart(pol["autorestart"])
    if "exitcodes" in pol:
        pol["exitcodes"] = tuple(int(c) for c in pol["exitcodes"])
    for key in ("startsecs", "stopwaitsecs"):
        if key in pol:
            pol[key] = float(pol[key])
    if "startretries" in pol:
        try:
            pol["startretries"] = startretries_from(pol["startretries"])
        except ValueError as exc:
            raise Invalid(str(exc)) from None
    pol.update(_order_policy(fields))
    policy = replace(spec.policy, **pol)
    plain: dict[str, Any] = {
        k: fields[k] for k in SPEC_FIELDS + CELERY_FIELDS if k in fields and k not in LIMIT_FIELDS
    }
    if any(k in fields for k in LIMIT_FIELDS):
        plain["limits"] = limits_from(fields, spec.limits)
    plain.update(_order_plain(fields))
    for key in ("command", "queues", "args"):
        if key in plain:
            plain[key] = tuple(plain[key])
    if "env" in plain:
        plain["env"] = dict(plain["env"])
    if "env_file" in plain:
        plain["env_file"] = env_files_from(plain["env_file"])
    if plain.get("umask") is not None:
        try:
            plain["umask"] = umask_from(plain["umask"])
        except ValueError as exc:
            raise Invalid(str(exc)) from None
    if "autoscale" in plain:
        plain["autoscale"] = autoscale_from(plain["autoscale"])
    _one_concurrency({}, fields)
    if plain.get("autoscale") is not None and "concurrency" not in fields:
        plain["concurrency"] = None  # a range replaces a fixed size...
    if plain.get("concurrency") is not None and "autoscale" not in fields:
        plain["autoscale"] = None  # ...and the other way round
    if plain.get("cpu_max") is not None:
        plain["cpu_max"] = float(plain["cpu_max"])
    if "hung_after" in plain:
        plain["hung_after"] = float(plain["hung_after"])
    out = replace(spec, kind=kind, policy=policy, **plain)
    if kind == Kind.PROCESS and not out.command:
        raise Invalid("command must be a non-empty argv list")
    if kind == Kind.CELERY:
        if out.command:
            raise Invalid("a celery instance has no command: its argv is built from the app")
        if out.pool is not None and out.pool not in POOLS:
            raise Invalid(f"pool must be one of {', '.join(POOLS)}")
        if len(set(out.queues)) != len(out.queues):
            raise Invalid("queues must not repeat")
    if policy.startretries is not None and policy.startretries < 1:
        raise Invalid('startretries must be at least 1 (or "forever")')
    return out


def _order_policy(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The policy's start order and probe fields among ``fields``."""
    out: dict[str, Any] = {}
    for key in ("after_timeout", "ready_timeout"):
        if key in fields:
            out[key] = float(fields[key])
            if out[key] <= 0:
                raise Invalid(f"{key} must be more than 0 seconds")
    if "live_failures" in fields:
        out["live_failures"] = int(fields["live_failures"])
        if out["live_failures"] < 1:
            raise Invalid("live_failures must be at least 1")
    return out


def _order_plain(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The spec's own start order and probe fields among ``fields``."""
    out: dict[str, Any] = {}
    if "after" in fields:
        names = () if fields["after"] is None else tuple(fields["after"])
        bad = [n for n in names if not isinstance(n, str) or not valid_name(n)]
        if bad:
            raise Invalid(f"after: {bad[0]!r} is not an instance name")
        if len(set(names)) != len(names):
            raise Invalid("after: names must not repeat")
        out["after"] = names
    if "priority" in fields:
        out["priority"] = int(fields["priority"])
    for key in ("ready", "live"):
        if key in fields:
            try:
                out[key] = probe_text(fields[key])
            except ValueError as exc:
                raise Invalid(f"{key}: {exc}") from None
    if out.get("live") == "notify":
        raise Invalid("live: notify says when a process is ready, not whether it lives on")
    for key in ("live_period", "live_timeout"):
        if key in fields:
            out[key] = float(fields[key])
            if out[key] <= 0:
                raise Invalid(f"{key} must be more than 0 seconds")
    return out


def env_files_from(value: Any) -> tuple[str, ...]:
    """``env_file`` as given (one path, a list, or null for none) as the spec
    holds it; each path absolute (a relative one would depend on the daemon's
    own directory), after an optional "-" (skipped when missing)."""
    paths = () if value is None else (value,) if isinstance(value, str) else tuple(value)
    for path in paths:
        if not isinstance(path, str) or not path.removeprefix("-").startswith("/"):
            raise Invalid(
                f"env_file {path!r}: give an absolute path (with a leading '-': "
                "skipped when the file is missing)"
            )
    return paths


def merge_task_overrides(old: Mapping[str, Any], patch: Any) -> dict[str, Any]:
    """``task_overrides`` as a JSON merge patch changes them: task by task and
    key by key; a null task or key removes it, a null map all of them."""
    if patch is None:
        return {}
    if not isinstance(patch, Mapping):
        raise Invalid("task_overrides must be an object of task names")
    out = {name: dict(keys) for name, keys in old.items()}
    for name, keys in patch.items():
        if keys is None:
            out.pop(name, None)
            continue
        if not isinstance(keys, Mapping):
            raise Invalid(f"task_overrides[{name}] must be an object")
        merged = {k: v for k, v in {**out.get(name, {}), **keys}.items() if v is not None}
        if merged:
            out[name] = merged
        else:
            out.pop(name, None)
    return out


def limits_from(fields: Mapping[str, Any], base: Limits | None = None) -> Limits:
    """``base`` with the limit fields among ``fields`` (null: not set;
    ``task_overrides`` merged into the base's, see ``merge_task_overrides``)."""
    wire = (base or Limits()).to_wire()
    wire.update({k: fields[k] for k in LIMIT_FIELDS if k in fields and k != "task_overrides"})
    if "task_overrides" in fields:
        wire["task_overrides"] = merge_task_overrides(
            wire["task_overrides"], fields["task_overrides"]
        )
    try:
        return Limits.from_wire(wire)
    except (TypeError, ValueError, AttributeError) as exc:
        raise Invalid(f"bad limits: {exc}") from None


def celery_settings(body: Mapping[str, Any]) -> CelerySettings:
    """The Celery fields of an app body (a PUT replaces them all)."""
    pool = body.get("pool", "prefork")
    if pool not in POOLS:
        raise Invalid(f"pool must be one of {', '.join(POOLS)}")
    broker = body.get("broker") or None
    if broker is not None:
        problem = broker_url_problem(broker)
        if problem:
            raise Invalid(f"bad broker URL: {problem}")
        if is_embedded_url(broker):
            broker = None  # a bare filesystem:// is the embedded broker
    backend = body.get("result_backend") or None
    if backend is not None:
        problem = result_backend_problem(backend)
        if problem:
            raise Invalid(f"bad result_backend: {problem}")
    return CelerySettings(
        broker=broker,
        celery_app=body.get("celery_app") or None,
        python=body.get("python") or None,
        pool=pool,
        args=tuple(body.get("args", ())),
        autoscale=autoscale_from(body.get("autoscale")),
        mingle_gossip=bool(body.get("mingle_gossip", False)),
        result_backend=backend,
        scale=scale_from(body.get("scale")),
        limits=limits_from(body),
    )
