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

In a worker it also keeps Celery's rate limits to their rate under a
backlog (``_schedule_bucket_request``, installed by ``on_worker_init``):
Celery 5.7 adds a timer for a rate-limited task type each time its bucket
has no token, on every request the bucket gets and again on each of those
timers, so a backlog of N requests keeps about N timers due at once, and
kombu's hub fires at most 10 a turn, then polls with its 1 s default
timeout; past ~40 requests a worker at 1200/m ran one task a second (a
measured 60/m; the symptom of celery#5927). With one timer per bucket the
same worker keeps 1200/m.

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
        one_timer_per_bucket()
        super().on_worker_init()


def one_timer_per_bucket() -> bool:
    """Put ``_schedule_bucket_request`` in place of Celery's own (the module
    docstring says why); False if this Celery has none to replace."""
    try:
        from celery.worker.consumer.consumer import Consumer
    except ImportError:
        return False
    if not hasattr(Consumer, "_schedule_bucket_request"):
        return False
    Consumer._schedule_bucket_request = _schedule_bucket_request
    return True


#: Set on a token bucket while a timer is due to look at it again.
HELD = "_branchd_timer_due"


def _schedule_bucket_request(self: Any, bucket: Any) -> None:
    """Celery's ``Consumer._schedule_bucket_request`` (5.7), with at most one
    timer pending per bucket: move the bucket's requests to the pool while
    it has tokens, in order; the first without one waits for one timer."""
    while True:
        try:
            request, tokens = bucket.pop()
        except IndexError:
            break
        if bucket.can_consume(tokens):
            self._limit_move_to_pool(request)
            continue
        bucket.contents.appendleft((request, tokens))  # (back to the head: the order kept)
        if not getattr(bucket, HELD, False):
            setattr(bucket, HELD, True)
            pri = self._limit_order = (self._limit_order + 1) % 10
            self.timer.call_after(
                bucket.expected_time(tokens), _bucket_due, (self, bucket), priority=pri
            )
        break


def _bucket_due(consumer: Any, bucket: Any) -> None:
    setattr(bucket, HELD, False)
    consumer._schedule_bucket_request(bucket)
