"""The worker-side loader's merge of branchd's queue declarations into the
app's own ``task_queues`` (it runs inside Celery workers and producers)."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery
from kombu import entity

from branchd.celery import worker_loader
from branchd.celery.worker_loader import _with_annotations, _with_queues

Queue: Any = entity.Queue
Exchange: Any = entity.Exchange
OURS = {"images": {"exchange": "media", "exchange_type": "topic", "routing_key": "image.#"}}


def test_no_queues_of_the_app_take_ours() -> None:
    assert _with_queues(None, OURS) == OURS
    assert _with_queues((), OURS) == OURS


def test_a_dict_of_the_app_keeps_its_own_and_ours_win_by_name() -> None:
    theirs = {"mail": {"exchange": "mail"}, "images": {"exchange": "old"}}
    assert _with_queues(theirs, OURS) == {"mail": {"exchange": "mail"}, **OURS}


def test_a_list_of_the_app_gets_kombu_queues_of_ours() -> None:
    theirs = [Queue("mail", Exchange("mail"), routing_key="mail"), Queue("images")]
    merged = _with_queues(theirs, OURS)
    assert [q.name for q in merged] == ["mail", "images"]
    images = merged[1]
    assert (images.exchange.name, images.exchange.type, images.routing_key) == (
        "media",
        "topic",
        "image.#",
    )


def test_on_the_embedded_broker_workers_get_the_safe_transport(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(worker_loader.ENV, '{"data_folder_in": "/x"}')
    app = Celery("t", loader=worker_loader.Loader)
    app.loader._merge()
    assert app.conf.broker_transport == "branchd_fs_transport:Transport"
    assert app.conf.broker_transport_options["data_folder_in"] == "/x"
    monkeypatch.delenv(worker_loader.ENV)
    plain = Celery("u", loader=worker_loader.Loader)
    plain.loader._merge()
    assert plain.conf.broker_transport is None  # other brokers keep kombu's own


def test_per_task_limits_go_after_the_apps_own_annotations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ours = {"testapp.add": {"rate_limit": "300/m", "time_limit": 5}}
    assert _with_annotations(None, ours) == ours
    theirs = {"testapp.add": {"rate_limit": "1/s", "acks_late": True}}
    assert _with_annotations(theirs, ours) == {
        "testapp.add": {"rate_limit": "300/m", "time_limit": 5, "acks_late": True}
    }
    assert _with_annotations([{"a": {}}], ours) == [{"a": {}}, ours]
    assert _with_annotations("mod.Annotations", ours) == ["mod.Annotations", ours]
    # a worker's task has them once the app is configured
    monkeypatch.setenv(worker_loader.ANNOTATIONS_ENV, '{"t.x": {"time_limit": 7}}')
    app = Celery("v", loader=worker_loader.Loader, set_as_current=False)

    @app.task(name="t.x")  # type: ignore[untyped-decorator]
    def x() -> None: ...

    assert app.tasks["t.x"].time_limit == 7


class Consumer:
    """What ``_schedule_bucket_request`` uses of Celery's consumer: its timer
    (kept here, fired by the test) and its pool (a list)."""

    def __init__(self, schedule: Any) -> None:
        self.timers: list[tuple[Any, tuple[Any, ...]]] = []
        self.moved: list[int] = []
        self._limit_order = 0
        self.timer = self
        self._schedule = schedule

    def call_after(self, secs: float, fun: Any, args: tuple[Any, ...] = (), **_: Any) -> None:
        self.timers.append((fun, args))

    def _limit_move_to_pool(self, request: int) -> None:
        self.moved.append(request)

    def _schedule_bucket_request(self, bucket: Any) -> None:
        self._schedule(self, bucket)


def _backlog(consumer: Consumer, n: int) -> Any:
    from kombu.utils.limits import TokenBucket

    bucket = TokenBucket(0.001)  # (one token now, the next in ~17 min: none comes here)
    for i in range(n):
        bucket.add((i, 1))
        consumer._schedule_bucket_request(bucket)
    return bucket


def test_a_backlog_of_rate_limited_requests_keeps_one_timer_per_bucket() -> None:
    from celery.worker.consumer.consumer import Consumer as CeleryConsumer

    # Celery's own: a timer for each request that found no token (why a
    # backlog outgrows the hub's 10 timers a turn)
    theirs = Consumer(CeleryConsumer._schedule_bucket_request)
    _backlog(theirs, 50)
    assert theirs.moved == [0] and len(theirs.timers) == 49
    ours = Consumer(worker_loader._schedule_bucket_request)
    bucket = _backlog(ours, 50)
    assert ours.moved == [0] and len(ours.timers) == 1
    for want in range(1, 4):  # each firing: one request on, one timer for the next
        fun, args = ours.timers.pop()
        bucket._tokens = 1.0
        fun(*args)
        assert ours.moved == list(range(want + 1)) and len(ours.timers) == 1
    bucket.contents.clear()
    fun, args = ours.timers.pop()
    fun(*args)  # (nothing left: no timer)
    assert ours.timers == []
    bucket.add((99, 1))
    ours._schedule_bucket_request(bucket)  # a new request waits on a new timer
    assert len(ours.timers) == 1


def test_the_worker_gets_one_timer_per_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    from celery.worker.consumer import consumer

    monkeypatch.setattr(consumer.Consumer, "_schedule_bucket_request", None)
    assert worker_loader.one_timer_per_bucket()
    assert consumer.Consumer._schedule_bucket_request is worker_loader._schedule_bucket_request
