"""Pure: probes as users write them, sd_notify messages, and start order.

A probe is stored as text, the form a user types: ``tcp:HOST:PORT``,
``http://HOST/PATH`` (or ``http:URL``), ``exec:COMMAND ARGS`` (split as a
shell would, never run through one) and ``notify``; the API also takes
``{"exec": [argv...]}``. ``parse_probe`` reads any of them into a ``Probe``,
whose ``text`` is what the declaration keeps. The runner that carries a
probe out is I/O (``process.prober``); what its answers mean is here and in
the state machine.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit

from branchd.model import InstanceSpec, State

#: Every probe form, in words (for every error about one).
PROBE_RULE = (
    'give "tcp:HOST:PORT" (it connects), "http:URL" or the URL itself (http:// or '
    'https://; a 2xx answer), "exec:COMMAND ARGS" or {"exec": [argv...]} (exit code 0), '
    'or "notify" (the sd_notify protocol: READY=1 on $NOTIFY_SOCKET)'
)


class ProbeKind(StrEnum):
    TCP = "tcp"
    HTTP = "http"
    EXEC = "exec"
    NOTIFY = "notify"


@dataclass(frozen=True)
class Probe:
    kind: ProbeKind
    host: str = ""
    port: int = 0
    url: str = ""
    argv: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        """The stored form (``parse_probe(p.text) == p``)."""
        match self.kind:
            case ProbeKind.TCP:
                host = f"[{self.host}]" if ":" in self.host else self.host
                return f"tcp:{host}:{self.port}"
            case ProbeKind.HTTP:
                return self.url
            case ProbeKind.EXEC:
                return "exec:" + shlex.join(self.argv)
        return "notify"

    @property
    def label(self) -> str:
        """How messages name it: "tcp 127.0.0.1:5432", "http://...", "exec pg_isready"."""
        if self.kind == ProbeKind.TCP:
            return "tcp " + self.text.removeprefix("tcp:")
        if self.kind == ProbeKind.EXEC:
            return "exec " + shlex.join(self.argv)
        return self.text


def parse_probe(value: object) -> Probe:
    """A probe as a user gives it; ValueError (naming the forms) when it is none."""
    if isinstance(value, Mapping) and set(value) == {"exec"}:
        argv = value["exec"]
        if isinstance(argv, list | tuple) and argv and all(isinstance(a, str) and a for a in argv):
            return Probe(ProbeKind.EXEC, argv=tuple(argv))
        raise ValueError(f"bad exec probe {value!r}: its argv is a non-empty list of strings")
    if not isinstance(value, str):
        raise ValueError(f"bad probe {value!r}: {PROBE_RULE}")
    text = value.strip()
    kind, sep, rest = text.partition(":")
    if text == "notify":
        return Probe(ProbeKind.NOTIFY)
    if sep and kind == "tcp":
        return _tcp(value, rest)
    if sep and kind == "exec":
        try:
            argv = tuple(shlex.split(rest))
        except ValueError as exc:
            raise ValueError(f"bad exec probe {value!r}: {exc}") from None
        if not argv:
            raise ValueError(f"bad exec probe {value!r}: give a command after 'exec:'")
        return Probe(ProbeKind.EXEC, argv=argv)
    if sep and kind == "http" and not rest.startswith("//"):
        text = rest  # "http:URL"
    if text.startswith(("http://", "https://")):
        return _http(value, text)
    raise ValueError(f"bad probe {value!r}: {PROBE_RULE}")


def _tcp(value: str, rest: str) -> Probe:
    host, _, port_text = rest.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad tcp probe {value!r}: give tcp:HOST:PORT (a port 1-65535)")
    if any(c.isspace() or c in "/[]" for c in host):
        raise ValueError(f"bad tcp probe {value!r}: {host!r} is not a host name or address")
    return Probe(ProbeKind.TCP, host=host, port=int(port_text))


def _http(value: str, url: str) -> Probe:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (a bad port raises here)
    except ValueError as exc:
        raise ValueError(f"bad http probe {value!r}: {exc}") from None
    if not parts.hostname or any(c.isspace() for c in url):
        raise ValueError(f"bad http probe {value!r}: give a URL like http://127.0.0.1:8080/health")
    return Probe(ProbeKind.HTTP, url=url)


def probe_text(value: object) -> str | None:
    """A probe field as the declaration keeps it (None: no probe)."""
    return None if value is None else parse_probe(value).text


# sd_notify -------------------------------------------------------------------


@dataclass(frozen=True)
class Notice:
    """What one sd_notify datagram says (the fields branchd acts on)."""

    ready: bool = False
    status: str | None = None


def parse_notice(datagram: bytes) -> Notice:
    """``KEY=VALUE`` lines (sd_notify(3)); unknown keys and bad lines are ignored."""
    ready, status = False, None
    for line in datagram.decode("utf-8", "replace").splitlines():
        key, sep, val = line.partition("=")
        if not sep:
            continue
        if key == "READY" and val == "1":
            ready = True
        elif key == "STATUS":
            status = val.strip()[:200] or None
    return Notice(ready, status)


# Retries of a readiness probe ---------------------------------------------------

#: The first retry of a failed readiness probe, and the longest pause between two.
READY_RETRY_FIRST = 0.05
READY_RETRY_MAX = 0.5


def ready_retry_delay(failures: int) -> float:
    """The pause after ``failures`` failed tries (1, 2...): quick at first,
    since most services bind within a second, then every READY_RETRY_MAX."""
    return min(READY_RETRY_MAX, READY_RETRY_FIRST * 2.0 ** min(20, max(0, failures - 1)))


# Start order ---------------------------------------------------------------------


@dataclass(frozen=True)
class Dep:
    """One instance another starts after, as it stands now."""

    name: str
    state: State | None  # None: no such instance in the app
    reason: str | None = None


#: The longest reason a waiting instance gives (each names its dependencies'
#: own reasons, which may name theirs).
WAITING_REASON_MAX = 500


def waiting_for(deps: Iterable[Dep]) -> str | None:
    """None once every dependency is running (ready); else why it still waits:
    "waiting for db (not ready: tcp 127.0.0.1:5432 refused)"."""
    not_yet = [f"{d.name} ({_why_not(d)})" for d in deps if d.state != State.RUNNING]
    if not not_yet:
        return None
    why = "waiting for " + ", ".join(not_yet)
    # (bounded: a chain of waits, or a cycle no declaration could make, stays short)
    return why if len(why) <= WAITING_REASON_MAX else why[: WAITING_REASON_MAX - 3] + "..."


def _why_not(dep: Dep) -> str:
    if dep.state is None:
        return "no such instance"
    if dep.reason and dep.state in (State.STARTING, State.WAITING):
        return dep.reason  # "not ready: ...", "waiting for ..."
    if dep.reason and dep.state in (State.BACKOFF, State.FATAL, State.EXITED):
        return f"{dep.state.value}: {dep.reason}"
    return dep.state.value


def after_problem(
    app: str, name: str, after: Sequence[str], others: Mapping[str, Sequence[str]]
) -> str | None:
    """Why instance ``name`` of ``app`` cannot start after ``after``, given the
    ``after`` of every other instance of the app (``others``, by name): a name
    that is no instance of the app, itself, or a cycle. None: it can."""
    if name in after:
        return f"after: {name!r} cannot start after itself"
    unknown = [n for n in after if n not in others]
    if unknown:
        names = ", ".join(repr(n) for n in unknown)
        return (
            f"after: no instance {names} in app {app!r} (after names instances of the "
            "same app, created before it)"
        )
    graph = {**others, name: after}
    path = _cycle(graph, name)
    if path:
        return f"after: a cycle ({' -> '.join(path)}): start order cannot loop"
    return None


def _cycle(graph: Mapping[str, Sequence[str]], start: str) -> list[str] | None:
    """A path start -> ... -> start through ``graph``, if there is one."""
    stack: list[tuple[str, list[str]]] = [(start, [start])]
    seen: set[str] = set()
    while stack:
        node, path = stack.pop()
        for nxt in graph.get(node, ()):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def _depths(specs: Sequence[InstanceSpec]) -> dict[str, int]:
    """How many ``after`` links lie under each instance (among ``specs``)."""
    after = {s.name: s.after for s in specs}
    depth: dict[str, int] = {}

    def of(name: str, trail: frozenset[str]) -> int:
        if name in depth:
            return depth[name]
        if name in trail:  # (a cycle cannot be declared; never loop on one anyway)
            return 0
        below = (of(a, trail | {name}) + 1 for a in after[name] if a in after)
        depth[name] = max(below, default=0)
        return depth[name]

    for s in specs:
        if s.name not in depth:
            of(s.name, frozenset())
    return depth


def start_order(specs: Sequence[InstanceSpec]) -> list[str]:
    """Names in the order the daemon starts them: by priority (lower first,
    supervisord's), then dependencies before what starts after them, then name."""
    depth = _depths(specs)
    return [s.name for s in sorted(specs, key=lambda s: (s.priority, depth[s.name], s.name))]


def stop_tiers(specs: Sequence[InstanceSpec]) -> list[list[str]]:
    """The daemon's stop of everything, in tiers (each waits for the one
    before): the reverse of the start order, by priority and dependency depth."""
    depth = _depths(specs)
    tiers: dict[tuple[int, int], list[str]] = {}
    for s in specs:
        tiers.setdefault((s.priority, depth[s.name]), []).append(s.name)
    return [sorted(tiers[key]) for key in sorted(tiers, reverse=True)]
