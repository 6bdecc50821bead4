"""What branchd's own modules cost a daemon at import (issue 10, part 9).

One fresh interpreter imports what any branch loads anyway (aiohttp's server,
asyncio, sqlite3, psutil, json, argparse, logging, subprocess; aiohttp's
client side deferred as ``branchd/__main__.py`` does), then ``branchd.daemon``,
and prints the resident memory the second import added (psutil) and how many
of branchd's modules it loaded. Deterministic to about 0.01 MiB for the same
checkout: run it with the bytecode cached, as the daemon runs,

    .venv/bin/python -m compileall -q branchd clients
    env -u PYTHONDONTWRITEBYTECODE .venv/bin/python bench/import_rss.py

The daemon's own figure at 200 instances is bench/supervisor_compare.py's RSS row.
"""

from __future__ import annotations

import os
import sys

# as branchd/__main__.py sets it, before aiohttp imports frozenlist
os.environ.setdefault("FROZENLIST_NO_EXTENSIONS", "1")

import psutil

from branchd import lazy_aiohttp


def main() -> None:
    lazy_aiohttp.install()
    import argparse  # noqa: F401
    import asyncio  # noqa: F401
    import json  # noqa: F401
    import logging  # noqa: F401
    import sqlite3  # noqa: F401
    import subprocess  # noqa: F401

    import aiohttp.web  # noqa: F401

    me = psutil.Process()
    before = me.memory_info().rss
    import branchd.daemon  # noqa: F401

    added = (me.memory_info().rss - before) / 2**20
    ours = sorted(m for m in sys.modules if m == "branchd" or m.startswith("branchd."))
    print(f"branchd's import: {added:.2f} MiB, {len(ours)} modules")
    if "-v" in sys.argv[1:]:
        print("\n".join(ours))


if __name__ == "__main__":
    main()
