"""``branchd``: the daemon's entry point."""

from __future__ import annotations

import os

# aiohttp keeps its signal lists (on_startup, on_cleanup, on_response_prepare)
# in frozenlist's FrozenList; its compiled version is C++ and maps libstdc++
# and libgcc_s into the daemon: 0.8 MiB of its resident memory for lists
# frozen at start and read once per response (issue 10, part 9). The pure
# Python FrozenList behaves the same; this is frozenlist's documented switch,
# read when it is first imported (by aiohttp, below). Instances never see it:
# they inherit only launcher.INHERITED_ENV of the daemon's environment.
os.environ.setdefault("FROZENLIST_NO_EXTENSIONS", "1")

from branchd import lazy_aiohttp

# aiohttp's client side (about 4 MiB) loads when a branch first calls another,
# not with the server (see lazy_aiohttp): before anything imports aiohttp.
lazy_aiohttp.install()

from branchd.daemon import cli  # noqa: E402 (after both)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
