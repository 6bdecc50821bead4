"""Broker specs, and the embedded broker: kombu's ``filesystem://`` transport.

The embedded broker lives under ``<state_dir>/broker``, one per app::

    apps/<app>/data/      every message, one file each, named ``<ms>_<uuid>.<queue>.msg``
    apps/<app>/control/   one ``<exchange>.exchange`` JSON table per exchange (its bindings)
    hook/                 ``branchd_worker_loader.py``, the loader that hands the folders to workers

kombu reads the folders only from transport options, and those cannot ride
on the broker URL (``filesystem://?data_folder_in=...`` makes
``kombu.Connection`` raise ``TypeError``: query keys become constructor
arguments). Celery has no environment variable for transport options either,
but it honours ``CELERY_LOADER`` ahead of the app's own loader, so
:func:`worker_env` points it at a small loader that merges the options into the
app's ``broker_transport_options`` when the worker starts (see
``worker_loader.py``). The user's app and configuration stay untouched.

The transport has two traps that :func:`clear_node_leftovers` and
:func:`prune_dead_fanout` handle: a node's control queue keeps the messages
broadcast while the node was down (a restarted node would replay a stale
``shutdown``), and a killed worker never unbinds its control queue from the
``celery.pidbox`` fanout table, so every later broadcast is copied into it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from branchd.celery.urls import backend_for as backend_for
from branchd.celery.urls import broker_url as broker_url
from branchd.celery.urls import results_dir

log = logging.getLogger(__name__)

CONTROL_EXCHANGE = "celery.pidbox"
REPLY_EXCHANGE = "reply.celery.pidbox"
LOADER_MODULE = "branchd_worker_loader"
#: fs_transport.py, copied beside the loader: workers on the embedded broker
#: use it too (kombu's own reader can take a message before it is written).
TRANSPORT_MODULE = "branchd_fs_transport"
LOADER_ENV = "BRANCHD_BROKER_TRANSPORT_OPTIONS"
QUEUES_ENV = "BRANCHD_TASK_QUEUES"
ANNOTATIONS_ENV = "BRANCHD_TASK_ANNOTATIONS"
POLLING_INTERVAL = 0.1


@dataclass(frozen=True)
class BrokerSpec:
    """Where a broker is and how to reach it; one remote-control connection per spec.

    ``worker_hook_dir`` is set for specs whose transport options workers must
    receive through :func:`worker_env` (the embedded broker).
    """

    url: str
    transport_options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    worker_hook_dir: str | None = field(default=None, compare=False)

    @property
    def is_filesystem(self) -> bool:
        return self.url.startswith("filesystem:")

    @property
    def transport(self) -> str:
        """kombu's name for the URL's transport (its scheme; kombu's default is amqp)."""
        scheme, sep, _ = self.url.partition("://")
        return scheme if sep else "amqp"

    def redacted(self) -> str:
        """The URL without its password, for logs and errors."""
        scheme, sep, rest = self.url.partition("://")
        creds, at, host = rest.rpartition("@")
        if not at or ":" not in creds:
            return self.url
        return f"{scheme}{sep}{creds.split(':', 1)[0]}:**@{host}"


def embedded(
    state_dir: str | os.PathLike[str], app: str | None = None, hook: str | None = None
) -> BrokerSpec:
    """The embedded filesystem broker of ``app`` under ``state_dir/broker/apps/<app>``
    (``state_dir/broker`` without an app); creates its folders.

    One broker per app, as two apps on RabbitMQ would have two vhosts: the
    filesystem transport has one namespace per folder, so apps sharing one
    would take each other's tasks (and results) and see each other's workers.
    """
    root = Path(state_dir).resolve() / "broker"
    if app is not None:
        root = root / "apps" / app
    data, control = root / "data", root / "control"
    for folder in (data, control):
        folder.mkdir(parents=True, exist_ok=True)
    # (the loader is installed once by whoever passes ``hook``: not at every view)
    hook = hook if hook is not None else hook_dir(state_dir)
    options = {
        # one folder both ways: every process reads what every other writes
        "data_folder_in": str(data),
        "data_folder_out": str(data),
        "control_folder": str(control),
        "polling_interval": POLLING_INTERVAL,
        "store_processed": False,
    }
    return BrokerSpec("filesystem://", options, hook)


def ensure_results_dir(backend: str | None) -> None:
    """Make the folder of a ``file://`` result backend if it is missing."""
    if backend and backend.startswith("file://"):
        Path(backend.removeprefix("file://")).mkdir(parents=True, exist_ok=True)


def install_worker_loader(hook_dir: Path) -> Path:
    """Copy the worker-side loader, and the safe filesystem transport it hands
    to workers, into ``hook_dir`` (only what changed)."""
    copies = (("worker_loader.py", LOADER_MODULE), ("fs_transport.py", TRANSPORT_MODULE))
    for source, module in copies:
        text = Path(__file__).with_name(source).read_text()
        target = hook_dir / f"{module}.py"
        if not target.exists() or target.read_text() != text:
            tmp = target.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(target)
    return hook_dir / f"{LOADER_MODULE}.py"


def hook_dir(state_dir: str | os.PathLike[str]) -> str:
    """The folder of the worker-side loader (made, and the loader installed)."""
    hook = Path(state_dir).resolve() / "broker" / "hook"
    hook.mkdir(parents=True, exist_ok=True)
    install_worker_loader(hook)
    return str(hook)


def worker_env(
    spec: BrokerSpec,
    pythonpath: str | None = None,
    *,
    task_queues: Mapping[str, Mapping[str, Any]] | None = None,
    hook: str | None = None,
    task_annotations: Mapping[str, Mapping[str, Any]] | None = None,
    worker: bool = False,
) -> dict[str, str]:
    """Environment variables that make a ``celery`` process use ``spec``'s
    transport options and (``task_queues``, Celery's dict form) the declared
    bindings of its queues, through the loader in ``hook`` (default: the
    spec's own hook folder).

    ``pythonpath`` is the process's own ``PYTHONPATH`` if any; the hook folder is
    appended so it never shadows the user's modules. Empty when there is
    nothing to hand over (a plain ``amqp://`` URL and no custom binding),
    unless it is for a ``worker``: a worker always gets the loader, for its
    rate limits under a backlog (one timer per bucket, see worker_loader),
    which a limit set later by remote control needs as much as one handed
    over at its start.
    """
    env: dict[str, str] = {}
    if spec.transport_options and spec.worker_hook_dir is not None:
        env[LOADER_ENV] = json.dumps(dict(spec.transport_options), sort_keys=True)
    if task_queues:
        env[QUEUES_ENV] = json.dumps({k: dict(v) for k, v in task_queues.items()}, sort_keys=True)
    if task_annotations:
        # (a worker's per-task limits, in force from its first task: see worker_loader)
        env[ANNOTATIONS_ENV] = json.dumps(
            {k: dict(v) for k, v in task_annotations.items()}, sort_keys=True
        )
    folder = spec.worker_hook_dir or hook
    if (not env and not worker) or folder is None:
        return {}
    env["CELERY_LOADER"] = f"{LOADER_MODULE}:Loader"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, folder) if p)
    return env


def control_queue(node: str) -> str:
    """The name of a node's remote-control queue (kombu's ``Mailbox.get_queue``)."""
    return f"{node}.{CONTROL_EXCHANGE}"


def clear_node_leftovers(spec: BrokerSpec, node: str) -> int:
    """Drop what a previous run of ``node`` left on the embedded broker; call before it starts.

    Removes the messages waiting in its control queue and its binding in the
    fanout table (the worker binds again when it starts). Returns the number
    of messages removed. Does nothing for other transports, where the broker
    drops an exclusive queue with its consumer.
    """
    if not spec.is_filesystem or spec.worker_hook_dir is None:
        return 0
    queue = control_queue(node)
    _unbind(spec, CONTROL_EXCHANGE, {queue})
    return _drop_messages(spec, {queue})


def prune_dead_fanout(spec: BrokerSpec, live_nodes: Collection[str]) -> list[str]:
    """Unbind the control queues of nodes not in ``live_nodes`` from the fanout table.

    kombu's filesystem transport unbinds only on a clean consumer cancel, so a
    killed worker's queue keeps collecting a copy of every broadcast. Returns
    the queues removed (their waiting messages are dropped too).
    """
    if not spec.is_filesystem or spec.worker_hook_dir is None:
        return []  # not the embedded broker: no folders of ours to prune
    live = {control_queue(n) for n in live_nodes}
    suffix = f".{CONTROL_EXCHANGE}"
    dead = {
        row[2]
        for row in _read_table(spec, CONTROL_EXCHANGE)
        if isinstance(row[2], str) and row[2].endswith(suffix) and row[2] not in live
    }
    if dead:
        _unbind(spec, CONTROL_EXCHANGE, dead)
        _drop_messages(spec, dead)
        log.info("pruned dead control queues %s", sorted(dead))
    return sorted(dead)


def _folder(spec: BrokerSpec, key: str) -> Path:
    value = spec.transport_options.get(key)
    if not isinstance(value, str):
        raise ValueError(f"broker spec has no {key!r} transport option")
    return Path(value)


def _exchange_file(spec: BrokerSpec, exchange: str) -> Path:
    return _folder(spec, "control_folder") / f"{exchange}.exchange"


#: How long to wait for kombu's lock on an exchange table. A worker that is
#: SIGSTOPped (hung) while holding it would otherwise block us for good.
LOCK_TIMEOUT = 0.5


@contextlib.contextmanager
def _locked(path: Path, timeout: float = LOCK_TIMEOUT) -> Iterator[IO[bytes]]:
    # the same flock kombu's filesystem transport takes on this file
    with path.open("rb+", buffering=0) as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path} stays locked by another process") from None
                time.sleep(0.01)
        try:
            yield fh
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _read_table(spec: BrokerSpec, exchange: str) -> list[list[Any]]:
    path = _exchange_file(spec, exchange)
    try:
        with _locked(path) as fh:
            rows = json.loads(fh.read() or b"[]")
    except FileNotFoundError:
        return []
    return [list(r) for r in rows]


def _unbind(spec: BrokerSpec, exchange: str, queues: Collection[str]) -> None:
    path = _exchange_file(spec, exchange)
    try:
        with _locked(path) as fh:
            rows = json.loads(fh.read() or b"[]")
            kept = [r for r in rows if r[2] not in queues]
            if len(kept) != len(rows):
                fh.seek(0)
                fh.write(json.dumps(kept).encode())
                fh.truncate()
    except FileNotFoundError:
        return


def _drop_messages(spec: BrokerSpec, queues: Collection[str]) -> int:
    wanted = {f"{q}.msg" for q in queues}
    folders = {_folder(spec, "data_folder_in"), _folder(spec, "data_folder_out")}
    removed = 0
    for folder in folders:
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            continue
        for name in names:
            # kombu's own test: everything after the first dot is "<queue>.msg"
            if name.partition(".")[2] in wanted:
                with contextlib.suppress(FileNotFoundError):
                    (folder / name).unlink()
                    removed += 1
    return removed


def remove_embedded(state_dir: str | os.PathLike[str], app: str) -> None:
    """Delete an app's embedded broker and default result store (its app is gone)."""
    root = Path(state_dir).resolve()
    shutil.rmtree(root / "broker" / "apps" / app, ignore_errors=True)
    shutil.rmtree(results_dir(state_dir, app), ignore_errors=True)


# what an app's view shows (it must not load the rest of the Celery layer) ----
