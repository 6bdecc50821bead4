"""branchctl logs: tail and follow an instance's output."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from contextlib import closing

import click

from branchctl.cli.common import (
    Options,
)
from branchctl.cli.root import main

# -- logs -------------------------------------------------------------------


def _exit_quietly(signum: int, frame: object) -> None:
    with contextlib.suppress(OSError):
        sys.stdout.flush()
    os._exit(0)


@main.command()
@click.argument("app")
@click.argument("name", required=False)
@click.option(
    "-n", "--lines", type=click.IntRange(min=0), default=50, show_default=True, help="Last lines."
)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output until Ctrl-C.")
@click.option("--stderr", is_flag=True, help="The stderr log instead of stdout.")
def logs(
    opts: Options, app: str, name: str | None, lines: int, follow: bool, stderr: bool
) -> None:
    """Print the log of instance NAME of APP (plain text, even with --json).

    `branchctl logs reopen`: the branch reopens its instances' log files by
    path, after an external logrotate moved them.
    """
    if name is None:
        if app != "reopen":
            raise click.UsageError("missing argument NAME (or: branchctl logs reopen)")
        with opts.client() as c:
            count = c.reopen_logs()
        click.echo(f"reopened {count} log files")
        return
    stream = "stderr" if stderr else "stdout"
    try:
        with opts.client() as c:
            if not follow:
                click.echo(c.logs(app, name, stream, lines), nl=False)
                return
            # Ctrl-C ends a follow, whatever the event loop is doing at that
            # moment: a KeyboardInterrupt raised inside asyncio's machinery can
            # leave the loop unable to close (seen as a hang under load).
            main_thread = threading.current_thread() is threading.main_thread()
            previous = signal.signal(signal.SIGINT, _exit_quietly) if main_thread else None
            try:
                with closing(c.follow_logs(app, name, stream, lines)) as chunks:
                    for chunk in chunks:
                        click.echo(chunk, nl=False)
            finally:
                if main_thread:
                    signal.signal(signal.SIGINT, previous)
    except BrokenPipeError:  # e.g. '| head': stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
