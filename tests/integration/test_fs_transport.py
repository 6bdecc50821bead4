"""branchd's filesystem transport (the embedded broker, on both sides) keeps
every binding when workers bind at once to a fresh exchange: kombu 5.7's own
opens a new table with "wb" before its lock, so concurrent binders erase (or
corrupt) each other's entries, and a worker whose binding is lost never gets a
broadcast (seen in CI: two workers started together, one never answered a ping)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from kombu import connection

from branchd.celery import fs_transport

Connection: Any = connection.Connection


def _connect(opts: dict[str, str]) -> Any:
    return Connection("filesystem://", transport=fs_transport.Transport, transport_options=opts)


def _opts(root: Path) -> dict[str, str]:
    (root / "data").mkdir(parents=True)
    (root / "control").mkdir()
    return {
        "data_folder_in": str(root / "data"),
        "data_folder_out": str(root / "data"),
        "control_folder": str(root / "control"),
    }


def test_concurrent_binds_to_a_fresh_exchange_are_all_kept(tmp_path: Path) -> None:
    for trial in range(20):
        opts = _opts(tmp_path / str(trial))
        start = threading.Barrier(4)

        def bind(i: int, opts: dict[str, str] = opts, start: Any = start) -> None:
            conn = _connect(opts)
            try:
                channel = conn.channel()
                start.wait()
                channel._queue_bind("celery.pidbox", "", "", f"node{i}.celery.pidbox")
            finally:
                conn.release()

        threads = [threading.Thread(target=bind, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        conn = _connect(opts)
        try:
            queues = {q.queue for q in conn.channel().get_table("celery.pidbox")}
        finally:
            conn.release()
        assert queues == {f"node{i}.celery.pidbox" for i in range(4)}, trial


def test_a_table_created_but_not_written_is_empty(tmp_path: Path) -> None:
    opts = _opts(tmp_path)
    (tmp_path / "control" / "celery.pidbox.exchange").write_bytes(b"")
    conn = _connect(opts)
    try:
        assert conn.channel().get_table("celery.pidbox") == []
    finally:
        conn.release()
