"""``branchd``: the daemon's entry point."""

from __future__ import annotations

from branchd.daemon import cli


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
