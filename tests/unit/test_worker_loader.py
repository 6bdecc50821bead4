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
