"""Shared pieces of the CLI: the options object, the command and group classes
every command is made of (the root and listing groups among them), --json,
parameter types."""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, ClassVar, TypeVar

import click

from branchctl import render
from branchctl.client import Client, token_file
from branchctl.errors import ApiError, ConnectionFailed
from branchctl.models import App, Branch, Consumer, Instance, Member, Queue

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


class _Shared(click.Command):
    """What every branchctl command and group is declared with, once here
    rather than as decorators on each (so none can miss one): -h/--help, and
    --json after its name where ``takes_json`` (the class's, unless given)."""

    takes_json: ClassVar[bool] = False

    def __init__(
        self,
        name: str | None,
        *,
        takes_json: bool | None = None,
        context_settings: MutableMapping[str, Any] | None = None,
        **attrs: Any,
    ) -> None:
        super().__init__(name, context_settings={**CONTEXT, **(context_settings or {})}, **attrs)
        if self.takes_json if takes_json is None else takes_json:
            self.params.append(_json_option())  # last: after its own options in its help


class BranchctlCommand(_Shared):
    """A branchctl command: takes --json after its name (``takes_json=False``:
    not, e.g. where its words are another program's), and its callback gets
    the options object (built by the root from --url, --token, --timeout,
    --json) as its first argument."""

    takes_json = True

    def __init__(
        self, name: str | None, *, callback: Callable[..., Any] | None = None, **attrs: Any
    ) -> None:
        super().__init__(name, callback=None if callback is None else pass_opts(callback), **attrs)


class BranchctlGroup(_Shared, click.Group):
    """A group of branchctl commands: what it makes with ``@group.command()``
    and ``@group.group()`` are a BranchctlCommand and a BranchctlGroup. Its
    own callback gets the context, not the options object (a group decides
    what runs when called bare)."""

    command_class = BranchctlCommand


# (not `group_class = type`: the root's subgroups are not roots)
BranchctlGroup.group_class = BranchctlGroup


class _Root(BranchctlGroup):
    """The root group: turns every ApiError of a command into exit 1 and one line,
    and a usage error into exit 2 and one line (not click's usage block)."""

    # takes_json stays False: the root's --json is one of the global options
    # it builds the options object from (root.py), not the flag set after it.

    def main(self, *args: Any, **kwargs: Any) -> Any:
        standalone = kwargs.pop("standalone_mode", True)
        run: Any = super().main  # (click types main() as Never in standalone mode)
        if not standalone:
            return run(*args, standalone_mode=False, **kwargs)
        try:
            rv = run(*args, standalone_mode=False, **kwargs)
        except click.UsageError as exc:
            words, ctx = [], exc.ctx
            while ctx is not None and ctx.parent is not None:  # (the root's name varies)
                words.append(ctx.info_name or "")
                ctx = ctx.parent
            where = f" (see '{' '.join(['branchctl', *reversed(words)])} --help')"
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
            if exc.code == "unauthorized" and opts is not None and opts.token is None:
                # No token was given and none found: say where it was looked for.
                message += (
                    f" (no token given, and none readable in {token_file(os.environ)}: "
                    "give --token-file, or set BRANCHD_STATE_DIR to the daemon's state dir)"
                )
            raise Failed(" ".join(message.split())) from exc


class _ListingGroup(BranchctlGroup):
    """A group that lists when called bare (so it takes --json too); a first
    word that names no subcommand is taken as the argument of its 'list'
    subcommand.

    A word close to a subcommand's name ('lst') that is no app either gets
    click's own answer for a typo: "No such command 'lst'. Did you mean 'list'?".
    Only the daemon knows the apps, so that is decided after asking it: an app
    named 'shop' is still listed, not taken for a typo of 'show'.
    """

    takes_json = True

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


JSON_HELP = "Print the API's JSON answer instead of text."


def _json_option() -> click.Option:
    # The root's --json sets the options object's flag as it builds it; this
    # one, after a subcommand's name, sets the flag of the object built.
    return click.Option(
        ["--json"], is_flag=True, expose_value=False, callback=_set_json, help=JSON_HELP
    )


def no_wait_option(f: _F) -> _F:
    return click.option(
        "--no-wait", is_flag=True, help="Answer at once, without waiting for the outcome."
    )(f)


def _emit(opts: Options, data: Any, text: str) -> None:
    if opts.json:
        click.echo(json.dumps(data, indent=2))
    elif text:
        click.echo(text)


def _items(
    objs: Iterable[App | Branch | Member | Instance | Queue | Consumer],
) -> dict[str, Any]:
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


class StartRetries(_ParamType):
    """A count of failed starts (1 or more) or 'forever' (never fatal)."""

    name = "N|forever"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> int | str:
        if isinstance(value, int) or str(value).lower() == "forever":
            return value if isinstance(value, int) else "forever"
        try:
            count = int(str(value))
        except ValueError:
            count = 0
        if count < 1:
            self.fail(f"expected a count of 1 or more, or 'forever', got {value!r}", param, ctx)
        return count


class Umask(_ParamType):
    """A umask in octal, as supervisord and the shell write it: 022, 0027, 0o077."""

    name = "OCTAL"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip()
        digits = text.lower().removeprefix("0o")
        if not re.fullmatch(r"[0-7]{1,4}", digits) or int(digits, 8) > 0o777:
            self.fail(f"expected an octal umask like 022 or 0027, got {value!r}", param, ctx)
        return text


def _bounds_text(bounds: Mapping[str, Any] | None) -> str | None:
    """{"min": 1, "max": 4} -> '1..4' (min..max)."""
    if not bounds:
        return None
    return f"{render.cell(bounds.get('min'))}..{render.cell(bounds.get('max'))}"
