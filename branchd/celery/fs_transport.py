"""kombu's filesystem transport, made safe for branchd's side of the embedded broker.

kombu 5.7's ``filesystem`` channel writes a message by ``open(name, "wb")``,
then lock, then write; a reader lists the folder, renames the file away and
reads it without the lock. A reader that comes between the open and the
write gets an empty file: ``JSONDecodeError`` out of ``drain_events`` and a
lost message (seen in the tests: a worker's pong read empty by branchd).

branchd's connections use this subclass, which is wire-compatible with the
stock transport the workers run:

- ``_put`` writes to a name no reader matches, then renames it into place
  (atomic within a folder), so workers never see a half-written request;
- ``_get`` waits for a half-written reply (from a worker's stock ``_put``) to
  be completed: once the file is renamed away the writer still holds its
  descriptor and finishes writing into the same inode;
- ``_queue_bind`` never truncates an exchange's table: kombu's opens a new
  table with ``"wb"`` before it takes the lock, so two workers binding at
  once to a fresh exchange can erase each other's binding (a worker then
  never gets a broadcast: no ping, no shutdown); ``get_table`` takes a table
  created but not yet written as empty.

Workers on the embedded broker run this transport too (branchd's loader sets
it as ``broker_transport``).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from queue import Empty
from typing import Any

from kombu.transport import filesystem

# how long a reader waits for a writer that created a file but has not written it
HALF_WRITTEN_WAIT = 1.0


class Channel(filesystem.Channel):
    def _table_path(self, exchange: Any) -> Any:
        # kombu's own check of the name (a file of the control folder, no path tricks)
        return self._exchange_file(exchange)  # type: ignore[no-untyped-call]

    def get_table(self, exchange: Any) -> Any:
        try:
            with open(self._table_path(exchange), "rb") as fh:
                fcntl.flock(fh.fileno(), fcntl.LOCK_SH)
                raw = fh.read()
        except FileNotFoundError:
            return []
        return _table(raw)

    def _queue_bind(self, exchange: Any, routing_key: Any, pattern: Any, queue: Any) -> None:
        path = self._table_path(exchange)
        self.control_folder.mkdir(exist_ok=True)
        entry = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
        # O_CREAT without O_TRUNC: a table is never emptied by a second binder
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        with os.fdopen(fd, "rb+", buffering=0) as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            raw = fh.read()
            table = _table(raw)
            if entry not in table:
                table.insert(0, entry)
                fh.seek(0)
                fh.truncate()
                fh.write(json.dumps(table).encode())

    # kombu names the argument "message" in AbstractChannel and "payload" here
    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        final = f"{round(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        folder = self.data_folder_out
        # no dot in the temporary name: kombu's readers skip it
        tmp = os.path.join(folder, f"tmp_{uuid.uuid4().hex}")
        with open(tmp, "wb") as fh:
            fh.write(json.dumps(payload).encode())
        os.replace(tmp, os.path.join(folder, final))

    def _get(self, queue: Any, timeout: Any = None) -> Any:
        wanted = f"{queue}.msg"
        folder = self.data_folder_in
        for name in sorted(os.listdir(folder)):
            if name.partition(".")[2] != wanted:
                continue
            taken = os.path.join(folder, f"taken_{uuid.uuid4().hex}")
            try:
                os.rename(os.path.join(folder, name), taken)
            except OSError:
                continue  # another reader took it
            try:
                return json.loads(_read_complete(taken))
            finally:
                os.unlink(taken)
        raise Empty()


def _table(raw: bytes) -> list[Any]:
    """An exchange's bindings; a table created but not yet written is empty."""
    return [filesystem.exchange_queue_t(*q) for q in json.loads(raw)] if raw.strip() else []


def _read_complete(path: str) -> bytes:
    deadline = time.monotonic() + HALF_WRITTEN_WAIT
    with open(path, "rb") as fh:
        while True:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH)  # waits for a writer holding LOCK_EX
            try:
                fh.seek(0)
                data = fh.read()
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            if data or time.monotonic() > deadline:
                return data
            time.sleep(0.002)


class Transport(filesystem.Transport):
    Channel = Channel
