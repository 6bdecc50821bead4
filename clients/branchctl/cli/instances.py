"""branchctl instances ... (and stats): create, change, start, stop (waiting as
long as a stop lasts), remove."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import click

from branchctl import render
from branchctl.cli.common import (
    _F,
    AUTORESTART,
    INSTANCE_COLUMNS,
    KINDS,
    POOLS,
    SIGNALS,
    ByteSize,
    Failed,
    MinMax,
    NameList,
    Options,
    StartRetries,
    Umask,
    _bounds_text,
    _emit,
    _items,
    _ListingGroup,
    _pairs,
    no_wait_option,
)
from branchctl.cli.limits import LIMIT_FIELDS, limit_options, pop_limits
from branchctl.cli.root import main
from branchctl.client import Client
from branchctl.errors import ApiError
from branchctl.models import Instance, Stats

# -- instances --------------------------------------------------------------


def _instance_row(i: Instance) -> tuple[Any, ...]:
    return (i.app, i.name, i.kind, i.state, i.pid, render.duration(i.uptime), i.restarts)


def _instance_text(i: Instance) -> str:
    fields: dict[str, Any] = dict(i.raw)
    for key in ("started_at", "created_at"):
        if key in fields:
            fields[key] = render.timestamp(fields[key])
    if "uptime" in fields:
        fields["uptime"] = render.duration(fields["uptime"])
    if fields.get("autoscale"):
        fields["autoscale"] = _bounds_text(i.autoscale)
    for key in ("memory_limit", "memory_max", "max_memory_per_child"):
        if fields.get(key) is not None:
            fields[key] = render.size(fields[key])
    return render.record(fields)


def _state_line(i: Instance) -> str:
    line = f"{i.app}/{i.name}: {i.state}"
    if i.pid is not None:
        line += f" (pid {i.pid})"
    if i.reason:
        line += f": {i.reason}"
    return line


def _signal(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """A stop signal: case-insensitive, with or without its SIG prefix."""
    if value is None:
        return None
    signal = value.upper().removeprefix("SIG")
    if signal not in SIGNALS:
        raise click.BadParameter(f"{value!r} is not one of {', '.join(SIGNALS)}")
    return signal


def instance_fields(f: _F) -> _F:
    """The InstanceIn options shared by 'instances add' and 'instances update'."""
    decorators = [
        click.option("--env", "env", multiple=True, metavar="K=V", help="Environment variable."),
        click.option("--cwd", help="Working directory."),
        click.option("--user", help="Run as this user."),
        click.option(
            "--env-file",
            "env_file",
            multiple=True,
            metavar="PATH",
            help="Environment file (systemd EnvironmentFile syntax), read at each start; "
            "repeat it for several (a later one wins). A leading '-': skipped when missing. "
            "Its variables go over the app's env, under the instance's own --env.",
        ),
        click.option(
            "--umask",
            type=Umask(),
            help="The process's umask, in octal (022) [default: the daemon's].",
        ),
        click.option(
            "--memory-max",
            type=ByteSize(),
            help="cgroup memory limit of the whole tree, swap included (512MiB, 2G): the "
            "kernel's OOM killer ends it there. Needs cgroups (root).",
        ),
        click.option(
            "--cpu-max",
            type=click.FloatRange(min=0.01),
            metavar="CORES",
            help="cgroup cpu limit of the whole tree, a share of one core (0.5, 2).",
        ),
        click.option(
            "--pids-max",
            type=click.IntRange(min=1),
            help="cgroup limit of the whole tree's processes and threads.",
        ),
        click.option("--autorestart", type=click.Choice(AUTORESTART)),
        click.option(
            "--exitcode", "exitcodes", type=int, multiple=True, help="Expected exit code."
        ),
        click.option("--startsecs", type=click.FloatRange(min=0)),
        click.option(
            "--startretries",
            type=StartRetries(),
            help="Failed starts in a row before it is fatal, or 'forever' (it keeps "
            "retrying, the backoff capped).",
        ),
        click.option(
            "--stopsignal", metavar="SIGNAL", callback=_signal, help=f"One of {', '.join(SIGNALS)}."
        ),
        click.option("--stopwaitsecs", type=click.FloatRange(min=0)),
        # start order and probes
        click.option(
            "--after",
            "after",
            type=NameList(),
            multiple=True,
            metavar="NAME",
            help="Start only once instance NAME of the app runs (and is ready); repeat it "
            "or give a,b.",
        ),
        click.option(
            "--after-timeout",
            type=_SECONDS,
            metavar="SECONDS",
            help="How long a start waits for them (then a failed start) [default: 60].",
        ),
        click.option(
            "--priority",
            type=int,
            help="supervisord's: lower starts first and stops last when the daemon starts "
            "or stops everything [default: 999].",
        ),
        click.option(
            "--ready",
            metavar="PROBE",
            help="Readiness probe: tcp:HOST:PORT, http:URL, 'exec:COMMAND ARGS' or notify "
            "(sd_notify READY=1); it is running once the probe passes.",
        ),
        click.option(
            "--ready-timeout",
            type=_SECONDS,
            metavar="SECONDS",
            help="How long a start may take to be ready (then a failed start) [default: 60].",
        ),
        click.option(
            "--live",
            metavar="PROBE",
            help="Liveness probe (the forms of --ready but notify): a running process that "
            "fails it --live-failures times in a row is restarted.",
        ),
        click.option("--live-period", type=_SECONDS, metavar="SECONDS", help="[default: 10]"),
        click.option(
            "--live-timeout",
            type=_SECONDS,
            metavar="SECONDS",
            help="How long each try of a probe may take [default: 5].",
        ),
        click.option("--live-failures", type=click.IntRange(min=1), help="[default: 3]"),
        click.option("--autostart/--no-autostart", default=None, help="Start it now and at boot."),
        click.option("--log-max-bytes", type=click.IntRange(min=1024)),
        click.option("--log-backups", type=click.IntRange(min=0)),
        # kind "celery"
        click.option("--queues", type=NameList(), help="Queues it consumes: a,b."),
        click.option("--autoscale", type=MinMax(), help="Autoscale bounds: min,max."),
        click.option(
            "--concurrency", type=click.IntRange(min=1), help="Pool size (without autoscale)."
        ),
        click.option("--pool", type=click.Choice(POOLS), help="Worker pool."),
        click.option(
            "--arg", "args", multiple=True, metavar="ARG", help="Worker argument (repeat it)."
        ),
        click.option("--loglevel", metavar="LEVEL", help="Worker log level (INFO, DEBUG...)."),
        click.option(
            "--hung-after",
            type=click.FloatRange(min=0, min_open=True),
            metavar="SECONDS",
            help="Restart a running worker silent to pings this long.",
        ),
        click.option(
            "--memory-limit",
            type=ByteSize(),
            help="Restart the worker above this RSS (whole tree): bytes, 512M, 2G.",
        ),
        click.argument("command", nargs=-1, type=click.UNPROCESSED),
    ]
    for decorator in reversed(decorators):
        f = decorator(f)
    return limit_options(f)  # (kind "celery": a worker's own limits over its app's)


_SECONDS = click.FloatRange(min=0, min_open=True)

#: The fields 'instances set --reset' puts back to their default (a PATCH's
#: null; every field an instance has but its command).
RESETTABLE = (
    "pool",
    "autoscale",
    "concurrency",
    *LIMIT_FIELDS,
    "memory_limit",
    "hung_after",
    "loglevel",
    "queues",
    "args",
    "env",
    "cwd",
    "user",
    "env_file",
    "umask",
    "memory_max",
    "cpu_max",
    "pids_max",
    "autorestart",
    "exitcodes",
    "startsecs",
    "startretries",
    "stopsignal",
    "stopwaitsecs",
    "autostart",
    "log_max_bytes",
    "log_backups",
    "after",
    "after_timeout",
    "priority",
    "ready",
    "ready_timeout",
    "live",
    "live_period",
    "live_timeout",
    "live_failures",
)


def _fields(options: Mapping[str, Any]) -> dict[str, Any]:
    """The InstanceIn body of the given options: only what was given."""
    body: dict[str, Any] = {}
    for key, value in options.items():
        if value is None or value == ():
            continue
        if key == "env":
            value = _pairs(value, "--env")
        elif key == "after":  # (repeated, each maybe a,b)
            value = [name for names in value for name in names]
        elif isinstance(value, tuple):
            value = list(value)
        body[key] = value
    return body


@main.group(
    cls=_ListingGroup,
    invoke_without_command=True,
    subcommand_metavar="[APP] | COMMAND [ARGS]...",
)
@click.pass_context
def instances(ctx: click.Context) -> None:
    """List instances ('instances [APP]'), or manage one.

    The table has the columns APP NAME KIND STATE PID UPTIME RESTARTS; use
    'instances list APP' for an app named like a subcommand.
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(instances_list)


@instances.command("list")
@click.argument("app", required=False)
def instances_list(opts: Options, app: str | None = None) -> None:
    """List the instances of APP, or of every app."""
    with opts.client() as c:
        items = c.instances(app)
        unreachable = list(c.unreachable)
    branches = {i.branch for i in items}
    if len(branches) > 1 or unreachable:  # a cluster's listing: which branch holds each
        rows = [(*_instance_row(i), (i.branch or "")[:12]) for i in items]
        text = render.table((*INSTANCE_COLUMNS, "BRANCH"), rows)
    else:
        text = render.table(INSTANCE_COLUMNS, map(_instance_row, items))
    data = _items(items)
    if unreachable:
        data["unreachable"] = unreachable
    _emit(opts, data, text)
    _warn_unreachable(unreachable)


def _warn_unreachable(unreachable: list[dict[str, Any]]) -> None:
    for u in unreachable:
        click.echo(
            f"branchctl: warning: {u.get('error')}; its instances are not listed", err=True
        )


@instances.command("add")
@click.argument("app")
@click.option("--name", help="Instance name (generated when absent).")
@click.option(
    "--kind",
    type=click.Choice(KINDS),
    help="celery (a worker built from the app) or process (runs COMMAND); "
    "default: process with a COMMAND, celery without.",
)
@click.option(
    "--branch",
    help="In a cluster: the branch (id or host name) to run it on [default: the one "
    "with room].",
)
@click.option(
    "--count",
    type=click.IntRange(min=1),
    help="Make this many from one template: --name holds {n} or {n:02d} (numprocs).",
)
@click.option(
    "--start-at",
    type=click.IntRange(min=0),
    help="With --count: the first number [default: 0] (numprocs_start).",
)
@instance_fields
def instances_add(
    opts: Options,
    /,
    app: str,
    kind: str | None,
    branch: str | None,
    count: int | None,
    start_at: int | None,
    **options: Any,
) -> None:
    """Add an instance to APP: a Celery worker, or a process running COMMAND (after '--').

    \b
    Examples:
      branchctl instances add shop --name w1 --queues default,images --autoscale 1,4
      branchctl instances add web --name p1 -- python -m http.server
      branchctl instances add web --count 4 --name 'worker_{n:02d}' -- python worker.py

    With --count all are made, or none (one line says which rule a name or
    field broke); on a single branch (a cluster refuses it).
    """
    if kind is None and not options["command"]:
        kind = "celery"
    if kind == "celery" and options["command"]:
        raise click.UsageError("a celery instance takes no COMMAND: its argv is built from the app")
    if start_at is not None and count is None:
        raise click.UsageError("--start-at needs --count")
    if count is not None and (not options["name"] or branch):
        raise click.UsageError(
            "--count needs --name with {n} (e.g. 'worker_{n:02d}'), and takes no --branch"
        )
    limits = pop_limits(options)
    body = {**_fields(options), **limits}
    if kind is not None:  # without it (and with a COMMAND) the daemon's default: process
        body = {"kind": kind, **body}
    with opts.client() as c:
        if count is not None:
            template = body.pop("name")
            made = c.add_instances(app, count, template, start_at=start_at or 0, **body)
            _emit(opts, _items(made), render.table(INSTANCE_COLUMNS, map(_instance_row, made)))
            return
        instance = c.add_instance(app, branch=branch, **body)
    _emit(opts, instance.raw, _instance_text(instance))


@instances.command("set")
@click.argument("app")
@click.argument("name")
@click.option(
    "--no-env-file",
    "no_env_file",
    is_flag=True,
    help="Read no env file any more.",
)
@click.option(
    "--no-after",
    "no_after",
    is_flag=True,
    help="Start after no other instance any more.",
)
@click.option("--no-ready", "no_ready", is_flag=True, help="No readiness probe any more.")
@click.option("--no-live", "no_live", is_flag=True, help="No liveness probe any more.")
@click.option(
    "--reset",
    "resets",
    multiple=True,
    type=click.Choice(RESETTABLE),
    metavar="FIELD",
    help="Put FIELD back to its default (repeat it): pool, autoscale, concurrency and the "
    "limits (time_limit, task_overrides...) to the app's; cwd, umask, memory_limit... to "
    "none; any other to the app's instance default, else the kind's.",
)
@instance_fields
def instances_update(
    opts: Options,
    /,
    app: str,
    name: str,
    no_env_file: bool,
    no_after: bool,
    no_ready: bool,
    no_live: bool,
    resets: tuple[str, ...],
    **options: Any,
) -> None:
    """Change instance NAME of APP (a new COMMAND goes after '--'); also
    'instances update'.

    Takes effect at its next start.

    \b
    Example:
      branchctl instances set web api --startretries forever --umask 027
      branchctl instances set shop w1 --reset pool --reset time_limit
    """
    limits = pop_limits(options)
    body = {**_fields(options), **limits}
    if no_env_file:
        if "env_file" in body:
            raise click.UsageError("--no-env-file and --env-file: give one")
        body["env_file"] = []
    cleared: list[tuple[bool, str, Any]] = [
        (no_after, "after", []),
        (no_ready, "ready", None),
        (no_live, "live", None),
    ]
    for flag, key, none in cleared:
        if flag:
            if key in body:
                raise click.UsageError(f"--no-{key} and --{key}: give one")
            body[key] = none
    for key in resets:
        if key in body:
            raise click.UsageError(f"--reset {key} and a new value for it together")
        body[key] = None
    if not body:
        raise click.UsageError("nothing to change: give at least one option or a COMMAND")
    with opts.client() as c:
        instance = c.update_instance(app, name, **body)
    _emit(opts, instance.raw, _instance_text(instance))


instances.add_command(instances_update, "update")  # (its first name; scripts use it)


@instances.command("show")
@click.argument("app")
@click.argument("name")
def instances_show(opts: Options, app: str, name: str) -> None:
    """Show instance NAME of APP."""
    with opts.client() as c:
        instance = c.get_instance(app, name)
    _emit(opts, instance.raw, _instance_text(instance))


#: Beyond an instance's own stopwaitsecs and startsecs: the daemon's SIGKILL
#: grace (5 s) and the round trips of the polls.
WAIT_GRACE = 10.0
#: The polls of a wait start tight (most stops take well under a second) and
#: back off to the cap.
_POLL_FIRST = 0.05
_POLL_MAX = 0.5
#: States an instance passes through on its way to an outcome.
_PASSING = ("stopping", "waiting", "starting")


def _active_tasks(c: Client, i: Instance) -> int | None:
    """The tasks a running celery worker has in hand: what its warm stop waits for."""
    if i.kind != "celery" or i.state != "running":
        return None
    try:
        stats = c.stats(i.app, i.name)
    except ApiError:  # only a progress detail: the stop goes ahead without it
        return None
    count = _celery_summary(stats.celery).get("active_tasks") if stats.celery else None
    return count if isinstance(count, int) else None


def _progress(i: Instance, active: int | None) -> str:
    line = f"{i.app}/{i.name}: {i.state}"
    if i.pid is not None:
        line += f" (pid {i.pid})"
    if i.state == "stopping":
        tasks = "" if active is None else f"{active} active task{'' if active == 1 else 's'}, "
        line += f": {tasks}up to {i.stopwaitsecs:g}s (stopwaitsecs), then SIGKILL"
    elif i.reason:
        line += f": {i.reason}"
    return line


def _watch(
    c: Client, first: Instance, passing: tuple[str, ...] | None, active: int | None = None
) -> Instance | None:
    """Poll the instance until its state leaves ``passing`` (None: until it is
    gone, then None), with a line on stderr each time its state or reason
    changes; bounded by its own stopwaitsecs and startsecs."""
    limit = first.stopwaitsecs + (0 if passing is None else _start_takes(first)) + WAIT_GRACE
    deadline = time.monotonic() + limit
    pause = _POLL_FIRST
    shown = None
    i = first
    while passing is None or i.state in passing:
        line = _progress(i, active)
        if line != shown:
            click.echo(line, err=True)
            shown = line
        if time.monotonic() >= deadline:
            raise Failed(
                f"timeout: {i.app}/{i.name} is still {i.state} after {limit:g}s; branchd "
                f"goes on with it (see 'branchctl instances show {i.app} {i.name}')"
            )
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 1.5, _POLL_MAX)
        try:
            i = c.get_instance(first.app, first.name)
        except ApiError as exc:
            if passing is None and exc.code == "not_found":
                return None
            raise
    return i


def _start_takes(i: Instance) -> float:
    """How long a start of ``i`` may take: its wait for what it starts after,
    then its startsecs (or the time it may take to be ready)."""
    ready = i.ready_timeout if i.ready is not None and i.ready_timeout else i.startsecs
    return (i.after_timeout if i.after else 0.0) + ready


def _started(opts: Options, i: Instance) -> None:
    """Print the outcome of a start; exit 1 unless it runs."""
    _emit(opts, i.raw, _state_line(i))
    if i.state != "running":
        reason = f": {i.reason}" if i.reason else ""
        raise Failed(f"not_started: {i.app}/{i.name} is {i.state}{reason}")


@instances.command("start")
@click.argument("app")
@click.argument("name")
@no_wait_option
def instances_start(opts: Options, app: str, name: str, no_wait: bool) -> None:
    """Start instance NAME of APP and wait until it runs.

    Exits 1 when it does not come up: in backoff (a failed start, to be
    retried) or fatal (gave up), or stopped again. --no-wait answers at once
    (usually 'starting'), exit 0.
    """
    with opts.client() as c:
        i = c.start(app, name)
        if no_wait:
            _emit(opts, i.raw, _state_line(i))
            return
        done = _watch(c, i, _PASSING)
    assert done is not None
    _started(opts, done)


@instances.command("stop")
@click.argument("app")
@click.argument("name")
@no_wait_option
def instances_stop(opts: Options, app: str, name: str, no_wait: bool) -> None:
    """Stop instance NAME of APP and wait until it has stopped.

    A stop lasts up to the instance's stopwaitsecs (a celery worker first
    finishes its tasks: 600 s by default), then SIGKILL; progress goes to
    stderr. --no-wait answers at once (state 'stopping').
    """
    with opts.client() as c:
        if no_wait:
            i = c.stop(app, name, wait=False)
        else:
            active = _active_tasks(c, c.get_instance(app, name))
            done = _watch(c, c.stop(app, name, wait=False), ("stopping",), active)
            assert done is not None
            i = done
    _emit(opts, i.raw, _state_line(i))


@instances.command("restart")
@click.argument("app")
@click.argument("name")
@no_wait_option
def instances_restart(opts: Options, app: str, name: str, no_wait: bool) -> None:
    """Restart instance NAME of APP and wait until it runs again.

    The stop lasts up to its stopwaitsecs (progress on stderr). Exits 1 when
    it does not come up: in backoff (a failed start, to be retried) or fatal
    (gave up). --no-wait answers at once (usually 'stopping'), exit 0.
    """
    with opts.client() as c:
        if no_wait:
            i = c.restart(app, name, wait=False)
            _emit(opts, i.raw, _state_line(i))
            return
        active = _active_tasks(c, c.get_instance(app, name))
        done = _watch(c, c.restart(app, name, wait=False), _PASSING, active)
    assert done is not None
    _started(opts, done)


@instances.command("remove")
@click.argument("app")
@click.argument("name")
@no_wait_option
def instances_remove(opts: Options, app: str, name: str, no_wait: bool) -> None:
    """Remove instance NAME of APP: stopped first (up to its stopwaitsecs), then forgotten.

    --no-wait answers at once; branchd removes it once it has stopped.
    """
    with opts.client() as c:
        if no_wait:
            i = c.delete_instance(app, name, wait=False)
            if i is not None and i.state == "stopping":
                _emit(opts, i.raw, f"removing instance {app}/{name} once it has stopped")
                return
        else:
            active = _active_tasks(c, c.get_instance(app, name))
            i = c.delete_instance(app, name, wait=False)
            if i is not None:
                _watch(c, i, None, active)
    if not opts.json:
        click.echo(f"removed instance {app}/{name}")


def _celery_summary(celery: Mapping[str, Any]) -> dict[str, Any]:
    """A few lines of a worker's Celery 'stats' and 'active' replies."""
    stats = celery.get("stats")
    stats = stats if isinstance(stats, dict) else {}
    out: dict[str, Any] = {"node": celery.get("node")}
    pool = stats.get("pool")
    scaler = stats.get("autoscaler")
    scaler = scaler if isinstance(scaler, dict) and scaler else None
    if isinstance(pool, dict):
        impl = str(pool.get("implementation") or "")
        # "celery.concurrency.prefork:TaskPool" -> "prefork"
        name = impl.partition(":")[0].rpartition(".")[2] if impl else None
        size = celery.get("pool_size")
        # Under autoscale Celery's "max-concurrency" is the size at start, stale
        # once the autoscaler moved: the live size and the range say it all.
        if scaler is not None:
            limit = f"(autoscale {_bounds_text(scaler) or '-'})"
        elif pool.get("max-concurrency") is not None:
            limit = f"(concurrency {pool['max-concurrency']})"
        else:
            limit = None
        if isinstance(pool.get("processes"), list):
            unit = "process" if size == 1 else "processes"
        elif isinstance(pool.get("threads"), int):
            unit = "thread" if size == 1 else "threads"
        else:  # solo, gevent, eventlet: no pool processes to count
            unit = "slot" if size == 1 else "slots"
        live = None if size is None else f"{size} {unit}"
        out["pool"] = " ".join(p for p in (f"{name}," if name and live else name, live, limit) if p)
    active = celery.get("active")
    if isinstance(active, dict):  # {node: [task, ...]}
        active = [t for tasks in active.values() if isinstance(tasks, list) for t in tasks]
    if isinstance(active, list):
        out["active_tasks"] = len(active)
    total = stats.get("total")
    if isinstance(total, dict):
        counts = sorted(total.items(), key=lambda kv: (-_int(kv[1]), kv[0]))
        by_name = ", ".join(f"{name} {n}" for name, n in counts)
        out["tasks_done"] = f"{sum(_int(n) for _, n in counts)}" + (
            f" ({by_name})" if by_name else ""
        )
    return out


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def _stats_text(s: Stats) -> str:
    fields: dict[str, Any] = {
        "instance": f"{s.app}/{s.name}",
        "state": s.state,
        "pid": s.pid,
        "uptime": render.duration(s.uptime),
        "restarts": s.restarts,
        "exit_code": s.exit_code,
        "cpu": None if s.cpu_percent is None else f"{s.cpu_percent:.1f}%",
        "memory": render.size(s.memory_rss),
        "processes": s.processes,
    }
    if s.cgroup is not None:  # (a branch with cgroups: what the kernel counts)
        fields["cgroup memory"] = render.size(s.cgroup.get("memory_current"))
        fields["oom kills"] = s.cgroup.get("oom_kills")
    if s.celery is not None:
        fields.update(_celery_summary(s.celery))
    elif "celery" in s.raw:
        fields["celery"] = "not running"
    return render.record(fields)


@instances.command("stats")
@click.argument("app")
@click.argument("name", required=False)
def instances_stats(opts: Options, app: str, name: str | None) -> None:
    """Show the resource use of instance NAME of APP (its whole process tree),
    or without NAME of every instance of APP (on every branch of a cluster).

    For a running celery instance also a summary of Celery's own stats (pool,
    autoscaler, active tasks, tasks done by name); --json prints them all.
    """
    if name is None:
        with opts.client() as c:
            items = c.app_stats(app)
            unreachable = list(c.unreachable)
        rows = [
            (s.name, s.state, s.pid, f"{s.cpu_percent or 0:.1f}",
             render.size(s.memory_rss) if s.memory_rss is not None else None,
             s.processes, (s.branch or "")[:12])
            for s in items
        ]  # fmt: skip
        headers = ("NAME", "STATE", "PID", "CPU%", "RSS", "PROCS", "BRANCH")
        data = {"items": [dict(s.raw) for s in items], "unreachable": unreachable}
        _emit(opts, data, render.table(headers, rows))
        _warn_unreachable(unreachable)
        return
    with opts.client() as c:
        s = c.stats(app, name)
    _emit(opts, s.raw, _stats_text(s))


main.add_command(instances_stats, "stats")
