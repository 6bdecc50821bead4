"""A process that crashes at start says why: the last line of its stderr is in
its ``reason`` (issue 12, item 5), for plain processes and Celery workers."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tests.conftest import Branchd, wait_for

ROOT = Path(__file__).resolve().parents[2]


def _failed(b: Branchd, app: str, name: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        inst = b.instance(app, name)
        return inst if inst["state"] in ("backoff", "fatal") and inst["reason"] else None

    return wait_for(check, 30)  # type: ignore[no-any-return]


def test_a_plain_process_that_fails_at_start_gives_its_last_stderr_line(branchd: Branchd) -> None:
    branchd.ok("PUT", "/v1/apps/web", {}, 201)
    code = (
        "import sys; print('starting'); "
        "sys.stderr.write('error: --port needs a number\\n\\n'); sys.exit(2)"
    )
    body = {"name": "bad", "command": [sys.executable, "-c", code], "startsecs": 5}
    branchd.ok("POST", "/v1/apps/web/instances", body, 201)
    inst = _failed(branchd, "web", "bad")
    assert inst["reason"].startswith("exited too quickly (code 2): error: --port needs a number"), (
        inst["reason"]
    )


def test_a_celery_worker_whose_module_does_not_import_says_so(branchd: Branchd) -> None:
    branchd.ok(
        "PUT",
        "/v1/apps/shop",
        {"celery_app": "shop.tasks", "pool": "solo", "env": {"PYTHONPATH": str(ROOT)}},
        201,
    )
    branchd.ok("POST", "/v1/apps/shop/instances", {"name": "w1", "kind": "celery"}, 201)
    inst = _failed(branchd, "shop", "w1")
    assert inst["reason"].startswith(
        "exited too quickly (code 2): ModuleNotFoundError: No module named 'shop'"
    ), inst["reason"]
