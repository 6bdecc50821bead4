"""branchctl: the command line of branchd, over its HTTP API.

Exit codes: 0 ok, 1 the API answered an error or could not be reached (one
line on stderr), 2 a usage error.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import click

from branchctl import render
from branchctl.client import DEFAULT_URL, Client, find_url
from branchctl.errors import ApiError, ConnectionFailed
from branchctl.models import App, Autoscale, Branch, Consumer, Instance, Queue, Stats

CONTEXT = {"help_option_names": ["-h", "--help"]}
AUTORESTART = ("always", "on-failure", "never")
SIGNALS = ("TERM", "INT", "QUIT", "HUP", "KILL", "USR1", "USR2")
INSTANCE_COLUMNS = ("APP", "NAME", "KIND", "STATE", "PID", "UPTIME", "RESTARTS")
POOLS = ("prefork", "solo", "threads", "gevent", "eventlet")
EXCHANGE_TYPES = ("direct", "topic", "fanout", "headers")
KINDS = ("celery", "process")

_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass
class Options:
    url: str
    token: str | None
    timeout: float
    json: bool
    #: The branchd.url file the URL was read from (None: given, or the default).
    url_file: str | None = None

    def client(self) -> Client:
        return Client(self.url, self.token, self.timeout)


pass_opts = click.make_pass_decorator(Options)


class Failed(click.ClickException):
    """An API error, shown as one line on stderr: 'branchctl: <code>: <message>'."""

    exit_code = 1

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"branchctl: {self.message}", err=True)


class _Root(click.Group):
    """The root group: turns every ApiError of a command into exit 1 and one line,
    and a usage error into exit 2 and one line (not click's usage block)."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        standalone = kwargs.pop("standalone_mode", True)
        run: Any = super().main  # (click types main() as Never in standalone mode)
        if not standalone:
            return run(*args, standalone_mode=False, **kwargs)
        try:
            rv = run(*args, standalone_mode=False, **kwargs)
        except click.UsageError as exc:
            path = exc.ctx.command_path.partition(" ")[2] if exc.ctx else ""
            where = f" (see 'branchctl {path} --help')" if path else " (see 'branchctl --help')"
            click.echo(f"branchctl: {exc.format_message()}{where}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ApiError as exc:
            message = str(exc)
            opts = ctx.find_object(Options)
            if isinstance(exc, ConnectionFailed) and opts is not None and opts.url_file:
                # A stale file (its daemon is gone) is the likely cause: say where it came from.
                message += f" (URL read from {opts.url_file})"
            raise Failed(" ".join(message.split())) from exc


class _ListingGroup(click.Group):
    """A group that lists when called bare; a first word that names no
    subcommand is taken as the argument of its 'list' subcommand.

    A word close to a subcommand's name ('lst') that is no app either gets
    click's own answer for a typo: "No such command 'lst'. Did you mean 'list'?".
    Only the daemon knows the apps, so that is decided after asking it: an app
    named 'shop' is still listed, not taken for a typo of 'show'.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # The group's own options are flags, so the first non-option word is
        # the subcommand (or the argument of 'list').
        for i, arg in enumerate(args):
            if arg == "--":
                break
            if not arg.startswith("-"):
                if arg not in self.commands:
                    close = difflib.get_close_matches(arg, self.list_commands(ctx), n=1)
                    if close:
                        ctx.meta[_TYPO] = (arg, close[0])
                    args = [*args[:i], "list", *args[i:]]
                break
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        typo: tuple[str, str] | None = ctx.meta.get(_TYPO)
        try:
            return super().invoke(ctx)
        except ApiError as exc:
            if typo is None or exc.code != "not_found" or f"app {typo[0]!r}" not in exc.message:
                raise
            raise click.UsageError(_no_such_command(*typo), ctx) from None
        except click.UsageError as exc:
            # 'instances shwo web w1': 'list' got the words a command takes. Any
            # other usage error (a bad option) is the user's and says so itself.
            if typo is None or "unexpected extra argument" not in exc.message:
                raise
            raise click.UsageError(_no_such_command(*typo), ctx) from None


_TYPO = "branchctl.typo"


def _no_such_command(word: str, close: str) -> str:
    # click's own wording (click.exceptions.NoSuchCommand, not in every click we support)
    return f"No such command {word!r}. Did you mean {close!r}?"


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


def no_wait_option(f: _F) -> _F:
    return click.option(
        "--no-wait", is_flag=True, help="Answer at once, without waiting for the outcome."
    )(f)


def _emit(opts: Options, data: Any, text: str) -> None:
    if opts.json:
        click.echo(json.dumps(data, indent=2))
    elif text:
        click.echo(text)


def _items(objs: Iterable[App | Branch | Instance | Queue | Consumer]) -> dict[str, Any]:
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


if TYPE_CHECKING:  # click >= 8.4 makes ParamType generic; older ones are not subscriptable
    _ParamType = click.ParamType[Any]
else:
    _ParamType = click.ParamType


class MinMax(_ParamType):
    """'MIN,MAX' (non-negative ints, in that order) -> {"min": MIN, "max": MAX}."""

    name = "MIN,MAX"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> dict[str, int]:
        if isinstance(value, dict):
            return value
        low, sep, high = str(value).partition(",")
        try:
            bounds = {"min": int(low), "max": int(high)}
        except ValueError:
            bounds = {}
        if not sep or not bounds or min(bounds.values()) < 0:
            self.fail(f"expected MIN,MAX (two non-negative integers), got {value!r}", param, ctx)
        return bounds


class NameList(_ParamType):
    """'a,b' -> ["a", "b"] (blanks dropped)."""

    name = "A,B"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> list[str]:
        if isinstance(value, list):
            return value
        return [v.strip() for v in str(value).split(",") if v.strip()]


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


class ByteSize(_ParamType):
    """A byte count: 1048576, 512K, 512M, 2G, 1.5GiB (K/M/G/T are powers of 1024)."""

    name = "BYTES"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        match = _SIZE.match(str(value))
        if match is None:
            self.fail(f"expected a size like 536870912, 512M or 2G, got {value!r}", param, ctx)
        number, unit = match.groups()
        n = int(float(number) * _UNITS[unit.upper()])
        if n < 1:
            self.fail(f"{value!r} is not a positive size", param, ctx)
        return n


# -- root -------------------------------------------------------------------


@click.group(cls=_Root, context_settings=CONTEXT)
@click.option(
    "--url",
    envvar="BRANCHD_URL",
    show_envvar=True,
    help="The daemon's base URL [default: the one the daemon wrote in its state dir, "
    "$BRANCHD_STATE_DIR/branchd.url or ~/.local/state/branchd/branchd.url, "
    f"else {DEFAULT_URL}].",
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
def main(
    ctx: click.Context, url: str | None, token: str | None, timeout: float, as_json: bool
) -> None:
    """Control a branchd daemon: its apps, their instances, their logs.

    Without --url or BRANCHD_URL it finds a local daemon (any --bind, port
    0 too) by the branchd.url file the daemon writes in its state dir.

    For Celery: apps carry the broker and worker settings, 'queues' declares
    an app's queues, 'consumers' and 'autoscale' change a running worker.
    """
    found: Path | None = None
    if not url:
        url, found = find_url(os.environ)
    ctx.obj = Options(
        url=url,
        token=token or None,
        timeout=timeout,
        json=as_json,
        url_file=None if found is None else str(found),
    )


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


@main.group(context_settings=CONTEXT)
def daemon() -> None:
    """The daemon itself."""


@daemon.command("exit", context_settings=CONTEXT)
@click.option(
    "--keep",
    is_flag=True,
    help="Leave every instance running; the next branchd on this state dir adopts them "
    "(an upgrade). Without it, every instance is stopped first.",
)
@json_option
@pass_opts
def daemon_exit(opts: Options, keep: bool) -> None:
    """Make the daemon exit (like SIGTERM, or SIGUSR2 with --keep)."""
    with opts.client() as c:
        c.exit_daemon(keep)
    _emit(
        opts,
        {"exiting": True, "keep": keep},
        "branchd exits; its instances keep running" if keep else
        "branchd stops its instances, then exits",
    )


# -- apps -------------------------------------------------------------------


def _bounds_text(bounds: Mapping[str, Any] | None) -> str | None:
    """{"min": 1, "max": 4} -> '1..4' (min..max)."""
    if not bounds:
        return None
    return f"{render.cell(bounds.get('min'))}..{render.cell(bounds.get('max'))}"


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
    }
    fields.update({k: v for k, v in celery.items() if k in app.raw})
    return render.record(fields)


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
    return f


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


@apps.command("add", context_settings=CONTEXT)
@click.argument("name")
@app_settings
@json_option
@pass_opts
def apps_add(opts: Options, /, name: str, **options: Any) -> None:
    """Create app NAME, or replace it (what is not given is reset: use
    'apps set' to change some settings and keep the rest).

    \b
    Example:
      branchctl apps add shop --broker amqp://guest:guest@127.0.0.1:5672// \\
          --celery-app shop.tasks --autoscale 1,4
    """
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
        )
    if not created and old is not None:
        reset = _reset_by_replace(old, fields)
        what = f"; reset: {', '.join(reset)}" if reset else ""
        click.echo(
            f"branchctl: app {name!r} existed and was replaced{what} "
            "(use 'branchctl apps set' to change only some settings)",
            err=True,
        )
    verb = "created" if created else "replaced"
    _emit(opts, app.raw, f"{verb} app {app.name!r}\n{_app_text(app)}")


@apps.command("set", context_settings=CONTEXT)
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
        ["broker", "celery_app", "python", "pool", "args", "autoscale", "result_backend"]
    ),
    help="Put a setting back to its default (broker: the embedded one).",
)
@json_option
@pass_opts
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
    """
    fields = _app_fields(options)
    changes: dict[str, Any] = {k: v for k, v in fields.items() if v is not None}
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
    _emit(opts, app.raw, f"changed app {app.name!r}\n{_app_text(app)}")


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
@no_wait_option
@json_option
@pass_opts
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


@apps.command("celery-config", context_settings=CONTEXT)
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
@json_option
@pass_opts
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


@main.command("celery", context_settings={**CONTEXT, "ignore_unknown_options": True})
@click.argument("app")
@click.argument("args", nargs=-1, type=click.UNPROCESSED, required=True)
@pass_opts
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
    if fields.get("memory_limit") is not None:
        fields["memory_limit"] = render.size(i.memory_limit)
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
@click.option(
    "--kind",
    type=click.Choice(KINDS),
    help="celery (a worker built from the app) or process (runs COMMAND); "
    "default: process with a COMMAND, celery without.",
)
@instance_fields
@json_option
@pass_opts
def instances_add(opts: Options, /, app: str, kind: str | None, **options: Any) -> None:
    """Add an instance to APP: a Celery worker, or a process running COMMAND (after '--').

    \b
    Examples:
      branchctl instances add shop --name w1 --queues default,images --autoscale 1,4
      branchctl instances add web --name p1 -- python -m http.server
    """
    if kind is None and not options["command"]:
        kind = "celery"
    if kind == "celery" and options["command"]:
        raise click.UsageError("a celery instance takes no COMMAND: its argv is built from the app")
    body = _fields(options)
    if kind is not None:  # without it (and with a COMMAND) the daemon's default: process
        body = {"kind": kind, **body}
    with opts.client() as c:
        instance = c.add_instance(app, **body)
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


#: Beyond an instance's own stopwaitsecs and startsecs: the daemon's SIGKILL
#: grace (5 s) and the round trips of the polls.
WAIT_GRACE = 10.0
#: The polls of a wait start tight (most stops take well under a second) and
#: back off to the cap.
_POLL_FIRST = 0.05
_POLL_MAX = 0.5
#: States an instance passes through on its way to an outcome.
_PASSING = ("stopping", "starting")


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
    limit = first.stopwaitsecs + (0 if passing is None else first.startsecs) + WAIT_GRACE
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


def _started(opts: Options, i: Instance) -> None:
    """Print the outcome of a start; exit 1 unless it runs."""
    _emit(opts, i.raw, _state_line(i))
    if i.state != "running":
        reason = f": {i.reason}" if i.reason else ""
        raise Failed(f"not_started: {i.app}/{i.name} is {i.state}{reason}")


@instances.command("start", context_settings=CONTEXT)
@click.argument("app")
@click.argument("name")
@no_wait_option
@json_option
@pass_opts
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


@instances.command("stop", context_settings=CONTEXT)
@click.argument("app")
@click.argument("name")
@no_wait_option
@json_option
@pass_opts
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


@instances.command("restart", context_settings=CONTEXT)
@click.argument("app")
@click.argument("name")
@no_wait_option
@json_option
@pass_opts
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


@instances.command("remove", context_settings=CONTEXT)
@click.argument("app")
@click.argument("name")
@no_wait_option
@json_option
@pass_opts
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
    if s.celery is not None:
        fields.update(_celery_summary(s.celery))
    elif "celery" in s.raw:
        fields["celery"] = "not running"
    return render.record(fields)


@instances.command("stats", context_settings=CONTEXT)
@click.argument("app")
@click.argument("name")
@json_option
@pass_opts
def instances_stats(opts: Options, app: str, name: str) -> None:
    """Show the resource use of instance NAME of APP (its whole process tree).

    For a running celery instance also a summary of Celery's own stats (pool,
    autoscaler, active tasks, tasks done by name); --json prints them all.
    """
    with opts.client() as c:
        s = c.stats(app, name)
    _emit(opts, s.raw, _stats_text(s))


main.add_command(instances_stats, "stats")


# -- queues -----------------------------------------------------------------


def _queue_row(q: Queue) -> tuple[Any, ...]:
    return (q.name, q.exchange, q.exchange_type, q.routing_key)


def _queue_text(q: Queue) -> str:
    return render.record(
        {
            "app": q.app,
            "name": q.name,
            "exchange": q.exchange,
            "exchange_type": q.exchange_type,
            "routing_key": q.routing_key,
            "options": dict(q.options),
        }
    )


@main.group(
    cls=_ListingGroup,
    invoke_without_command=True,
    subcommand_metavar="APP | COMMAND [ARGS]...",
    context_settings=CONTEXT,
)
@json_option
@click.pass_context
def queues(ctx: click.Context) -> None:
    """List the queues declared by an app ('queues APP'), or manage one.

    The table has the columns NAME EXCHANGE TYPE ROUTING_KEY; use
    'queues list APP' for an app named like a subcommand.
    """
    if ctx.invoked_subcommand is None:
        raise click.UsageError("give an APP: branchctl queues APP", ctx)


@queues.command("list", context_settings=CONTEXT)
@click.argument("app")
@json_option
@pass_opts
def queues_list(opts: Options, app: str) -> None:
    """List the queues declared by APP."""
    with opts.client() as c:
        items = c.queues(app)
    _emit(
        opts,
        _items(items),
        render.table(("NAME", "EXCHANGE", "TYPE", "ROUTING_KEY"), map(_queue_row, items)),
    )


@queues.command("add", context_settings=CONTEXT)
@click.argument("app")
@click.argument("name")
@click.option("--exchange", help="Exchange (default: the queue's name).")
@click.option(
    "--type", "exchange_type", type=click.Choice(EXCHANGE_TYPES), help="Exchange type (direct)."
)
@click.option("--routing-key", help="Routing key (default: the queue's name).")
@click.option(
    "--option",
    "options",
    multiple=True,
    metavar="K=V",
    help="Queue option (V parsed as JSON when it can be: durable=false, "
    "queue_arguments='{\"x-max-priority\": 10}').",
)
@json_option
@pass_opts
def queues_add(
    opts: Options,
    app: str,
    name: str,
    exchange: str | None,
    exchange_type: str | None,
    routing_key: str | None,
    options: tuple[str, ...],
) -> None:
    """Declare queue NAME of APP, or replace it (PUT: what is not given is reset).

    Example: branchctl queues add shop images --exchange media --type topic --routing-key 'image.#'
    """
    option_map = _pairs(options, "--option", _json_or_str) if options else None
    with opts.client() as c:
        queue, created = c.put_queue(app, name, exchange, exchange_type, routing_key, option_map)
    verb = "created" if created else "replaced"
    _emit(opts, queue.raw, f"{verb} queue {queue.app}/{queue.name}\n{_queue_text(queue)}")


@queues.command("show", context_settings=CONTEXT)
@click.argument("app")
@click.argument("name")
@json_option
@pass_opts
def queues_show(opts: Options, app: str, name: str) -> None:
    """Show queue NAME of APP."""
    with opts.client() as c:
        queue = c.get_queue(app, name)
    _emit(opts, queue.raw, _queue_text(queue))


@queues.command("remove", context_settings=CONTEXT)
@click.argument("app")
@click.argument("name")
@json_option
@pass_opts
def queues_remove(opts: Options, app: str, name: str) -> None:
    """Remove queue NAME of APP (first cancelled on every instance of the app)."""
    with opts.client() as c:
        c.delete_queue(app, name)
    if not opts.json:
        click.echo(f"removed queue {app}/{name}")


# -- consumers --------------------------------------------------------------


def _consumers_table(items: Iterable[Consumer]) -> str:
    rows = [(x.name, x.wanted, x.declared, x.live) for x in items]
    return render.table(("QUEUE", "WANTED", "DECLARED", "LIVE"), rows)


@main.group(
    cls=_ListingGroup,
    invoke_without_command=True,
    subcommand_metavar="APP NAME | COMMAND [ARGS]...",
    context_settings=CONTEXT,
)
@json_option
@click.pass_context
def consumers(ctx: click.Context) -> None:
    """List the queues a celery instance consumes ('consumers APP NAME'), or change them.

    The table has the columns QUEUE WANTED (declared on the instance),
    DECLARED (the app declares that queue), LIVE (the running worker consumes
    it; '-' when it is not running). Changes apply without a restart.
    """
    if ctx.invoked_subcommand is None:
        raise click.UsageError("give an APP and a NAME: branchctl consumers APP NAME", ctx)


@consumers.command("list", context_settings=CONTEXT)
@click.argument("app")
@click.argument("name")
@json_option
@pass_opts
def consumers_list(opts: Options, app: str, name: str) -> None:
    """List the queues of celery instance NAME of APP."""
    with opts.client() as c:
        items = c.consumers(app, name)
    _emit(opts, _items(items), _consumers_table(items))


@consumers.command("add", context_settings=CONTEXT)
@click.argument("app")
@click.argument("name")
@click.argument("queue")
@json_option
@pass_opts
def consumers_add(opts: Options, app: str, name: str, queue: str) -> None:
    """Make instance NAME of APP consume QUEUE (no restart); prints its queues."""
    with opts.client() as c:
        items = c.add_consumer(app, name, queue)
    _emit(opts, _items(items), _consumers_table(items))


@consumers.command("remove", context_settings=CONTEXT)
@click.argument("app")
@click.argument("name")
@click.argument("queue")
@json_option
@pass_opts
def consumers_remove(opts: Options, app: str, name: str, queue: str) -> None:
    """Make instance NAME of APP stop consuming QUEUE (no restart); prints its queues."""
    with opts.client() as c:
        items = c.remove_consumer(app, name, queue)
    _emit(opts, _items(items), _consumers_table(items))


# -- autoscale --------------------------------------------------------------


def _autoscale_text(a: Autoscale) -> str:
    live = (
        "-" if not a.live else f"{render.cell(a.live.get('min'))} {render.cell(a.live.get('max'))}"
    )
    if a.min is None or a.max is None:  # no range declared: a fixed pool size
        return f"none: fixed concurrency (live: {live})"
    return f"{a.min} {a.max} (live: {live})"


def _non_negative(value: str, what: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise click.BadParameter(f"{value!r} is not a non-negative integer", param_hint=what)
    return n


@main.command("autoscale", context_settings={**CONTEXT, "ignore_unknown_options": True})
@click.argument("app")
@click.argument("name")
@click.argument("bounds", metavar="[MIN MAX]", nargs=-1)
@json_option
@pass_opts
def autoscale_cmd(opts: Options, app: str, name: str, bounds: tuple[str, ...]) -> None:
    """Show the autoscale bounds of celery instance NAME of APP, or set them to MIN MAX.

    Prints 'MIN MAX (live: MIN MAX)', live being what the running worker
    reports ('-' when it is not running), or 'none: fixed concurrency'.
    Setting applies without a restart to a worker started with a range; a
    running worker started with a fixed concurrency refuses it (exit 1,
    restart_required, nothing changed): declare a range with 'instances
    update APP NAME --autoscale MIN,MAX' and restart it. A stopped worker
    takes the range at its next start.
    """
    if len(bounds) not in (0, 2):
        raise click.UsageError("give both MIN and MAX, or neither")
    wanted = [_non_negative(v, what) for v, what in zip(bounds, ("MIN", "MAX"), strict=False)]
    with opts.client() as c:
        a = c.set_autoscale(app, name, *wanted) if wanted else c.autoscale(app, name)
    _emit(opts, a.raw, _autoscale_text(a))


# -- logs -------------------------------------------------------------------


def _exit_quietly(signum: int, frame: object) -> None:
    with contextlib.suppress(OSError):
        sys.stdout.flush()
    os._exit(0)


@main.command(context_settings=CONTEXT)
@click.argument("app")
@click.argument("name")
@click.option(
    "-n", "--lines", type=click.IntRange(min=0), default=50, show_default=True, help="Last lines."
)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output until Ctrl-C.")
@click.option("--stderr", is_flag=True, help="The stderr log instead of stdout.")
@json_option
@pass_opts
def logs(opts: Options, app: str, name: str, lines: int, follow: bool, stderr: bool) -> None:
    """Print the log of instance NAME of APP (plain text, even with --json)."""
    stream = "stderr" if stderr else "stdout"
    try:
        with opts.client() as c:
            if not follow:
                click.echo(c.logs(app, name, stream, lines), nl=False)
                return
            # Ctrl-C ends a follow, whatever the event loop is doing at that
            # moment: a KeyboardInterrupt raised inside asyncio's machinery can
            # leave the loop unable to close (seen as a hang under load).
            main_thread = threading.current_thread() is threading.main_thread()
            previous = signal.signal(signal.SIGINT, _exit_quietly) if main_thread else None
            try:
                with closing(c.follow_logs(app, name, stream, lines)) as chunks:
                    for chunk in chunks:
                        click.echo(chunk, nl=False)
            finally:
                if main_thread:
                    signal.signal(signal.SIGINT, previous)
    except BrokenPipeError:  # e.g. '| head': stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
