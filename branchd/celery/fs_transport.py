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
  descriptor and finishes writing into the same inode.
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
