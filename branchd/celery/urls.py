"""Pure checks of broker URLs and names, for the declarations (no I/O, no
connection: a broker may be down when an app is declared), and an app's
broker and result store as its view shows them (``broker_url``,
``backend_for``: a plain branch's app views need nothing of broker.py)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from branchd.model import App

#: Transports whose broker lives inside one process: a worker there could
#: never be reached by the daemon (nor by anyone sending it a task).
IN_PROCESS = frozenset({"memory"})


def is_embedded_url(url: str | None) -> bool:
    """No broker, or a bare ``filesystem://``: both mean the embedded broker."""
    return not url or url == "filesystem://"


def broker_url_problem(url: str) -> str | None:
    """What is wrong with a broker URL an app declares, or None if nothing is.

    Pure: no connection is tried (a broker may be down when an app is
    declared). Checks each URL of a failover list (``;``): a transport kombu
    knows (its own alias table, so that a new kombu transport needs no change
    here), a host and a port that parse (port 1-65535). ``filesystem://``
    only bare (the embedded broker): kombu's filesystem transport takes its
    folders from transport options alone, which branchd sets itself.
    Messages never quote the URL (it may hold a password).
    """
    if url != url.strip():
        return "the broker URL has leading or trailing spaces"
    for one in url.split(";"):
        problem = _one_url_problem(one)
        if problem:
            return problem
    return None


def _one_url_problem(url: str) -> str | None:
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme:
        return "a broker URL looks like transport://[user:password@]host[:port][/vhost]"
    # Imported here, not with the module: kombu.transport brings most of kombu
    # (about 5 MiB resident), which a branch without a broker URL never needs.
    from kombu.transport import TRANSPORT_ALIASES

    # kombu's "sqla+postgresql://": the transport is before the "+"
    transport = scheme.partition("+")[0]
    if transport not in TRANSPORT_ALIASES:
        import difflib  # only for this message

        known = sorted(TRANSPORT_ALIASES)
        close = difflib.get_close_matches(transport, known, n=1)
        if close:
            return f"unknown transport {transport!r}, did you mean {close[0]!r}?"
        return f"unknown transport {transport!r} (kombu knows {', '.join(known)})"
    if transport in IN_PROCESS:
        return f"the {transport} transport lives inside one process: workers could not be reached"
    if transport == "filesystem":
        if rest:
            return (
                "filesystem:// takes no path or options: leave the broker empty (or give a "
                "bare filesystem://) for the embedded broker, which branchd configures itself"
            )
        return None
    if any(c.isspace() for c in url):
        return "the broker URL must not contain spaces"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        # not urlsplit's own text: it quotes a piece of the password
        return (
            "the broker URL's host or port does not parse (percent-encode '/', '#', '?' "
            "and '@' in a user name or password)"
        )
    if port is not None and not 1 <= port <= 65535:
        return f"bad port {port} in the broker URL (1-65535)"
    db = parts.path.strip("/")
    if transport in ("redis", "rediss") and db and not db.isdigit():
        return "a redis broker URL ends in a database number (redis://host:6379/0), not a name"
    return None


#: Exchange names kombu's filesystem transport takes (5.7; it refuses others,
#: since each exchange is a file of the control folder).
_FS_EXCHANGE_RE = re.compile(r"[A-Za-z0-9._-]+")


def embedded_exchange_problem(exchange: str) -> str | None:
    """Why the embedded broker cannot carry an exchange of that name, or None."""
    if _FS_EXCHANGE_RE.fullmatch(exchange) and exchange.strip("."):
        return None
    return (
        f"the embedded broker takes exchange names of letters, digits, '.', '_', '-' "
        f"only, not {exchange!r}"
    )


def result_backend_problem(url: str) -> str | None:
    """What is wrong with a result backend URL an app declares, or None.

    Celery knows many backends (and names them by URL scheme): only the shape
    is checked here, plus what branchd itself acts on, the folder of a
    ``file://`` store (an absolute path). Messages never quote the URL.
    """
    scheme, sep, rest = url.partition("://")
    if url != url.strip() or any(c.isspace() for c in url):
        return "the result backend URL must not contain spaces"
    if not sep or not scheme or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        return "a result backend URL looks like scheme://..., e.g. redis://host:6379/1"
    if scheme == "file" and not rest.startswith("/"):
        return "a file:// result backend needs an absolute folder: file:///path/to/results"
    return None


def results_dir(state_dir: str | os.PathLike[str], app: str) -> Path:
    """Where the default result backend of an app on the embedded broker keeps
    its results: Celery's ``file://`` store (chords work on it through Celery's
    ``chord_unlock`` polling, like on any backend without atomic counters).
    Celery refuses a folder that does not exist: see :func:`ensure_results_dir`."""
    return Path(state_dir).resolve() / "results" / app


def broker_url(app: App) -> str:
    """The URL of the app's broker, as ``broker_for`` gives it, without making
    the embedded broker's folders: an app's view must not bring back the
    folders of an app whose delete just removed them."""
    return "filesystem://" if is_embedded_url(app.celery.broker) else app.celery.broker or ""


def backend_for(app: App, state_dir: Path) -> str | None:
    """The app's result backend: its own, else a file store for the embedded
    broker (a zero-service Celery has results too), else the app module's."""
    if app.celery.result_backend:
        return app.celery.result_backend
    if is_embedded_url(app.celery.broker):
        return f"file://{results_dir(state_dir, app.name)}"
    return None
