"""branchctl events: follow the cluster's event stream."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from contextlib import closing
from typing import Any

import click

from branchctl.cli.common import Options
from branchctl.cli.root import main

#: What `events --types` takes (the daemon checks them too).
TYPES = ("instance", "instance_added", "instance_removed", "runtime", "declaration", "member")
#: The exit code of a follow ended by Ctrl-C (128 + SIGINT, as shells say it).
EXIT_INTERRUPTED = 130


def event_text(e: dict[str, Any]) -> str:
    """One event as one line: when, where, what."""
    when = time.strftime("%H:%M:%S", time.localtime(e["time"])) if "time" in e else "--:--:--"
    where = str(e.get("branch", ""))[:8]
    kind = e.get("type", "?")
    subject = f"{e['app']}/{e['name']}" if "app" in e and "name" in e else ""
    match kind:
        case "instance":
            pid = f" pid {e['pid']}" if e.get("pid") else ""
            why = f" ({e['reason']})" if e.get("reason") else ""
            what = f"{subject} {e.get('state')}{pid}{why}"
        case "runtime":
            what = f"{subject} {e.get('what')} changed"
        case "declaration":
            name = e.get("name") if e.get("kind") == "queue" else ""
            what = f"{e.get('kind')} {e.get('app')}{'/' + str(name) if name else ''}"
            what += " deleted" if e.get("deleted") else " changed"
        case "member":
            what = f"{e.get('id')} {e.get('state')}" + (" (forgotten)" if e.get("reaped") else "")
        case "gap":
            missed = e.get("missed")
            what = f"{'some' if missed is None else missed} events missed: {e.get('reason')}"
        case "unreachable":
            what = f"branch {e.get('branch')} left the stream: {e.get('reason')}"
        case _:
            what = subject
    return f"{when} {where:8} {kind:16} {what}".rstrip()


def _interrupted(signum: int, frame: object) -> None:
    with contextlib.suppress(OSError):
        sys.stdout.flush()
    os._exit(EXIT_INTERRUPTED)


@main.command()
@click.option("--app", help="Only this app's events.")
@click.option(
    "--types",
    help=f"Only these types, comma-separated: {', '.join(TYPES)}.",
)
@click.option("--since", "last_id", help="Resume after this event id (an id --json showed).")
def events(opts: Options, app: str | None, types: str | None, last_id: str | None) -> None:
    """Follow the cluster's events (state changes with their reason,
    consumers and autoscale, declarations, members) until Ctrl-C (exit 130).

    With --json, one JSON object a line, with its id for --since.
    """
    wanted = [t.strip() for t in types.split(",") if t.strip()] if types else None
    bad = sorted(set(wanted or ()) - set(TYPES))
    if bad:
        raise click.UsageError(f"unknown event type {', '.join(bad)}: one of {', '.join(TYPES)}")
    main_thread = threading.current_thread() is threading.main_thread()
    # Ctrl-C ends the follow whatever the loop is doing (as logs -f does)
    previous = signal.signal(signal.SIGINT, _interrupted) if main_thread else None
    try:
        with opts.client() as c, closing(c.events(app, wanted, last_id)) as stream:
            for e in stream:
                click.echo(json.dumps(e) if opts.json else event_text(e))
    except BrokenPipeError:  # e.g. '| head': stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
