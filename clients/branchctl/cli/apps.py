"""branchctl apps ... and branchctl celery: apps, their Celery settings, a producer's settings."""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Mapping
from typing import Any

import click

from branchctl import render
from branchctl.cli.common import (
    _F,
    POOLS,
    Failed,
    MinMax,
    Options,
    _bounds_text,
    _emit,
    _items,
    _json_or_str,
    _ListingGroup,
    _pairs,
    no_wait_option,
)
from branchctl.cli.limits import LIMIT_FIELDS, limit_options, pop_limits
from branchctl.cli.root import main
from branchctl.client import Client
from branchctl.errors import ApiError
from branchctl.models import ActionItem, App, Instance

# -- apps -------------------------------------------------------------------


def _scale_text(scale: Any) -> str | None:
    if not isinstance(scale, dict):
        return None
    return (
        f"on depth of {scale.get('on')}: 1 process per {scale.get('per_worker')} tasks, "
        f"{scale.get('min')}..{scale.get('max')}, down after {scale.get('down_after')} s"
    )


def _app_text(app: App) -> str:
    fields: dict[str, Any] = {
        "name": app.name,
        "env": dict(app.env),
        "defaults": dict(app.defaults),
        "created": render.timestamp(app.created_at),
    }
    # the Celery settings, when the daemon has them
    if "broker" in app.raw or "embedded_broker" in app.raw:
        fields["broker"] = (
            f"{app.broker or 'filesystem://'} (embedded; a producer's settings: "
            f"branchctl apps celery-config {app.name})"
            if app.embedded_broker
            else app.broker
        )
    celery: dict[str, Any] = {
        "celery_app": app.celery_app,
        "python": app.python,
        "pool": app.pool,
        "args": list(app.args),
        "autoscale": _bounds_text(app.autoscale),
        "mingle_gossip": app.mingle_gossip,
        "result_backend": app.result_backend,
        "scale": _scale_text(app.scale),
    }
    fields.update({k: v for k, v in celery.items() if k in app.raw})
    fields.update(_limits_text(app.raw))
    return render.record(fields)


def _limits_text(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The worker limits that are set, as shown."""
    out = {k: raw[k] for k in _LIMITS if raw.get(k) is not None and raw.get(k) != {}}
    if out.get("max_memory_per_child") is not None:
        out["max_memory_per_child"] = render.size(out["max_memory_per_child"])
    return out


_LIMITS = LIMIT_FIELDS


@main.group(cls=_ListingGroup, invoke_without_command=True)
@click.pass_context
def apps(ctx: click.Context) -> None:
    """List the apps (bare), or manage one."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(apps_list)


@apps.command("list")
def apps_list(opts: Options) -> None:
    """List the apps."""
    with opts.client() as c:
        items = c.apps()
    rows = [
        (
            a.name,
            ",".join(a.env) or None,
            ",".join(a.defaults) or None,
            render.timestamp(a.created_at),
        )
        for a in items
    ]
    _emit(opts, _items(items), render.table(("NAME", "ENV", "DEFAULTS", "CREATED"), rows))


def app_settings(f: _F) -> _F:
    """The options of an app that 'apps add' and 'apps set' share."""
    for option in reversed(
        [
            click.option(
                "--env", "env", multiple=True, metavar="K=V", help="Environment of its instances."
            ),
            click.option(
                "--default",
                "defaults",
                multiple=True,
                metavar="K=V",
                help="Instance default (V is parsed as JSON when it can be: startsecs=0, "
                'command=\'["celery","worker"]\').',
            ),
            click.option(
                "--cwd",
                metavar="DIR",
                help="Working directory of its instances (where a worker imports its "
                "--celery-app module from); the same as --default cwd=DIR.",
            ),
            click.option(
                "--broker", metavar="URL", help="Broker of its workers (default: the embedded one)."
            ),
            click.option("--celery-app", metavar="MODULE", help="The module for 'celery -A'."),
            click.option(
                "--python", metavar="PATH", help="Interpreter or virtualenv of its workers."
            ),
            click.option("--pool", type=click.Choice(POOLS), help="Worker pool."),
            click.option(
                "--autoscale",
                type=MinMax(),
                help="Default autoscale bounds of its workers: min,max.",
            ),
            click.option(
                "--arg", "args", multiple=True, metavar="ARG", help="Worker argument (repeat it)."
            ),
            click.option(
                "--mingle-gossip/--no-mingle-gossip",
                default=None,
                help="Start workers with mingle and gossip (off by default).",
            ),
            click.option(
                "--result-backend",
                metavar="URL",
                help="Where task results go (default on the embedded broker: a file store "
                "in the state dir; elsewhere the app module's own).",
            ),
        ]
    ):
        f = option(f)
    return limit_options(f)


def _app_fields(options: Mapping[str, Any]) -> dict[str, Any]:
    """The body fields given on the command line (None: not given)."""
    defaults = _pairs(options["defaults"], "--default", _json_or_str)
    if options["cwd"] is not None:
        defaults["cwd"] = options["cwd"]
    fields: dict[str, Any] = {
        "env": _pairs(options["env"], "--env") or None,
        "defaults": defaults or None,
        "args": list(options["args"]) or None,
    }
    for key in ("broker", "celery_app", "python", "pool", "autoscale", "mingle_gossip"):
        fields[key] = options[key]
    fields["result_backend"] = options["result_backend"]
    return fields


#: What an app answers for a setting that was never given.
_APP_RESETS: Mapping[str, Any] = {
    "env": {},
    "defaults": {},
    "broker": None,
    "celery_app": None,
    "python": None,
    "pool": "prefork",
    "args": [],
    "autoscale": None,
    "mingle_gossip": False,
    "result_backend": None,
    **dict.fromkeys(_LIMITS[:-1]),
    "task_overrides": {},
}


def _reset_by_replace(old: Mapping[str, Any], sent: Mapping[str, Any]) -> list[str]:
    """The settings a PUT reset: set before, not given now."""
    out = []
    for key, empty in _APP_RESETS.items():
        before = old.get(key)
        if key == "broker" and old.get("embedded_broker"):
            before = None
        if key == "result_backend" and old.get("embedded_broker"):
            continue  # the embedded broker's default store, not a setting
        if sent.get(key) is None and before not in (None, empty):
            out.append(f"{key} (was {json.dumps(before)})")
    return out


@apps.command("add")
@click.argument("name")
@app_settings
def apps_add(opts: Options, /, name: str, **options: Any) -> None:
    """Create app NAME, or replace it (what is not given is reset: use
    'apps set' to change some settings and keep the rest).

    \b
    Example:
      branchctl apps add shop --broker amqp://guest:guest@127.0.0.1:5672// \\
          --celery-app shop.tasks --autoscale 1,4
    """
    limits = pop_limits(options)
    fields = _app_fields(options)
    with opts.client() as c:
        try:
            old: Mapping[str, Any] | None = c.get_app(name).raw
        except ApiError:  # absent (404), or the PUT will say what is wrong
            old = None
        app, created = c.put_app(
            name,
            env=fields["env"] or {},
            defaults=fields["defaults"] or {},
            broker=fields["broker"],
            celery_app=fields["celery_app"],
            python=fields["python"],
            pool=fields["pool"],
            args=fields["args"],
            autoscale=fields["autoscale"],
            mingle_gossip=fields["mingle_gossip"],
            result_backend=fields["result_backend"],
            limits=limits,
        )
    if not created and old is not None:
        reset = _reset_by_replace(old, {**fields, **limits})
        what = f"; reset: {', '.join(reset)}" if reset else ""
        click.echo(
            f"branchctl: app {name!r} existed and was replaced{what} "
            "(use 'branchctl apps set' to change only some settings)",
            err=True,
        )
    verb = "created" if created else "replaced"
    _emit(opts, app.raw, f"{verb} app {app.name!r}\n{_app_text(app)}")


@apps.command("set")
@click.argument("name")
@app_settings
@click.option("--unset-env", "unset_env", multiple=True, metavar="K", help="Remove env K.")
@click.option(
    "--unset-default", "unset_defaults", multiple=True, metavar="K", help="Remove default K."
)
@click.option(
    "--reset",
    "resets",
    multiple=True,
    type=click.Choice(
        ["broker", "celery_app", "python", "pool", "args", "autoscale", "result_backend", *_LIMITS]
    ),
    help="Put a setting back to its default (broker: the embedded one; task_overrides: "
    "none).",
)
def apps_set(
    opts: Options,
    /,
    name: str,
    unset_env: tuple[str, ...],
    unset_defaults: tuple[str, ...],
    resets: tuple[str, ...],
    **options: Any,
) -> None:
    """Change the settings given of app NAME and keep the rest.

    \b
    Example:
      branchctl apps set shop --env LOG=debug --unset-env OLD --pool solo
      branchctl apps set shop --time-limit 300 --soft-time-limit 270 \\
          --max-memory-per-child 512MiB --rate-limit shop.tasks.resize=600/m
    """
    limits = pop_limits(options)
    fields = _app_fields(options)
    changes: dict[str, Any] = {k: v for k, v in fields.items() if v is not None}
    changes.update(limits)
    changes.pop("env", None)
    changes.pop("defaults", None)
    env: dict[str, Any] = {**(fields["env"] or {}), **{k: None for k in unset_env}}
    defaults: dict[str, Any] = {
        **(fields["defaults"] or {}),
        **{k: None for k in unset_defaults},
    }
    if env:
        changes["env"] = env
    if defaults:
        changes["defaults"] = defaults
    for key in resets:
        if key in changes:
            raise click.UsageError(f"--reset {key} and a new value for it together")
        changes[key] = None
    if not changes:
        raise click.UsageError("nothing to change: give at least one setting")
    with opts.client() as c:
        app = c.patch_app(name, changes)
        if set(changes) - _LIVE_APP_FIELDS:
            _say_restart_needed(c, name)
    _emit(opts, app.raw, f"changed app {app.name!r}\n{_app_text(app)}")


#: What a running worker takes at once (per-task limits and its autoscale
#: range by remote control, when the change is stored; the depth policy is
#: the daemon's own): any other app setting reaches an instance when it next
#: starts.
_LIVE_APP_FIELDS = frozenset({"task_overrides", "autoscale"})


def _say_restart_needed(c: Client, app: str) -> None:
    """One line when instances of ``app`` run with the settings they started
    with (as supervisord's ``reread``/``update`` leave it to the user)."""
    try:
        running = [i for i in c.instances(app) if i.state in ("running", "starting")]
    except ApiError:
        return  # the change stands; only the note is missing
    if running:
        click.echo(
            f"branchctl: {len(running)} running instance(s) of app {app!r} keep the settings "
            f"they started with until they restart (branchctl apps restart {app})",
            err=True,
        )


@apps.command("autoscale")
@click.argument("app")
@click.option(
    "--on-depth", "on", metavar="QUEUE", help="Scale on the depth of this queue of the app."
)
@click.option(
    "--per-worker",
    type=click.IntRange(min=1),
    help="Tasks (ready + in flight) one pool process is for.",
)
@click.option("--min", "low", type=click.IntRange(min=0), help="Fewest pool processes.")
@click.option("--max", "high", type=click.IntRange(min=1), help="Most pool processes.")
@click.option(
    "--down-after",
    type=click.FloatRange(min=0),
    help="Seconds of lower depth before a scale-down (default 60).",
)
@click.option("--off", is_flag=True, help="Stop scaling on depth.")
def apps_autoscale(
    opts: Options,
    app: str,
    on: str | None,
    per_worker: int | None,
    low: int | None,
    high: int | None,
    down_after: float | None,
    off: bool,
) -> None:
    """Scale APP's workers on queue depth, show the policy (no option), or --off.

    Every poll (2 s) the pool size of APP's running workers on this branch
    that consume the queue becomes clamp(ceil((ready + in flight) /
    PER_WORKER), MIN, MAX): up at once, down only after DOWN_AFTER seconds of
    lower readings, through Celery's autoscale control (the worker must run
    with an autoscale range; a shrink takes only idle processes).

    A QUEUE the app does not have (declared, consumed by an instance, in its
    defaults, or Celery's 'celery') is taken, with a warning on stderr: the
    policy may come before its queue and workers.

    Example: branchctl apps autoscale shop --on-depth default --per-worker 20 --min 1 --max 12
    """
    given = [v is not None for v in (on, per_worker, low, high)]
    if off and (any(given) or down_after is not None):
        raise click.UsageError("--off takes no other option")
    if any(given) and not all(given):
        raise click.UsageError("give --on-depth, --per-worker, --min and --max together")
    if low is not None and high is not None and low > high:
        raise click.UsageError(f"--min ({low}) is greater than --max ({high})")
    with opts.client() as c:
        if off:
            a = c.clear_scale(app)
        elif all(given):
            assert on is not None and per_worker is not None
            assert low is not None and high is not None
            a = c.set_scale(app, on, per_worker, low, high, down_after)
        else:
            a = c.get_app(app)
        queue = a.scale.get("on") if isinstance(a.scale, Mapping) else None
        unknown = _unknown_queue(c, a, queue) if isinstance(queue, str) else None
    _emit(opts, {"scale": a.scale}, _scale_text(a.scale) or "off")
    if unknown:
        click.echo(f"branchctl: warning: {unknown}", err=True)


#: Celery's queue for a task sent with none (``delay()``), and a worker's without -Q.
_CELERY_DEFAULT_QUEUE = "celery"


def _unknown_queue(c: Client, app: App, queue: str) -> str | None:
    """Why a depth policy on ``queue`` scales nothing, if it is not a queue of
    the app: neither declared, nor consumed by one of its instances, nor in
    its defaults, nor Celery's default.

    A warning, not a refusal: a policy may come before its queue and
    workers (a script, an import: the policy is read at each poll)."""
    try:
        known = {q.name for q in c.queues(app.name)}
        for i in c.instances(app.name):
            if i.kind == "celery":
                known.update(i.queues or (_CELERY_DEFAULT_QUEUE,))
    except ApiError:
        return None  # the policy stands; only the check is missing
    known.update(app.defaults.get("queues") or ())
    if queue in known or queue == _CELERY_DEFAULT_QUEUE:
        return None
    have = ", ".join(sorted(known)) or "none"
    return (
        f"app {app.name!r} has no queue {queue!r}: not declared and no instance consumes it "
        f"(its queues: {have}); the policy scales nothing until a worker does "
        f"(branchctl instances add {app.name} --queues {queue}, or fix the name)"
    )


@apps.command("show")
@click.argument("name")
def apps_show(opts: Options, name: str) -> None:
    """Show app NAME."""
    with opts.client() as c:
        app = c.get_app(name)
    _emit(opts, app.raw, _app_text(app))


@apps.command("remove")
@click.argument("name")
@no_wait_option
def apps_remove(opts: Options, name: str, no_wait: bool) -> None:
    """Remove app NAME: its instances are stopped (each up to its stopwaitsecs),
    then removed, then the app. --no-wait answers at once."""
    with opts.client() as c:
        if no_wait:
            c.delete_app(name, wait=False)
            if not opts.json:
                click.echo(f"removing app {name!r}")
            return
        left = c.instances(name)
        # as long as the slowest stop may take, however short --timeout is
        limit = max((i.stopwaitsecs or 0.0 for i in left), default=0.0) + 15.0
        c.delete_app(name, wait=False)
        deadline = time.monotonic() + limit
        said = None
        while True:
            try:
                count = len(c.instances(name))
            except ApiError as exc:
                if exc.status == 404:
                    break
                raise
            if count != said:
                click.echo(f"{name}: removing, {count} instance(s) left", err=True)
                said = count
            if time.monotonic() > deadline:
                raise Failed(
                    f"timeout: app {name!r} is still being removed after {limit:.0f}s; "
                    "branchd goes on with it"
                )
            time.sleep(0.2)
    if not opts.json:
        click.echo(f"removed app {name!r}")


# -- every instance of an app at once (or rolling) ---------------------------

#: Beyond the instances' own stopwaitsecs and startsecs (per batch): the
#: daemon's SIGKILL grace (5 s), its margin (10 s) and the round trip.
_ACTION_GRACE = 20.0
_DOING = {"start": "starting", "stop": "stopping", "restart": "restarting"}


def _action_limit(items: list[Instance], action: str, batches: int) -> float:
    """How long an app action may take: its slowest instance, once per batch."""
    stop = max((i.stopwaitsecs or 0.0 for i in items), default=0.0)
    start = max((i.startsecs or 0.0 for i in items), default=0.0)
    per = (stop if action != "start" else 0.0) + (start if action != "stop" else 0.0)
    return (per + _ACTION_GRACE) * max(1, batches)


def _outcome_line(app: str, item: ActionItem) -> str:
    i = item.instance
    line = f"{app}/{item.name}: {item.outcome}"
    if i is not None and i.pid is not None and item.outcome in ("running", "pending"):
        line += f" (pid {i.pid})"
    if item.error:
        line += f": {item.error}"
    return line


def rolls_by_default(action: str, kinds: list[str]) -> bool:
    """A restart of an app of Celery workers only rolls unless told otherwise:
    all at once, no worker would consume its queues for a whole drain and
    start. Plain processes restart at once, as supervisord's group restart does."""
    return action == "restart" and bool(kinds) and all(k == "celery" for k in kinds)


def _app_action(
    opts: Options, app: str, action: str, no_wait: bool, rolling: bool | None, batch: int | None
) -> None:
    with opts.client() as c:
        items = c.instances(app)
        if rolling is None:
            rolling = rolls_by_default(action, [i.kind for i in items])
        if batch is not None and not rolling:
            raise click.UsageError("--batch needs --rolling (without it all act at once)")
        size = batch or 1
        batches = -(-len(items) // size) if rolling else 1
        if not no_wait:
            how = f", {size} at a time" if rolling else ", all at once"
            click.echo(f"{app}: {_DOING[action]} {len(items)} instance(s){how}", err=True)
        limit = max(opts.timeout, _action_limit(items, action, batches))
        if action == "stop":
            done = c.stop_app(app, wait=not no_wait, timeout=limit)
        else:
            call = c.start_app if action == "start" else c.restart_app
            done = call(app, rolling=rolling, batch=batch, wait=not no_wait, timeout=limit)
    _emit(
        opts, {"items": [dict(d.raw) for d in done]}, "\n".join(_outcome_line(app, d) for d in done)
    )
    bad = [d.name for d in done if not d.ok]
    if bad:
        raise Failed(
            f"not_{'stopped' if action == 'stop' else 'started'}: {len(bad)} of {len(done)} "
            f"instance(s) of {app} did not {action}: {', '.join(bad[:10])}"
            + (" ..." if len(bad) > 10 else "")
        )


def _rolling_options(f: _F) -> _F:
    f = click.option(
        "--batch",
        type=click.IntRange(min=1),
        help="With --rolling: this many at a time [default: 1].",
    )(f)
    return click.option(
        "--rolling/--all-at-once",
        default=None,
        help="A batch at a time, the next once the one before runs again; "
        "a batch that does not stops the rest [default: rolling for a restart of "
        "an app of Celery workers, else all at once].",
    )(f)


@apps.command("start")
@click.argument("name")
@_rolling_options
@no_wait_option
def apps_start(
    opts: Options, name: str, rolling: bool | None, batch: int | None, no_wait: bool
) -> None:
    """Start every instance of app NAME (on the branch asked) and wait until they run.

    Prints each one's outcome; exits 1 when any does not come up (in backoff,
    fatal, or still starting when its time ran out). --no-wait answers at once.
    """
    _app_action(opts, name, "start", no_wait, rolling, batch)


@apps.command("stop")
@click.argument("name")
@no_wait_option
def apps_stop(opts: Options, name: str, no_wait: bool) -> None:
    """Stop every instance of app NAME at once and wait until all stopped.

    Each stop drains as 'instances stop' does (up to its stopwaitsecs, then
    SIGKILL). --no-wait answers at once.
    """
    _app_action(opts, name, "stop", no_wait, False, None)


@apps.command("restart")
@click.argument("name")
@_rolling_options
@no_wait_option
def apps_restart(
    opts: Options, name: str, rolling: bool | None, batch: int | None, no_wait: bool
) -> None:
    """Restart every instance of app NAME, at once or --rolling, and wait until they run.

    An app of Celery workers rolls by default, one at a time (the next once
    the new one answers a ping): its queues are never left without a worker.

    \b
    Examples:
      branchctl apps restart web                       # processes: all at once
      branchctl apps restart shop                      # celery workers: one at a time
      branchctl apps restart shop --all-at-once
      branchctl apps restart web --rolling --batch 2   # never more than 2 down

    Exits 1 when any does not come up again (a rolling restart then stops:
    the rest are 'skipped', still running the old process). --no-wait answers
    at once (a rolling restart goes on in the daemon).
    """
    _app_action(opts, name, "restart", no_wait, rolling, batch)


@apps.command("lint")
@click.argument("name")
def apps_lint(opts: Options, name: str) -> None:
    """What in app NAME's Celery config will hurt, and why: one line per trap.

    Reads the effective config of a running worker of the app (remote
    control 'conf'), on the branch asked. Exits 1 when a trap is an error
    (tasks lost or run twice), 0 for warnings and notes.

    \b
    Example:
      branchctl apps lint shop
      error: acks_late_without_reject_on_worker_lost: task_acks_late without ...
    """
    with opts.client() as c:
        found = c.lint_app(name)
    lines = [f"{f.severity}: {f.rule}: {f.message}" for f in found]
    _emit(opts, {"items": [dict(f.raw) for f in found]}, "\n".join(lines))
    if not found and not opts.json:
        click.echo(f"{name}: no known trap in its Celery config", err=True)
    errors = [f.rule for f in found if f.severity == "error"]
    if errors:
        raise Failed(f"lint: {len(errors)} error(s) in the Celery config of {name}")


def _python_config(name: str, config: Mapping[str, Any]) -> str:
    lines = [
        f"# Celery settings of branchd app {name!r}: save as a module and load it with",
        "# app.config_from_object('<module>'), or app.conf.update(<the dict>).",
    ]
    lines += [f"{key} = {value!r}" for key, value in config.items()]
    return "\n".join(lines)


def _env_lines(env: Mapping[str, str]) -> str:
    lines = []
    for key, value in env.items():
        if key == "PYTHONPATH":  # ours goes after the user's, never shadowing it
            lines.append(f'export PYTHONPATH="${{PYTHONPATH:+$PYTHONPATH:}}"{shlex.quote(value)}')
        else:
            lines.append(f"export {key}={shlex.quote(value)}")
    return "\n".join(lines)


@apps.command("celery-config")
@click.argument("name")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["json", "python", "env"]),
    default="json",
    show_default=True,
    help="json: for app.conf.update(...); python: a config module; env: shell exports "
    "(broker, result backend, transport options, queue declarations: through branchd's loader).",
)
def apps_celery_config(opts: Options, name: str, fmt: str) -> None:
    """The Celery settings a producer of app NAME needs.

    \b
    Examples:
      branchctl apps celery-config shop --format python > shop_celeryconfig.py
      eval "$(branchctl apps celery-config shop --format env)"
    """
    with opts.client() as c:
        setup = c.celery_setup(name)
    config, env = setup["config"], setup.get("env") or {}
    if opts.json or fmt == "json":
        click.echo(json.dumps(config, indent=2, sort_keys=False))
    elif fmt == "python":
        click.echo(_python_config(name, config))
    else:
        click.echo(_env_lines(env))


# Every word after APP is Celery's (its inspect has a --json of its own).
@main.command("celery", takes_json=False, context_settings={"ignore_unknown_options": True})
@click.argument("app")
@click.argument("args", nargs=-1, type=click.UNPROCESSED, required=True)
def celery_command(opts: Options, app: str, args: tuple[str, ...]) -> None:
    """Run Celery's own CLI against app APP's workers and broker.

    \b
    Examples:
      branchctl celery shop -- inspect ping
      branchctl celery shop -- call shop.tasks.add --args '[2, 2]'
    """
    with opts.client() as c:
        setup = c.celery_setup(app)
    if not setup.get("celery_app"):
        raise Failed(
            f"app {app!r} has no celery_app (set it: branchctl apps set {app} --celery-app MODULE)"
        )
    env = dict(os.environ)
    for key, value in (setup.get("env") or {}).items():
        if key == "PYTHONPATH" and env.get("PYTHONPATH"):
            value = os.pathsep.join((env["PYTHONPATH"], value))
        env[key] = value
    python = setup["python"]
    argv = [python, "-m", "celery", "-A", setup["celery_app"], *args]
    cwd = setup.get("cwd")
    try:
        if cwd:
            os.chdir(cwd)
        os.execvpe(python, argv, env)
    except OSError as exc:
        raise Failed(f"cannot run {python} -m celery: {exc.strerror or exc}") from exc
