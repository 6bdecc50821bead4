"""The real brokers the tests use, and the rule for a missing one: skip
locally, fail under CI=true (CI must never skip a broker test silently)."""

from __future__ import annotations

import os
from typing import Any

import pytest
from kombu import connection as kombu_connection

AMQP_URL = os.environ.get("BRANCHD_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
REDIS_URL = os.environ.get("BRANCHD_TEST_REDIS", "redis://127.0.0.1:6379/0")
Connection: Any = kombu_connection.Connection  # kombu is only partly annotated


def unreachable(what: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is unreachable in CI")
    pytest.skip(f"{what} is unreachable")


def reachable(url: str) -> bool:
    conn: Any = Connection(url, connect_timeout=2)
    try:
        conn.ensure_connection(max_retries=1, timeout=2)
        return True
    except Exception:
        return False
    finally:
        conn.release()
