"""The root group (global options) and the daemon's own commands: ping,
branch, branches (list, show, leave), cluster keys, daemon exit."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import click

from branchctl import render
from branchctl.cli.common import (
    JSON_HELP,
    Failed,
    Options,
    _emit,
    _items,
    _ListingGroup,
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


@main.group(cls=_ListingGroup, invoke_without_command=True)
@click.pass_context
def branches(ctx: click.Context) -> None:
    """List the branches this daemon knows (bare), or show one, or leave."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(branches_list)


@branches.command("list")
def branches_list(opts: Options) -> None:
    """List the branches: their state in the cluster and their capacity."""
    with opts.client() as c:
        bs = c.branches()
    rows = [
        (
            b.id + (" *" if b.self else ""),
            b.hostname,
            b.state,
            render.duration(b.age),
            b.address,
            b.capacity.cpus,
            f"{b.capacity.load[0]:.2f}" if b.capacity.load else None,
            render.size(b.capacity.memory_free) if b.capacity.memory_free is not None else None,
            b.capacity.instances,
            b.capacity.free_slots,
            b.version,
        )
        for b in bs
    ]
    headers = ("ID", "HOST", "STATE", "AGE", "ADDRESS", "CPU", "LOAD", "FREE-MEM")
    _emit(
        opts,
        _items(bs),
        render.table((*headers, "INSTANCES", "FREE-SLOTS", "VERSION"), rows),
    )


@branches.command("show")
@click.argument("branch_id", metavar="ID", default="self")
def branches_show(opts: Options, branch_id: str) -> None:
    """One branch's whole record (ID: as listed; default self)."""
    with opts.client() as c:
        m = c.member(branch_id)
    cap = m.capacity
    _emit(
        opts,
        dict(m.raw),
        render.record(
            {
                "id": m.id + (" (this branch)" if m.self else ""),
                "state": f"{m.state} (incarnation {m.incarnation}, "
                f"for {render.duration(m.since)})",
                "hostname": m.hostname,
                "api": m.api_url,
                "gossip": m.gossip_addr,
                "version": m.version,
                "epoch": m.epoch,
                "started": render.timestamp(m.started_at),
                "record age": render.duration(m.age),
                "cpus": cap.cpus,
                "load": " ".join(f"{x:.2f}" for x in cap.load) or None,
                "memory": f"{render.size(cap.memory_free)} free of "
                f"{render.size(cap.memory_total)}",
                "instances": f"{cap.instances} of {cap.max_instances}"
                f"{', draining' if cap.draining else ''}",
                "slots": f"{cap.slots_used} of {cap.slots} taken ({cap.free_slots} free)",
                "names": (", ".join(m.instances) or "-")
                + (" (not fetched yet)" if m.instances_stale else ""),
                "counters": _gossip_text(m.gossip),
            }
        ),
    )


def _gossip_text(g: Any) -> str | None:
    if not isinstance(g, dict):
        return None
    dropped = {k: v for k, v in g.get("dropped", {}).items() if v}
    return (
        f"{g.get('datagrams_sent')} datagrams sent, {g.get('datagrams_received')} received; "
        f"dropped: {', '.join(f'{k} {v}' for k, v in sorted(dropped.items())) or 'none'}; "
        f"peer calls refused: {g.get('peer_calls_dropped')}"
    )


@branches.command("drain")
@click.argument("branch_id", metavar="ID")
@click.option(
    "--move",
    is_flag=True,
    help="And make its instances again elsewhere, one at a time (each new one "
    "running before the old one stops); waits for the move",
)
@click.option("--no-wait", is_flag=True, help="With --move: start it and say where it stands")
def branches_drain(opts: Options, branch_id: str, move: bool, no_wait: bool) -> None:
    """No new instance is placed on branch ID (id, or self); its own keep
    running, or with --move go elsewhere."""
    with opts.client() as c:
        data = c.drain(branch_id, True, move=move)
        if not move:
            _emit(opts, data, f"branch {data['id']} drains: no new instances")
            return
        said: set[str] = set()
        status = data.get("move") or {}
        while not no_wait and status.get("state") == "moving":
            _say_moves(status, said)
            time.sleep(0.5)
            status = c.drain_status(data["id"]).get("move") or {}
        _say_moves(status, said)
    data["move"] = status
    moved, failed = len(status.get("moved", ())), len(status.get("failed", ()))
    left = len(status.get("left", ()))
    text = f"branch {data['id']} drains: {moved} moved, {failed} not moved" + (
        f", {left} left ({status.get('state')})" if left else ""
    )
    _emit(opts, data, text)
    if failed:
        raise SystemExit(1)


def _say_moves(status: dict[str, Any], said: set[str]) -> None:
    """One line on stderr for each instance moved or not moved, once."""
    lines = [f"{m['instance']}: moved to {m['to']}" for m in status.get("moved", ())]
    lines += [f"{f['instance']}: not moved: {f['error']}" for f in status.get("failed", ())]
    for line in lines:
        if line not in said:
            said.add(line)
            click.echo(line, err=True)


@branches.command("undrain")
@click.argument("branch_id", metavar="ID")
def branches_undrain(opts: Options, branch_id: str) -> None:
    """Branch ID takes new instances again."""
    with opts.client() as c:
        data = c.drain(branch_id, False)
    _emit(opts, data, f"branch {data['id']} takes new instances again")


@branches.command("leave")
def branches_leave(opts: Options) -> None:
    """Make this branch leave its cluster gracefully (the others see "left")."""
    with opts.client() as c:
        c.leave()
    _emit(opts, {"left": True}, "left the cluster")


@main.group()
def cluster() -> None:
    """The cluster: its keys."""


@cluster.group()
def keys() -> None:
    """The cluster keys: list, generate, install, use, remove (cluster-wide,
    no restart). A rotation: install the new key, use it, remove the old."""


@keys.command("list")
def keys_list(opts: Options) -> None:
    """Every key by id, and how many live branches hold it and seal with it."""
    with opts.client() as c:
        data = c.cluster_keys()
    rows = [(k["id"], k["installed"], k["primary"]) for k in data["items"]]
    text = render.table(("KEY ID", "INSTALLED ON", "PRIMARY ON"), rows)
    text += f"\n{data['branches']} live branch(es) answered"
    for b, why in sorted(data.get("errors", {}).items()):
        text += f"\n{b}: {why}"
    _emit(opts, data, text)


@keys.command("generate")
def keys_generate(opts: Options) -> None:
    """Print a new random key (nothing is sent: install it next)."""
    import base64
    import secrets

    key = base64.b64encode(secrets.token_bytes(32)).decode()
    _emit(opts, {"key": key}, key)


def _step_text(data: dict[str, object]) -> str:
    answers = data["branches"]
    assert isinstance(answers, dict)
    lines = [f"{b}: {a}" for b, a in sorted(answers.items())]
    return "\n".join(lines)


def _key_step(opts: Options, data: dict[str, object]) -> None:
    answers = data["branches"]
    _emit(opts, data, _step_text(data))
    if isinstance(answers, dict) and any(a != "ok" for a in answers.values()):
        raise Failed("not every live branch took the step (see above); run it again")


@keys.command("install")
@click.argument("key")
def keys_install(opts: Options, key: str) -> None:
    """Step 1: install KEY on every live branch (each still seals with its primary)."""
    with opts.client() as c:
        data = c.install_key(key)
    _key_step(opts, data)


@keys.command("use")
@click.argument("key_id")
def keys_use(opts: Options, key_id: str) -> None:
    """Step 2: every live branch seals with KEY_ID from now on."""
    with opts.client() as c:
        data = c.use_key(key_id)
    _key_step(opts, data)


@keys.command("remove")
@click.argument("key_id")
def keys_remove(opts: Options, key_id: str) -> None:
    """Step 3: remove KEY_ID (not the primary) from every live branch."""
    with opts.client() as c:
        data = c.remove_key(key_id)
    _key_step(opts, data)


@main.group()
def daemon() -> None:
    """The daemon itself."""


def _status_text(b: Branch, url: str) -> str:
    uptime = None if b.started_at is None else max(0.0, time.time() - b.started_at)
    counts = {k: v for k, v in b.instance_states.items() if v}
    total = sum(b.instance_states.values())
    if b.cluster is None:
        cluster = "none (a branch on its own)"
    else:
        members = b.cluster.get("members") or {}
        cluster = f"{sum(members.values())} branch(es): " + ", ".join(
            f"{n} {state}" for state, n in sorted(members.items())
        )
    return render.record(
        {
            "branchd": b.version,
            "pid": b.pid,
            "uptime": f"{render.duration(uptime)} (since {render.timestamp(b.started_at)})",
            "url": b.api_url or url,
            "state dir": b.state_dir,
            "branch": f"{b.id} on {b.hostname}",
            "instances": f"{total}"
            + (": " + ", ".join(f"{n} {s}" for s, n in counts.items()) if counts else ""),
            "cluster": cluster,
            "supervision": b.supervision,
        }
    )


@daemon.command("status")
def daemon_status(opts: Options) -> None:
    """One screen about the daemon: version, pid, uptime, URL, state dir, its
    instances by state, its cluster, how it supervises."""
    with opts.client() as c:
        b = c.branch()
    _emit(opts, b.raw, _status_text(b, opts.url))


@daemon.command("exit")
@click.option(
    "--keep",
    is_flag=True,
    help="Leave every instance running; the next branchd on this state dir adopts them "
    "(an upgrade). Without it, every instance is stopped first.",
)
def daemon_exit(opts: Options, keep: bool) -> None:
    """Make the daemon exit (like SIGTERM, or SIGUSR2 with --keep).

    \b
    The upgrade, without signals:
      pip install -U branchd        # the running daemon is not touched
      branchctl daemon exit --keep  # it goes; its instances keep running
      branchd                       # (or systemd's Restart=) adopts them
    """
    with opts.client() as c:
        # (POST /v1/daemon/exit, which the daemon being upgraded, older than
        # this client maybe, already has; /v1/branch/exit?keep=1 is its twin)
        c.exit_daemon(keep)
    _emit(
        opts,
        {"exiting": True, "keep": keep},
        "branchd exits; its instances keep running"
        if keep
        else "branchd stops its instances, then exits",
    )
