"""The test app with two of the traps ``apps lint`` knows: ``-A tests.celery_app.trappy``.

acks_late without task_reject_on_worker_lost, and a time limit beyond the
Redis transport's default visibility_timeout (3,600 s).
"""

from __future__ import annotations

from tests.celery_app.tasks import app

app.conf.update(task_acks_late=True, task_time_limit=7200)

__all__ = ["app"]
