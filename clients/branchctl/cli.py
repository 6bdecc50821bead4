"""branchctl: the command line of branchd, over its HTTP API.

Exit codes: 0 ok, 1 the API answered an error or could not be reached (one
line on stderr), 2 a usage error.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import closing
from dataclasses import dataclass
from typing import IO, Any, TypeVar

import click

from branchctl import render
from branchctl.client import DEFAULT_URL, Client
from branchctl.errors import ApiError
from branchctl.models import App, Branch, Instance

CONTEXT = {"help_option_names": ["-h", "--help"]}
AUTORESTART = ("always", "on-failure", "never")
SIGNALS = ("TERM", "INT", "QUIT", "HUP", "KILL", "USR1", "USR2")
INSTANCE_COLUMNS = ("APP", "NAME", "KIND", "STATE", "PID", "UPTIME", "RESTARTS")

_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass
class Options:
    url: str
    token: str | None
    timeout: float
    json: bool

    def client(self) -> Client:
        return Client(self.url, self.token, self.timeout)


pass_opts = click.make_pass_decorator(Options)


class Failed(click.ClickException):
    """An API error, shown as one line on stderr: 'branchctl: <code>: <message>'."""

    exit_code = 1

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"branchctl: {self.message}", err=True)


class _Root(click.Group):
    """The root group: turns every ApiError of a command into exit 1 and one line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ApiError as exc:
            raise Failed(" ".join(str(exc).split())) from exc


class _ListingGroup(click.Group):
    """A group that lists when called bare; a first word that names no
    subcommand is taken as the argument of its 'list' subcommand."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # The group's own options are flags, so the first non-option word is
        # the subcommand (or the argument of 'list').
        for i, arg in enumerate(args):
            if arg == "--":
                break
            if not arg.startswith("-"):
                if arg not in self.commands:
                    args = [*args[:i], "list", *args[i:]]
                break
        return super().parse_args(ctx, args)


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(Options).json = True


def json_option(f: _F) -> _F:
    """Also accept --json after the subcommand."""
    return click.option(
        "--json",
        is_flag=True,
        expose_value=False,
        callback=_set_json,
        help="Print the API's JSON answer instead of text.",
    )(f)


def _emit(opts: Options, data: Any, text: str) -> None:
    if opts.json:
        click.echo(json.dumps(data, indent=2))
    elif text:
        click.echo(text)


def _items(objs: Iterable[App | Branch | Instance]) -> dict[str, Any]:
    return {"items": [dict(o.raw) for o in objs]}


def _pairs(values: Iterable[str], option: str, parse: Callable[[str], Any] = str) -> dict[str, Any]:
    """Parse repeated K=V option values."""
    out: dict[str, Any] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=option)
        out[key] = parse(value)
    return out


def _json_or_str(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


# -- root -------------------------------------------------------------------


@click.group(cls=_Root, context_settings=CONTEXT)
@click.option(
    "--url",
    envvar="BRANCHD_URL",
    default=DEFAULT_URL,
    show_default=True,
    show_envvar=True,
    help="The daemon's base URL.",
)
@click.option(
    "--token", envvar="BRANCHD_TOKEN", show_envvar=True, help="Bearer token of the branch."
)
@click.option(
    "--timeout",
    envvar="BRANCHD_TIMEOUT",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    show_envvar=True,
    help="Seconds to wait for an answer.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the API's JSON answer instead of text."
)
@click.pass_context
def main(ctx: click.Context, url: str, token: str | None, timeout: float, as_json: bool) -> None:
    """Control a branchd daemon: its apps, their instances, their logs."""
    ctx.obj = Options(url=url, token=token or None, timeout=timeout, json=as_json)


@main.command(context_settings=CONTEXT)
@json_option
@pass_opts
def ping(opts: Options) -> None:
    """Check that the daemon answers."""
    with opts.client() as c:
        ok = c.ping()
    if not ok:
        raise Failed(f"bad_response: {opts.url} answered the ping without ok")
    _emit(opts, {"ok": ok}, "ok")


def _branch_text(b: Branch) -> str:
    cap = b.capacity
    uptime = None if b.started_at is None else max(0.0, time.time() - b.started_at)
    return render.record(
        {
            "id": b.id,
            "hostname": b.hostname,
            "address": b.address,
            "version": b.version,
            "started": f"{render.timestamp(b.started_at)} (up {render.duration(uptime)})",
            "cpus": cap.cpus,
            "load": " ".join(f"{x:.2f}" for x in cap.load) or None,
            "memory": f"{render.size(cap.memory_free)} free of {render.size(cap.memory_total)}",
            "instances": cap.instances,
        }
    )


@main.command(context_settings=CONTEXT)
@json_option
@pass_opts
def branch(opts: Options) -> None:
    """Show this branch (the daemon answering)."""
    with opts.client() as c:
        b = c.branch()
    _emit(opts, b.raw, _branch_text(b))


@main.command(context_settings=CONTEXT)
@json_option
@pass_opts
def branches(opts: Options) -> None:
    """List the branches this daemon knows."""
    with opts.client() as c:
        bs = c.branches()
    rows = [
        (
            b.id,
            b.hostname,
            b.address,
            b.version,
            b.capacity.instances,
            f"{b.capacity.load[0]:.2f}" if b.capacity.load else None,
        )
        for b in bs
    ]
    _emit(
        opts,
        _items(bs),
        render.table(("ID", "HOSTNAME", "ADDRESS", "VERSION", "INST", "LOAD"), rows),
    )


# -- apps -------------------------------------------------------------------


def _app_text(app: App) -> str:
    return render.record(
        {
            "name": app.name,
            "env": dict(app.env),
            "defaults": dict(app.defaults),
            "created": render.timestamp(app.created_at),
        }
    )


@main.group(cls=_ListingGroup, invoke_without_command=True, context_settings=CONTEXT)
@json_option
@click.pass_context
def apps(ctx: click.Context) -> None:
    """List the apps (bare), or manage one."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(apps_list)


@apps.command("list", context_settings=CONTEXT)
@json_option
@pass_opts
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


@apps.command("add", context_settings=CONTEXT)
@click.argument("name")
@click.option("--env", "env", multiple=True, metavar="K=V", help="Environment of its instances.")
@click.option(
    "--default",
    "defaults",
    multiple=True,
    metavar="K=V",
    help="Instance default (V is parsed as JSON when it can be: startsecs=0, "
    'command=\'["celery","worker"]\').',
)
@json_option
@pass_opts
def apps_add(opts: Options, name: str, env: tuple[str, ...], defaults: tuple[str, ...]) -> None:
    """Create app NAME, or replace it (PUT: what is not given is reset)."""
    env_map = _pairs(env, "--env")
    default_map = _pairs(defaults, "--default", _json_or_str)
    with opts.client() as c:
        app, created = c.put_app(name, env=env_map, defaults=default_map)
    verb = "created" if created else "replaced"
    _emit(opts, app.raw, f"{verb} app {app.name!r}\n{_app_text(app)}")


@apps.command("show", context_settings=CONTEXT)
@click.argument("name")
@json_option
@pass_opts
def apps_show(opts: Options, name: str) -> None:
    """Show app NAME."""
    with opts.client() as c:
        app = c.get_app(name)
    _emit(opts, app.raw, _app_text(app))


@apps.command("remove", context_settings=CONTEXT)
@click.argument("name")
@json_option
@pass_opts
def apps_remove(opts: Options, name: str) -> None:
    """Remove app NAME (its instances are stopped and removed)."""
    with opts.client() as c:
        c.delete_app(name)
    if not opts.json:
        click.echo(f"removed app {name!r}")


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
        click.option("--autorestart", type=click.Choice(AUTORESTART)),
        click.option(
            "--exitcode", "exitcodes", type=int, multiple=True, help="Expected exit code."
        ),
        click.option("--startsecs", type=click.FloatRange(min=0)),
        click.option("--startretries", type=click.IntRange(min=1)),
        click.option(
            "--stopsignal", metavar="SIGNAL", callback=_signal, help=f"One of {', '.join(SIGNALS)}."
        ),
        click.option("--stopwaitsecs", type=click.FloatRange(min=0)),
        click.option("--autostart/--no-autostart", default=None, help="Start it now and at boot."),
        click.option("--log-max-bytes", type=click.IntRange(min=1024)),
        click.option("--log-backups", type=click.IntRange(min=0)),
        click.argument("command", nargs=-1, type=click.UNPROCESSED),
    ]
    for decorator in reversed(decorators):
        f = decorator(f)
    return f


def _fields(options: Mapping[str, Any]) -> dict[str, Any]:
    """The InstanceIn body of the given options: only what was given."""
    body: dict[str, Any] = {}
    for key, value in options.items():
        if value is None or value == ():
            continue
        if key == "env":
            value = _pairs(value, "--env")
        elif isinstance(value, tuple):
            value = list(value)
        body[key] = value
    return body


@main.group(
    cls=_ListingGroup,
    invoke_without_command=True,
    subcommand_metavar="[APP] | COMMAND [ARGS]...",
    context_settings=CONTEXT,
)
@json_option
@click.pass_context
def instances(ctx: click.Context) -> None:
    """List instances ('instances [APP]'), or manage one.

    The table has the columns APP NAME KIND STATE PID UPTIME RESTARTS; use
    'instances list APP' for an app named like a subcommand.
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(instances_list)


@instances.command("list", context_settings=CONTEXT)
@click.argument("app", required=False)
@json_option
@pass_opts
def instances_list(opts: Options, app: str | None = None) -> None:
    """List the instances of APP, or of every app."""
    with opts.client() as c:
        items = c.instances(app)
    _emit(opts, _items(items), render.table(INSTANCE_COLUMNS, map(_instance_row, items)))


@instances.command("add", context_settings=CONTEXT)
@click.argument("app")
@click.option("--name", help="Instance name (generated when absent).")
@instance_fields
@json_option
@pass_opts
def instances_add(opts: Options, /, app: str, **options: Any) -> None:
    """Add an instance to APP running COMMAND (put it after '--').

    Example: branchctl instances add web --name w1 -- celery -A proj worker
    """
    with opts.client() as c:
        instance = c.add_instance(app, **_fields(options))
    _emit(opts, instance.raw, _instance_text(instance))


@instances.command("update", context_settings=CONTEXT)
@click.argument("app")
@click.argument("name")
@instance_fields
@json_option
@pass_opts
def instances_update(opts: Options, /, app: str, name: str, **options: Any) -> None:
    """Change instance NAME of APP (a new COMMAND goes after '--').

    Takes effect at its next start.
    """
    body = _fields(options)
    if not body:
        raise click.UsageError("nothing to change: give at least one option or a COMMAND")
    with opts.client() as c:
        instance = c.update_instance(app, name, **body)
    _emit(opts, instance.raw, _instance_text(instance))


@instances.command("show", context_settings=CONTEXT)
@click.argument("app")
@click.argument("name")
@json_option
@pass_opts
def instances_show(opts: Options, app: str, name: str) -> None:
    """Show instance NAME of APP."""
    with opts.client() as c:
        instance = c.get_instance(app, name)
    _emit(opts, instance.raw, _instance_text(instance))


def _action(action: str, doc: str) -> None:
    @instances.command(action, help=doc, context_settings=CONTEXT)
    @click.argument("app")
    @click.argument("name")
    @json_option
    @pass_opts
    def command(opts: Options, app: str, name: str) -> None:
        with opts.client() as c:
            method: Callable[[str, str], Instance] = getattr(c, action)
            instance = method(app, name)
        _emit(opts, instance.raw, _state_line(instance))


_action("start", "Start instance NAME of APP.")
_action("stop", "Stop instance NAME of APP (answers once it has stopped).")
_action("restart", "Restart instance NAME of APP.")


@instances.command("remove", context_settings=CONTEXT)
@click.argument("app")
@click.argument("name")
@json_option
@pass_opts
def instances_remove(opts: Options, app: str, name: str) -> None:
    """Remove instance NAME of APP (stopped first)."""
    with opts.client() as c:
        c.delete_instance(app, name)
    if not opts.json:
        click.echo(f"removed instance {app}/{name}")


@instances.command("stats", context_settings=CONTEXT)
@click.argument("app")
@click.argument("name")
@json_option
@pass_opts
def instances_stats(opts: Options, app: str, name: str) -> None:
    """Show the resource use of instance NAME of APP (its whole process tree)."""
    with opts.client() as c:
        s = c.stats(app, name)
    text = render.record(
        {
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
    )
    _emit(opts, s.raw, text)


# -- logs -------------------------------------------------------------------


@main.command(context_settings=CONTEXT)
@click.argument("app")
@click.argument("name")
@click.option(
    "-n", "--lines", type=click.IntRange(min=0), default=50, show_default=True, help="Last lines."
)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output until Ctrl-C.")
@click.option("--stderr", is_flag=True, help="The stderr log instead of stdout.")
@pass_opts
def logs(opts: Options, app: str, name: str, lines: int, follow: bool, stderr: bool) -> None:
    """Print the log of instance NAME of APP (plain text, even with --json)."""
    stream = "stderr" if stderr else "stdout"
    try:
        with opts.client() as c:
            if not follow:
                click.echo(c.logs(app, name, stream, lines), nl=False)
                return
            try:
                with closing(c.follow_logs(app, name, stream, lines)) as chunks:
                    for chunk in chunks:
                        click.echo(chunk, nl=False)
            except KeyboardInterrupt:
                return
    except BrokenPipeError:  # e.g. '| head': stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
