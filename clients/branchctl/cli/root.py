"""The root group (global options) and the daemon's own commands: ping,
branch, branches, daemon exit."""

from __future__ import annotations

import os
import time
from pathlib import Path

import click

from branchctl import render
from branchctl.cli.common import (
    JSON_HELP,
    Failed,
    Options,
    _emit,
    _items,
    _Root,
)
from branchctl.client import DEFAULT_URL, find_token, find_url
from branchctl.models import Branch

# -- root -------------------------------------------------------------------


@click.group(cls=_Root)
@click.option(
    "--url",
    envvar="BRANCHD_URL",
    show_envvar=True,
    help="The daemon's base URL [default: the one the daemon wrote in its state dir, "
    "$BRANCHD_STATE_DIR/branchd.url or ~/.local/state/branchd/branchd.url, "
    f"else {DEFAULT_URL}].",
)
@click.option(
    "--token",
    envvar="BRANCHD_TOKEN",
    show_envvar=True,
    help="Bearer token of the branch [default: the local daemon's, read from "
    "its state dir's token file when this user can read it].",
)
@click.option(
    "--token-file",
    envvar="BRANCHD_TOKEN_FILE",
    show_envvar=True,
    type=click.Path(dir_okay=False),
    help="File holding the bearer token (keeps it off the command line).",
)
@click.option(
    "--timeout",
    envvar="BRANCHD_TIMEOUT",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    show_envvar=True,
    help="Seconds to wait for an answer.",
)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.pass_context
def main(
    ctx: click.Context,
    url: str | None,
    token: str | None,
    token_file: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Control a branchd daemon: its apps, their instances, their logs.

    Without --url or BRANCHD_URL it finds a local daemon (any --bind, port
    0 too) by the branchd.url file the daemon writes in its state dir.

    For Celery: apps carry the broker and worker settings, 'queues' declares
    an app's queues, 'consumers' and 'autoscale' change a running worker.
    """
    found: Path | None = None
    if not url:
        url, found = find_url(os.environ)
    if not token and token_file:
        token = _read_token(token_file)
    if not token:
        token = find_token({k: v for k, v in os.environ.items() if k != "BRANCHD_TOKEN_FILE"}, url)
    ctx.obj = Options(
        url=url,
        token=token or None,
        timeout=timeout,
        json=as_json,
        url_file=None if found is None else str(found),
    )


def _read_token(path: str) -> str:
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8", errors="replace").strip()
    except OSError as exc:
        raise click.BadParameter(
            f"cannot read {path}: {exc.strerror}", param_hint="--token-file"
        ) from None
    if not text:
        raise click.BadParameter(f"{path} is empty", param_hint="--token-file")
    return text


@main.command()
def ping(opts: Options) -> None:
    """Check that the daemon answers."""
    with opts.client() as c:
        ok = c.ping()
    if not ok:
        raise Failed(f"bad_response: {opts.url} answered the ping without ok")
    _emit(opts, {"ok": ok}, "ok")


def _branch_text(b: Branch) -> str:
    cap = b.capacity
    uptime = None if b.started_at is None else max(0.0, time.time() - b.started_at)
    return render.record(
        {
            "id": b.id,
            "hostname": b.hostname,
            "address": b.address,
            "version": b.version,
            "started": f"{render.timestamp(b.started_at)} (up {render.duration(uptime)})",
            "cpus": cap.cpus,
            "load": " ".join(f"{x:.2f}" for x in cap.load) or None,
            "memory": f"{render.size(cap.memory_free)} free of {render.size(cap.memory_total)}",
            "instances": cap.instances,
        }
    )


@main.command()
def branch(opts: Options) -> None:
    """Show this branch (the daemon answering)."""
    with opts.client() as c:
        b = c.branch()
    _emit(opts, b.raw, _branch_text(b))


@main.command()
def branches(opts: Options) -> None:
    """List the branches this daemon knows."""
    with opts.client() as c:
        bs = c.branches()
    rows = [
        (
            b.id,
            b.hostname,
            b.address,
            b.version,
            b.capacity.instances,
            f"{b.capacity.load[0]:.2f}" if b.capacity.load else None,
        )
        for b in bs
    ]
    _emit(
        opts,
        _items(bs),
        render.table(("ID", "HOSTNAME", "ADDRESS", "VERSION", "INST", "LOAD"), rows),
    )


@main.group()
def daemon() -> None:
    """The daemon itself."""


@daemon.command("exit")
@click.option(
    "--keep",
    is_flag=True,
    help="Leave every instance running; the next branchd on this state dir adopts them "
    "(an upgrade). Without it, every instance is stopped first.",
)
def daemon_exit(opts: Options, keep: bool) -> None:
    """Make the daemon exit (like SIGTERM, or SIGUSR2 with --keep)."""
    with opts.client() as c:
        c.exit_daemon(keep)
    _emit(
        opts,
        {"exiting": True, "keep": keep},
        "branchd exits; its instances keep running"
        if keep
        else "branchd stops its instances, then exits",
    )
