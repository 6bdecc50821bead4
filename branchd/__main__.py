"""``branchd``: the daemon's entry point."""

from __future__ import annotations


def main() -> None:
    from branchd.daemon import cli

    cli()


if __name__ == "__main__":
    main()
