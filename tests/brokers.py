"""The real brokers the tests use, the rule for a missing one (skip locally,
fail under CI=true: CI must never skip a broker test silently), and the
cleanup that leaves nothing of ours on them.

The brokers are shared with other programs (and other test runs), so:

- Redis: the suite uses a database of its own (13), never 0. Tests delete
  what they can name; whatever else lands there (kombu's binding sets, lists
  of queues whose names a test never learns) goes with a FLUSHDB when the
  last test session on this machine ends (:func:`redis_db_session`): the
  database is the suite's alone, so that deletes nothing of anyone else's.
- RabbitMQ has no private corner on a shared vhost: a test deletes the
  queues and exchanges it named (:func:`delete_amqp`). Celery's shared names
  (the ``celery`` default queue and exchange) are deleted only if unused and
  empty, so that a concurrent run is never robbed of its queue.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import connection as kombu_connection

AMQP_URL = os.environ.get("BRANCHD_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
#: db 13: the suite's own database (see the module docstring); never 0.
REDIS_URL = os.environ.get("BRANCHD_TEST_REDIS", "redis://127.0.0.1:6379/13")
Connection: Any = kombu_connection.Connection  # kombu is only partly annotated

#: Celery's default queue and exchange: shared names, deleted only if unused and empty.
CELERY_DEFAULT = "celery"
#: Held shared by every running test session; the last one out flushes the Redis db.
_SESSION_LOCK = Path(tempfile.gettempdir()) / "branchd-tests-redis-db.lock"


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


def delete_amqp(url: str, queues: Iterable[str] = (), exchanges: Iterable[str] = ()) -> None:
    """Delete the named queues and exchanges on a RabbitMQ broker (missing ones are fine)."""
    conn: Any = Connection(url, connect_timeout=2)
    try:
        channel = conn.channel()
        for kind, name in [("queue", q) for q in queues] + [("exchange", e) for e in exchanges]:
            shared = name == CELERY_DEFAULT
            try:
                if kind == "queue":
                    channel.queue_delete(name, if_unused=shared, if_empty=shared)
                else:
                    channel.exchange_delete(name, if_unused=shared)
            except Exception:
                # a refused delete (in use) closes the channel: go on with a new one
                with contextlib.suppress(Exception):
                    channel.close()
                channel = conn.channel()
    except Exception:
        pass  # the broker is gone: nothing to clean that we can reach
    finally:
        conn.release()


def flush_redis_db(url: str = REDIS_URL) -> None:
    """FLUSHDB of the suite's Redis database (refused for db 0, anyone's default)."""
    client: Any = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=5)
    db = client.connection_pool.connection_kwargs.get("db", 0)
    if int(db) == 0:
        raise ValueError(f"{url}: the tests never flush Redis db 0")
    try:
        client.flushdb()
    except redis.exceptions.ConnectionError:
        pass  # no Redis, nothing to clean
    finally:
        client.close()


@contextlib.contextmanager
def redis_db_session() -> Iterator[None]:
    """Around a whole test session: the last session to end empties the Redis db.

    Each session holds a shared lock; at its end it asks for the exclusive
    lock without waiting, which it gets only if no other session runs (one
    still running will flush when it ends). A session that starts meanwhile
    waits for the flush to finish.
    """
    with open(_SESSION_LOCK, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_SH)
        try:
            yield
        finally:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            else:
                flush_redis_db()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a broker of a test's own)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_redis(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    """A redis-server of the test's own on ``port`` (nothing kept on disk),
    once it accepts connections; AssertionError if it does not within 10 s."""
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1"]
    argv += ["--save", "", "--appendonly", "no", "--dir", str(workdir)]
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return proc
        time.sleep(0.05)
    end_process(proc)
    raise AssertionError("redis-server did not start")


def end_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process a test started (if it still runs) and reap it."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


class OwnRedis:
    """A redis-server of one test's own, on a free port, that the test may
    stop and start again on the same port (a broker restart); every server
    it started is ended by :meth:`close` (the ``own_redis`` fixture's)."""

    def __init__(self, workdir: Path) -> None:
        import shutil

        if shutil.which("redis-server") is None:
            unreachable("redis-server (binary)")
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._servers = [start_redis(self.port, workdir)]

    def stop(self, *, kill: bool = True) -> None:
        """The server goes: SIGKILL (by its pid), or a clean SIGTERM."""
        server = self._servers[-1]
        if kill:
            end_process(server)
        else:
            server.terminate()
            server.wait(10)

    def start(self) -> None:
        """A new server on the same port (empty: nothing was kept on disk)."""
        self._servers.append(start_redis(self.port, self.workdir))

    def close(self) -> None:
        for server in self._servers:
            end_process(server)

