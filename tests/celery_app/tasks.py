"""A tiny Celery app for the integration tests: ``-A tests.celery_app.tasks``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from celery import Celery

app = Celery("testapp")
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    result_backend=None,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="testapp.add")  # type: ignore[untyped-decorator]
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="testapp.sleep")  # type: ignore[untyped-decorator]
def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@app.task(name="testapp.touch")  # type: ignore[untyped-decorator]
def touch(path: str) -> str:
    """Create ``path``: proof for a test that the task ran, without a result backend."""
    Path(path).write_text("done")
    return path


@app.task(name="testapp.tsum")  # type: ignore[untyped-decorator]
def tsum(numbers: list[int]) -> int:
    """The body of a chord: adds up what its header returned."""
    return sum(numbers)


@app.task(name="testapp.work")  # type: ignore[untyped-decorator]
def work(folder: str, key: str, seconds: float) -> str:
    """A short task that leaves ``folder/key`` once done: the side channel that
    counts the tasks of a burst (none lost, none run twice)."""
    time.sleep(seconds)
    (Path(folder) / key).touch(exist_ok=False)
    return key


@app.task(name="testapp.stamp", bind=True)  # type: ignore[untyped-decorator]
def stamp(self: Any, folder: str, key: str) -> str:
    """Leave ``folder/key`` saying when it ran (wall clock) and on which worker:
    the side channel that measures a rate limit from the tasks' own times."""
    (Path(folder) / key).write_text(f"{time.time()!r} {self.request.hostname}")
    return key
