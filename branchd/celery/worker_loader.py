"""Celery loader that runs inside a worker process, never inside branchd.

branchd starts workers as ``celery -A <user's module> worker -b <url> ...`` and
must not replace the user's configuration, yet kombu's filesystem transport
takes its folders only from ``broker_transport_options`` (a query string on
the broker URL makes kombu raise ``TypeError``; Celery reads no environment
variable for transport options). Celery does honour ``CELERY_LOADER`` ahead of
the app's own loader class, so :func:`branchd.celery.broker.worker_env` points
it at a copy of this file and puts the options in
``BRANCHD_BROKER_TRANSPORT_OPTIONS`` (JSON). The options are merged over the
app's own ``broker_transport_options`` as soon as the app is configured, before
any broker connection: so the same environment serves ``celery worker`` and
every other ``celery`` command (``inspect``, ``call``, ``control``...), which
never run ``on_worker_init``. ``BRANCHD_TASK_QUEUES`` likewise adds the
declared bindings of the worker's queues to ``task_queues``, so that ``-Q``
starts consuming each queue with its declared exchange and routing key.
``BRANCHD_TASK_ANNOTATIONS`` adds branchd's per-task limits (rate and time
limits) to ``task_annotations``: Celery 5.7 builds each task's request class
with the task's time limits when the consumer starts, so a remote
``time_limit`` sent afterwards only changes the task's attribute; limits
given as annotations are in force from the first task.

This module is copied, not imported, by branchd: the daemon never imports
Celery, and the worker's interpreter need not have branchd installed.
"""

from __future__ import annotations

import json
import os
from typing import Any

from celery.loaders.app import AppLoader
from kombu import entity as _entity

Queue: Any = _entity.Queue  # kombu is only partly annotated

ENV = "BRANCHD_BROKER_TRANSPORT_OPTIONS"
#: Queue declarations (Celery's dict form): the worker's ``-Q`` names then come
#: with their declared exchange and routing key from the start.
QUEUES_ENV = "BRANCHD_TASK_QUEUES"
ANNOTATIONS_ENV = "BRANCHD_TASK_ANNOTATIONS"
TRANSPORT = "branchd_fs_transport:Transport"


def _with_annotations(current: Any, ours: dict[str, dict[str, Any]]) -> Any:
    """The app's own ``task_annotations`` with branchd's after them (Celery
    applies annotations in order: the later win)."""
    if not current:
        return ours
    if isinstance(current, dict):
        merged = dict(current)
        for name, attrs in ours.items():
            merged[name] = {**(current.get(name) or {}), **attrs}
        return merged
    if isinstance(current, list | tuple):
        return [*current, ours]
    return [current, ours]


def _with_queues(current: Any, ours: dict[str, dict[str, Any]]) -> Any:
    """The app's own ``task_queues`` plus branchd's declarations (ours win by name)."""
    if not current:
        return ours
    if isinstance(current, dict):
        return {**current, **ours}
    kept = [q for q in current if getattr(q, "name", None) not in ours]
    return [*kept, *(Queue.from_dict(name, **options) for name, options in ours.items())]


class Loader(AppLoader):  # type: ignore[misc]
    def __init__(self, app: Any, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        # The app creates its loader while it configures itself (``configured``
        # is already true then, ``conf`` not yet usable): merge once it is done.
        app.on_after_configure.connect(self._on_configured, weak=False)

    def _on_configured(self, *args: Any, **kwargs: Any) -> None:
        self._merge()

    def _merge(self) -> None:
        conf = self.app.conf
        raw = os.environ.get(ENV)
        if raw:
            ours = json.loads(raw)
            conf.broker_transport_options = {**(conf.broker_transport_options or {}), **ours}
            # The embedded broker, read and written safely: kombu 5.7's own
            # filesystem channel can hand a reader a message before it is
            # written (an empty file: JSONDecodeError, the worker dies, the
            # task is lost). branchd copies its transport beside this file.
            conf.broker_transport = TRANSPORT
        raw = os.environ.get(QUEUES_ENV)
        if raw:
            conf.task_queues = _with_queues(conf.task_queues, json.loads(raw))
        raw = os.environ.get(ANNOTATIONS_ENV)
        if raw:
            conf.task_annotations = _with_annotations(conf.task_annotations, json.loads(raw))

    def on_worker_init(self) -> None:
        self._merge()  # idempotent: the options win even if changed since
        super().on_worker_init()
