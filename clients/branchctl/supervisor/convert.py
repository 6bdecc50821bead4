"""supervisord sections into branchd apps and instances.

``PROGRAM`` is the one table of what each ``[program:x]`` option becomes: an
instance field (``Field``), something the conversion reads itself (``Read``),
or nothing, with the reason (``Drop``). A later branchd setting is one line
here. ``[group:g]`` becomes app ``g``; a program in no group becomes an app of
its own name, as supervisord makes it a group of its own name (so
``supervisorctl start x:*`` and ``branchctl instances APP`` name the same thing).
"""

from __future__ import annotations

import re
import shlex
import signal
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from branchctl.errors import BadConfig
from branchctl.supervisor.celery import worker_of
from branchctl.supervisor.ini import Loaded, Reader, Section, Value, expand, load


class Unsupported(Exception):
    """A value supervisord takes that branchd cannot carry (the reason)."""


class NoteKind(StrEnum):
    NOT_CONVERTED = "not converted"
    NOTE = "note"


@dataclass(frozen=True)
class Note:
    where: str
    subject: str
    why: str
    kind: NoteKind = NoteKind.NOT_CONVERTED

    def __str__(self) -> str:
        return f"{self.where}: {self.subject}: {self.why}"


@dataclass(frozen=True)
class InstanceDecl:
    name: str
    #: The body of ``POST /v1/apps/{app}/instances`` (name and kind in it).
    fields: Mapping[str, Any]
    #: Where it comes from: ``file:line [program:x]``.
    source: str


@dataclass(frozen=True)
class AppDecl:
    name: str
    env: Mapping[str, str]
    #: The app's Celery settings its celery instances need (empty: none).
    celery: Mapping[str, Any]
    instances: tuple[InstanceDecl, ...]


@dataclass(frozen=True)
class Conversion:
    apps: tuple[AppDecl, ...]
    notes: tuple[Note, ...]


@dataclass(frozen=True)
class ImportOptions:
    #: Celery workers become celery instances (else processes, with a note).
    celery: bool = False
    #: The broker of a celery app whose worker command names none.
    broker: str | None = None
    #: The environment ``%(ENV_X)s`` reads (supervisord's own, at its start).
    environ: Mapping[str, str] = field(default_factory=dict)
    #: ``%(host_node_name)s``.
    host: str = ""


# -- values -------------------------------------------------------------------

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def boolean(text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError("expected true or false")


def autorestart(text: str) -> str:
    low = text.strip().lower()
    if low == "unexpected":
        return "on-failure"
    try:
        return "always" if boolean(low) else "never"
    except ValueError:
        raise ValueError("expected true, false or unexpected") from None


def _integer(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError("expected a whole number") from None


def seconds(most: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        n = _integer(text)
        if n < 0:
            raise ValueError("expected a number of seconds, 0 or more")
        if n > most:
            raise Unsupported(f"branchd allows at most {most} s")
        return n

    return parse


def startretries(text: str) -> int:
    # supervisord counts the retries after the first try (3: four tries);
    # branchd counts the failed starts (fatal after startretries of them).
    n = _integer(text)
    if n < 0:
        raise ValueError("expected 0 or more")
    if n > 999:
        raise Unsupported(
            "branchd allows at most 1000 failed starts ('forever' is issue 15, part 4)"
        )
    return n + 1


def exitcodes(text: str) -> list[int]:
    codes = []
    for part in text.split(","):
        code = _integer(part)
        if not 0 <= code <= 255:
            raise ValueError(f"exit code {code} is not 0-255")
        codes.append(code)
    return codes


#: The stop signals branchd takes (its STOP_SIGNALS; the client keeps its own copy).
STOP_SIGNALS = ("TERM", "INT", "QUIT", "HUP", "KILL", "USR1", "USR2")


def stopsignal(text: str) -> str:
    name = text.strip().upper()
    if name.isdigit():
        try:
            name = signal.Signals(int(name)).name
        except ValueError:
            raise ValueError(f"no signal number {name}") from None
    name = name.removeprefix("SIG")
    if not hasattr(signal, "SIG" + name):
        raise ValueError(f"no signal {text.strip()!r}")
    if name not in STOP_SIGNALS:
        raise Unsupported(f"branchd stops with one of {', '.join(STOP_SIGNALS)} (kept TERM)")
    return name


_SIZE = re.compile(r"^(\d+)\s*(kb|mb|gb)?$", re.IGNORECASE)
_UNITS = {"": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}


def log_bytes(text: str) -> int:
    match = _SIZE.match(text.strip())
    if match is None:
        raise ValueError("expected a size such as 50MB, 1GB or 1048576")
    n = int(match[1]) * _UNITS[(match[2] or "").lower()]
    if n == 0:
        raise Unsupported("0 is no rotation; branchd always rotates (kept at its 10 MiB)")
    if not 1024 <= n <= 2**40:
        raise Unsupported("branchd rotates at 1 KiB to 1 TiB (kept at its 10 MiB)")
    return n


def backups(text: str) -> int:
    n = _integer(text)
    if n < 0:
        raise ValueError("expected 0 or more")
    if n > 100:
        raise Unsupported("branchd keeps at most 100 old files (kept at its 5)")
    return n


def priority(text: str) -> int:
    n = _integer(text)
    if abs(n) > 10**6:
        raise Unsupported("branchd takes a priority from -1000000 to 1000000")
    return n


def text_value(text: str) -> str:
    if not text.strip():
        raise ValueError("expected a value")
    return text.strip()


def environment(text: str) -> dict[str, str]:
    """supervisord's ``KEY="val",KEY2=val`` (quotes let a value hold commas;
    a quoted value may span lines)."""
    env: dict[str, str] = {}
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t\n,":
            i += 1
        if i >= n:
            break
        eq = text.find("=", i)
        if eq < 0:
            raise ValueError(f"expected KEY=value, got {text[i:].strip()!r}")
        key = text[i:eq].strip()
        if not key or any(c in key for c in " \t\n,\"'"):
            raise ValueError(f"bad variable name {key!r}")
        i = eq + 1
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] in "\"'":
            quote, i = text[i], i + 1
            chars: list[str] = []
            while i < n and text[i] != quote:
                if quote == '"' and text[i] == "\\" and i + 1 < n:
                    i += 1
                chars.append(text[i])
                i += 1
            if i >= n:
                raise ValueError(f"the value of {key} has no closing {quote}")
            value, i = "".join(chars), i + 1
        else:
            end = text.find(",", i)
            end = n if end < 0 else end
            value, i = text[i:end].strip(), end
        env[key] = value
        while i < n and text[i] in " \t\n":
            i += 1
        if i < n and text[i] != ",":
            raise ValueError(f"expected ',' after the value of {key}")
    return env


# -- the table ------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """The option becomes instance field ``name``. ``default``: supervisord's,
    declared when the file has none, so that a line removed from the file is
    undone by the next import (None: the field is null)."""

    name: str
    parse: Callable[[str], Any]
    default: str | None


@dataclass(frozen=True)
class Read:
    """Read by the conversion itself (names, counts, the command...)."""

    what: str


@dataclass(frozen=True)
class Drop:
    """Not converted, for ``why``; ``same``: values (lower case) that are what
    branchd does anyway, so nothing is lost and nothing is said."""

    why: str
    same: frozenset[str] = frozenset()


Rule = Field | Read | Drop

_NO_EVENTS = "branchd has no event listeners (supervisord's event notifications)"
_LOG_PATH = (
    "branchd writes <state dir>/logs/<app>/<name>.<stream>.log (branchctl logs APP NAME); "
    "no path setting"
)
_ONE_ROTATION = "branchd has one size and one count for both streams: the stdout_* ones are used"

PROGRAM: Mapping[str, Rule] = {
    "command": Read("the argv (split as supervisord splits it, shlex), or a Celery worker"),
    "process_name": Read("the instance names"),
    "numprocs": Read("how many instances"),
    "numprocs_start": Read("the first %(process_num)s"),
    "environment": Read("the instance's env"),
    "autostart": Field("autostart", boolean, "true"),
    "autorestart": Field("autorestart", autorestart, "unexpected"),
    "startsecs": Field("startsecs", seconds(3600), "1"),
    "startretries": Field("startretries", startretries, "3"),
    "exitcodes": Field("exitcodes", exitcodes, "0"),
    "stopsignal": Field("stopsignal", stopsignal, "TERM"),
    "stopwaitsecs": Field("stopwaitsecs", seconds(86400), "10"),
    "user": Field("user", text_value, None),
    "directory": Field("cwd", text_value, None),
    "stdout_logfile_maxbytes": Field("log_max_bytes", log_bytes, "50MB"),
    "stdout_logfile_backups": Field("log_backups", backups, "10"),
    "stderr_logfile_maxbytes": Read(_ONE_ROTATION),
    "stderr_logfile_backups": Read(_ONE_ROTATION),
    "stopasgroup": Drop(
        "branchd always sends the stop signal to the whole process group "
        "(a Celery worker's to its main process only)",
        frozenset(_TRUE),
    ),
    "killasgroup": Drop(
        "branchd always sends SIGKILL to the whole process group", frozenset(_TRUE)
    ),
    "priority": Field("priority", priority, "999"),
    "umask": Drop("no umask setting in branchd yet (issue 15, part 4): the daemon's umask"),
    "redirect_stderr": Drop(
        "branchd keeps stderr in a file of its own (branchctl logs APP NAME --stderr)",
        frozenset(_FALSE),
    ),
    "stdout_logfile": Drop(_LOG_PATH, frozenset({"auto"})),
    "stderr_logfile": Drop(_LOG_PATH, frozenset({"auto"})),
    "stdout_capture_maxbytes": Drop("no capture mode (it feeds event listeners)", frozenset({"0"})),
    "stderr_capture_maxbytes": Drop("no capture mode (it feeds event listeners)", frozenset({"0"})),
    "stdout_events_enabled": Drop(_NO_EVENTS, frozenset(_FALSE)),
    "stderr_events_enabled": Drop(_NO_EVENTS, frozenset(_FALSE)),
    "stdout_syslog": Drop("no syslog output: logs go to files", frozenset(_FALSE)),
    "stderr_syslog": Drop("no syslog output: logs go to files", frozenset(_FALSE)),
    "serverurl": Drop(
        "no XML-RPC for children (supervisor.childutils); branchd's API is HTTP",
        frozenset({"auto"}),
    ),
}

GROUP: Mapping[str, Rule] = {
    "programs": Read("the app's instances"),
    "priority": Drop(
        "an app has no priority: each instance has its program's (the daemon starts them "
        "lowest first across apps)",
        frozenset({"999"}),
    ),
}

_DAEMON_LOG = "branchd logs to stderr (--log-level; the journal under systemd)"
_CHILD_LOGS = "instance logs go to <state dir>/logs/<app>/"
#: ``[supervisord]``: settings of the daemon itself; only ``environment`` is an
#: instance's (every app gets it as its env, under the program's own).
SUPERVISORD: Mapping[str, Rule] = {
    "environment": Read("every app's env"),
    "logfile": Drop(_DAEMON_LOG),
    "logfile_maxbytes": Drop(_DAEMON_LOG),
    "logfile_backups": Drop(_DAEMON_LOG),
    "loglevel": Drop("branchd --log-level"),
    "pidfile": Drop("no pid file: one daemon per state dir (a lock file); branchctl ping"),
    "nodaemon": Drop("branchd always runs in the foreground (systemd/branchd.service)"),
    "silent": Drop(_DAEMON_LOG),
    "minfds": Drop("no descriptor minimum: set LimitNOFILE= in the systemd unit"),
    "minprocs": Drop("no process minimum: set LimitNPROC= in the systemd unit"),
    "umask": Drop("no umask setting in branchd yet (issue 15, part 4)"),
    "user": Drop("run branchd as that user; each instance may have its own user"),
    "identifier": Drop("the branch has an id of its own (branchctl branch)"),
    "directory": Drop("branchd does not chdir; its files are under --state-dir"),
    "nocleanup": Drop(_CHILD_LOGS),
    "childlogdir": Drop(_CHILD_LOGS),
    "strip_ansi": Drop("branchd keeps the output as written"),
}

#: Sections that are no app and no instance, with the reason.
OTHER_SECTIONS: Mapping[str, str] = {
    "unix_http_server": "branchd's API is HTTP on --bind (default 127.0.0.1:8400) with a token",
    "inet_http_server": "branchd's API: --bind HOST:PORT, with a bearer token (no user/password)",
    "supervisorctl": "branchctl finds the local daemon itself (its branchd.url); else --url",
    "rpcinterface": "no XML-RPC interface: branchd's API is HTTP/JSON (docs/api.md)",
    "ctlplugin": "branchctl has no plugins",
    "eventlistener": "branchd has no event listeners (supervisord's event protocol)",
    "fcgi-program": "branchd holds no socket for its instances (no FastCGI socket passing)",
}

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def branchd_name(name: str) -> str | None:
    """``name`` as branchd takes it (accents dropped, other characters '_');
    None when nothing usable is left."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    out = re.sub(r"[^A-Za-z0-9_.-]", "_", ascii_name).lstrip("_.-")
    return out if NAME_RE.match(out) else None


# -- the conversion ------------------------------------------------------------------


class _Run:
    """One conversion's findings."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.notes: list[Note] = []

    def note(self, where: object, subject: str, why: str, kind: NoteKind) -> None:
        self.notes.append(Note(str(where), subject, why, kind))


def convert(path: str, reader: Reader, opts: ImportOptions) -> Conversion:
    """The apps and instances ``path`` declares; BadConfig with every problem
    (one line each) when it cannot be converted as a whole."""
    run = _Run()
    names: dict[str, object] = {f"ENV_{k}": v for k, v in opts.environ.items()}
    names["host_node_name"] = opts.host
    loaded = load(path, reader, names, run.problems)
    for where, text in loaded.notes:
        run.note(where, "[include]", text, NoteKind.NOTE)
    apps = _convert(loaded, names, opts, run)
    if run.problems:
        raise BadConfig(sorted(run.problems, key=_by_place))
    return Conversion(apps, tuple(run.notes))


_PLACE = re.compile(r"^(?P<file>[^:]*):(?P<line>\d+):")


def _by_place(problem: str) -> tuple[str, int]:
    """file, then line: the order a reader fixes them in (stable otherwise)."""
    match = _PLACE.match(problem)
    return (match["file"], int(match["line"])) if match else (problem.split(":")[0], 0)


def _kind(section: Section) -> tuple[str, str]:
    kind, _, name = section.name.partition(":")
    return kind.strip(), name.strip()


def _convert(
    loaded: Loaded, names: dict[str, object], opts: ImportOptions, run: _Run
) -> tuple[AppDecl, ...]:
    app_env: dict[str, str] = {}
    programs: dict[str, Section] = {}
    groups: dict[str, Section] = {}
    for s in loaded.sections:
        kind, name = _kind(s)
        if kind == "supervisord":
            app_env = _supervisord(s, names, run)
        elif kind == "program" and name:
            programs[name] = s
        elif kind == "group" and name:
            groups[name] = s
        elif kind in OTHER_SECTIONS:
            run.note(s.where, f"[{s.name}]", OTHER_SECTIONS[kind], NoteKind.NOT_CONVERTED)
        elif kind != "include":
            known = ", ".join(f"[{k}]" for k in ("supervisord", "program:x", "group:x", "include"))
            run.problems.append(f"{s.where}: unknown section [{s.name}] (known: {known}, ...)")
    group_of = _groups(groups, programs, loaded, run)
    apps: dict[str, _App] = {}
    for name, s in programs.items():
        group = group_of.get(name, name)
        app_name = branchd_name(group)
        if app_name is None:
            run.problems.append(f"{s.where}: app name {group!r}: {_NAME_RULE}")
            continue
        app = apps.setdefault(app_name, _App(app_name, dict(app_env)))
        _program(s, name, group, app, names, opts, run)
    seen: dict[str, str] = {}
    for app in apps.values():
        for inst in app.instances:
            if inst.name in seen:
                run.problems.append(
                    f"{inst.source}: instance name {inst.name!r} is also made by {seen[inst.name]} "
                    "(instance names are unique on a branch, across apps)"
                )
            seen.setdefault(inst.name, inst.source)
    return tuple(AppDecl(a.name, a.env, a.celery, tuple(a.instances)) for a in apps.values())


_NAME_RULE = (
    "no usable branchd name (letters, digits, '_', '.', '-'; 1-63, a letter or digit first)"
)


@dataclass
class _App:
    name: str
    env: dict[str, str]
    celery: dict[str, Any] = field(default_factory=dict)
    instances: list[InstanceDecl] = field(default_factory=list)


def _supervisord(s: Section, names: dict[str, object], run: _Run) -> dict[str, str]:
    env: dict[str, str] = {}
    for key, value in s.options.items():
        rule = SUPERVISORD.get(key)
        if key == "environment":
            text = expand(value, names, "[supervisord] environment", run.problems)
            try:
                env = environment(text or "")
            except ValueError as exc:
                run.problems.append(f"{value.where}: [supervisord] environment: {exc}")
            # supervisord's own environment feeds %(ENV_X)s of every section
            names.update({f"ENV_{k}": v for k, v in env.items()})
        elif isinstance(rule, Drop):
            run.note(
                value.where, f"[supervisord] {key}={value.text}", rule.why, NoteKind.NOT_CONVERTED
            )
        else:
            run.note(
                value.where,
                f"[supervisord] {key}",
                "not a supervisord setting",
                NoteKind.NOT_CONVERTED,
            )
    return env


def _groups(
    groups: Mapping[str, Section], programs: Mapping[str, Section], loaded: Loaded, run: _Run
) -> dict[str, str]:
    """program -> its group's name."""
    fcgi = {_kind(s)[1] for s in loaded.sections if _kind(s)[0] == "fcgi-program"}
    group_of: dict[str, str] = {}
    for gname, s in groups.items():
        listed = s.options.get("programs")
        if listed is None:
            run.problems.append(f"{s.where}: [{s.name}] has no 'programs' setting")
            continue
        for key, value in s.options.items():
            _drop_note(GROUP.get(key), key, value, f"[{s.name}]", run)
        for program in (p.strip() for p in listed.text.replace("\n", ",").split(",")):
            if not program:
                continue
            if program in fcgi:
                run.note(
                    listed.where,
                    f"[{s.name}] {program}",
                    "an fcgi-program (not converted)",
                    NoteKind.NOT_CONVERTED,
                )
            elif program not in programs:
                run.problems.append(f"{listed.where}: [{s.name}] names unknown program {program!r}")
            elif program in group_of:
                run.problems.append(
                    f"{listed.where}: [{s.name}]: program {program!r} is in "
                    f"[group:{group_of[program]}] too"
                )
            else:
                group_of[program] = gname
    for gname, s in groups.items():
        if gname in programs and gname not in group_of:
            run.problems.append(
                f"{s.where}: [{s.name}] and [program:{gname}] (in no group) would both be app "
                f"{gname!r}"
            )
    return group_of


def _drop_note(rule: Rule | None, key: str, value: Value, subject: str, run: _Run) -> None:
    if rule is None:
        run.note(
            value.where,
            f"{subject} {key}",
            "not a supervisord option (it ignores it too)",
            NoteKind.NOT_CONVERTED,
        )
    elif isinstance(rule, Drop) and value.text.strip().lower() not in rule.same:
        run.note(value.where, f"{subject} {key}={value.text}", rule.why, NoteKind.NOT_CONVERTED)


def _program(
    s: Section,
    program: str,
    group: str,
    app: _App,
    base: Mapping[str, object],
    opts: ImportOptions,
    run: _Run,
) -> None:
    subject = f"[{s.name}]"

    def bad(where: object, what: str) -> None:
        run.problems.append(f"{where}: {subject} {what}")

    command = s.options.get("command")
    if command is None:
        bad(s.where, "has no command")
        return
    count = _count(s, "numprocs", 1, bad)
    first = _count(s, "numprocs_start", 0, bad)
    raw_name = s.options.get("process_name")
    if count > 1 and "%(process_num)" not in (raw_name.text if raw_name else ""):
        bad(s.where, f"numprocs={count} needs %(process_num)s in process_name (supervisord's rule)")
        count = 1  # (the rest is still checked, so that every problem is said at once)
    group_opt = {
        k: s.options[k].text.strip().lower()
        for k in ("stopasgroup", "killasgroup")
        if k in s.options
    }
    if group_opt.get("stopasgroup") in _TRUE and group_opt.get("killasgroup") in _FALSE:
        bad(s.where, "stopasgroup=true with killasgroup=false (supervisord refuses it too)")
    for key, value in s.options.items():
        _drop_note(PROGRAM.get(key), key, value, subject, run)
    for i, num in enumerate(range(first, first + count)):
        names: dict[str, object] = {
            **base,
            "program_name": program,
            "group_name": group,
            "process_num": num,
            "numprocs": count,
        }
        decl = _process(s, subject, app, names, opts, run, notes=i == 0)
        if decl is not None:
            app.instances.append(decl)


def _count(s: Section, key: str, default: int, bad: Callable[[object, str], None]) -> int:
    value = s.options.get(key)
    if value is None:
        return default
    try:
        n = _integer(value.text)
    except ValueError:
        n = -1
    if n < 0 or n > 1000:
        bad(value.where, f"{key}={value.text}: expected a whole number, 0-1000")
        return 0
    return n


def _process(
    s: Section,
    subject: str,
    app: _App,
    names: dict[str, object],
    opts: ImportOptions,
    run: _Run,
    notes: bool,
) -> InstanceDecl | None:
    """One process of a program (``names`` has its process_num) as an instance."""
    start = len(run.problems)
    env: dict[str, str] = {}
    if "environment" in s.options:
        value = s.options["environment"]
        text = expand(value, names, f"{subject} environment", run.problems)
        try:
            env = environment(text or "")
        except ValueError as exc:
            run.problems.append(f"{value.where}: {subject} environment: {exc}")
        names = {**names, **{f"ENV_{k}": v for k, v in env.items()}}

    def get(key: str, default: str | None = None) -> tuple[str | None, Value | None]:
        value = s.options.get(key)
        if value is None:
            return default, None
        return expand(value, names, f"{subject} {key}", run.problems), value

    raw_name, _ = get("process_name", str(names["program_name"]))
    if raw_name is None:
        return None  # (a bad expansion: said)
    name = branchd_name(raw_name)
    if name is None:
        run.problems.append(f"{s.where}: {subject} process name {raw_name!r}: {_NAME_RULE}")
        return None
    if name != raw_name:
        run.note(s.where, subject, f"named {name!r} in branchd (was {raw_name!r})", NoteKind.NOTE)
    command_text, command_value = get("command")
    argv: list[str] = []
    try:
        argv = shlex.split(command_text or "")
    except ValueError as exc:
        run.problems.append(f"{command_value and command_value.where}: {subject} command: {exc}")
    if command_text is not None and not argv and len(run.problems) == start:
        run.problems.append(f"{command_value and command_value.where}: {subject} command is empty")
    fields: dict[str, Any] = {"name": name}
    worker = worker_of(argv)
    celery = (
        worker is not None
        and opts.celery
        and _celery_app(worker, env, s, subject, app, opts, run, notes)
    )
    for key, rule in PROGRAM.items():
        if not isinstance(rule, Field):
            continue
        text, given = get(key, rule.default)
        if given is None and celery:
            continue  # a celery instance keeps branchd's defaults for what the file leaves out
        if text is None:
            if given is None:
                fields[rule.name] = None
            continue
        try:
            fields[rule.name] = rule.parse(text)
        except Unsupported as exc:
            if notes and given is not None:
                run.note(
                    given.where, f"{subject} {key}={given.text}", str(exc), NoteKind.NOT_CONVERTED
                )
        except ValueError as exc:
            where = given.where if given is not None else s.where
            run.problems.append(f"{where}: {subject} {key}={text}: {exc}")
    _stderr_rotation(s, subject, fields, run, notes)
    fields["env"] = env
    if celery and worker is not None:
        fields["kind"] = "celery"
        fields.update(worker.instance)
        if worker.workdir and fields.get("cwd") is None:
            fields["cwd"] = worker.workdir
        if notes:
            for option, why in worker.dropped:
                run.note(
                    command_value.where if command_value else s.where,
                    f"{subject} command {option}",
                    why,
                    NoteKind.NOT_CONVERTED,
                )
    else:
        fields["kind"] = "process"
        fields["command"] = argv
        if worker is not None and not opts.celery and notes:
            run.note(
                s.where,
                subject,
                "a Celery worker, imported as a plain process: "
                "--celery would make it a celery instance (queues, autoscale, warm stops)",
                NoteKind.NOTE,
            )
    if len(run.problems) > start:
        return None
    return InstanceDecl(name, fields, f"{s.where} {subject}")


def _stderr_rotation(
    s: Section, subject: str, fields: Mapping[str, Any], run: _Run, notes: bool
) -> None:
    if not notes or boolean_or(s, "redirect_stderr", False):
        return  # (redirected: stderr has no file of its own in supervisord either)
    for key, out in (
        ("stderr_logfile_maxbytes", "stdout_logfile_maxbytes"),
        ("stderr_logfile_backups", "stdout_logfile_backups"),
    ):
        value = s.options.get(key)
        mine = s.options.get(out)
        if value is not None and (mine is None or mine.text.strip() != value.text.strip()):
            run.note(
                value.where, f"{subject} {key}={value.text}", _ONE_ROTATION, NoteKind.NOT_CONVERTED
            )


def boolean_or(s: Section, key: str, default: bool) -> bool:
    value = s.options.get(key)
    try:
        return default if value is None else boolean(value.text)
    except ValueError:
        return default


def _celery_app(
    worker: Any,
    env: Mapping[str, str],
    s: Section,
    subject: str,
    app: _App,
    opts: ImportOptions,
    run: _Run,
    notes: bool,
) -> bool:
    """Whether the worker can be a celery instance of ``app`` (whose Celery
    settings it then sets); else a note says why it stays a process."""
    settings = dict(worker.app)
    if not settings.get("celery_app"):
        if notes:
            run.note(
                s.where,
                subject,
                "a Celery worker without -A/--app: branchd needs the "
                "module, so it stays a plain process",
                NoteKind.NOTE,
            )
        return False
    broker = settings.get("broker") or env.get("CELERY_BROKER_URL") or opts.broker
    if broker:
        settings["broker"] = broker
    backend = settings.get("result_backend") or env.get("CELERY_RESULT_BACKEND")
    if backend:
        settings["result_backend"] = backend
    if app.celery and app.celery != settings:
        if notes:
            run.note(
                s.where,
                subject,
                f"a Celery worker whose -A, broker or interpreter differ "
                f"from another worker's of app {app.name!r} (an app has one of each): "
                "imported as a plain process",
                NoteKind.NOTE,
            )
        return False
    if notes and not app.celery:
        if "broker" not in settings:
            run.note(
                s.where,
                subject,
                "no broker in the command, its environment or --broker: "
                "the app gets branchd's embedded broker, not the one "
                f"{settings['celery_app']}'s own settings name",
                NoteKind.NOTE,
            )
        if "python" not in settings:
            run.note(
                s.where,
                subject,
                "a bare 'celery' command: the worker runs with branchd's "
                "own Python unless the app is given --python (a virtualenv)",
                NoteKind.NOTE,
            )
    app.celery = settings
    return True
