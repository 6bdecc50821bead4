"""Pure helpers of the Celery kind: what stats and settings say."""

from __future__ import annotations

from typing import Any

import pytest

from branchd.celery.broker import BrokerSpec
from branchd.celery.ops import pool_size, producer_config, producer_env
from branchd.model import Queue


@pytest.mark.parametrize(
    ("stats", "size"),
    [
        (None, None),
        ({}, None),
        # prefork under autoscale: max-concurrency is the size at start, stale
        ({"pool": {"max-concurrency": 1, "processes": [1, 2, 3]}, "autoscaler": {"current": 3}}, 3),
        ({"pool": {"max-concurrency": 4, "threads": 2}}, 2),
        ({"pool": {"max-concurrency": 1}, "autoscaler": {"current": 5}}, 5),
        ({"pool": {"max-concurrency": 1}}, 1),  # solo
        ({"pool": "odd"}, None),
    ],
)
def test_pool_size(stats: dict[str, Any] | None, size: int | None) -> None:
    assert pool_size(stats) == size


def test_producer_config_of_a_plain_broker() -> None:
    config = producer_config(BrokerSpec("amqp://h//"), None, {})
    assert config == {"broker_url": "amqp://h//"}
    assert producer_env(BrokerSpec("amqp://h//"), None) == {"CELERY_BROKER_URL": "amqp://h//"}


def test_producer_config_has_queues_in_celerys_dict_form() -> None:
    decls = {
        "images": Queue("shop", "images", "media", "topic", "image.#", {"durable": False}),
        "plain": Queue("shop", "plain"),
    }
    config = producer_config(BrokerSpec("redis://h/1"), "redis://h/2", decls)
    assert config == {
        "broker_url": "redis://h/1",
        "result_backend": "redis://h/2",
        "task_queues": {
            "images": {
                "exchange": "media",
                "exchange_type": "topic",
                "routing_key": "image.#",
                "durable": False,
            },
            "plain": {"exchange": "plain", "exchange_type": "direct", "routing_key": "plain"},
        },
    }
    assert producer_env(BrokerSpec("redis://h/1"), "redis://h/2") == {
        "CELERY_BROKER_URL": "redis://h/1",
        "CELERY_RESULT_BACKEND": "redis://h/2",
    }
