"""branchctl queues, consumers and autoscale: an app's queue declarations and
a worker's runtime changes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import click

from branchctl import render
from branchctl.cli.common import (
    EXCHANGE_TYPES,
    Options,
    _emit,
    _items,
    _json_or_str,
    _ListingGroup,
    _pairs,
)
from branchctl.cli.root import main
from branchctl.models import Autoscale, Consumer, Queue

# -- queues -----------------------------------------------------------------


def _queue_row(q: Queue) -> tuple[Any, ...]:
    return (q.name, q.exchange, q.exchange_type, q.routing_key)


def _queue_text(q: Queue, consumers: list[dict[str, Any]] | None = None) -> str:
    fields: dict[str, Any] = {
        "app": q.app,
        "name": q.name,
        "exchange": q.exchange,
        "exchange_type": q.exchange_type,
        "routing_key": q.routing_key,
        "options": dict(q.options),
    }
    if consumers is not None:
        fields["consumed by"] = ", ".join(f"{i['name']} ({i['state']})" for i in consumers) or "-"
    return render.record(fields)


@main.group(
    cls=_ListingGroup,
    invoke_without_command=True,
    subcommand_metavar="APP | COMMAND [ARGS]...",
)
@click.pass_context
def queues(ctx: click.Context) -> None:
    """List the queues declared by an app ('queues APP'), or manage one.

    The table has the columns NAME EXCHANGE TYPE ROUTING_KEY; use
    'queues list APP' for an app named like a subcommand.
    """
    if ctx.invoked_subcommand is None:
        raise click.UsageError("give an APP: branchctl queues APP", ctx)


@queues.command("list")
@click.argument("app")
def queues_list(opts: Options, app: str) -> None:
    """List the queues declared by APP."""
    with opts.client() as c:
        items = c.queues(app)
    _emit(
        opts,
        _items(items),
        render.table(("NAME", "EXCHANGE", "TYPE", "ROUTING_KEY"), map(_queue_row, items)),
    )


@queues.command("add")
@click.argument("app")
@click.argument("name")
@click.option("--exchange", help="Exchange (default: the queue's name).")
@click.option(
    "--type", "exchange_type", type=click.Choice(EXCHANGE_TYPES), help="Exchange type (direct)."
)
@click.option("--routing-key", help="Routing key (default: the queue's name).")
@click.option(
    "--option",
    "options",
    multiple=True,
    metavar="K=V",
    help="Queue option (V parsed as JSON when it can be: durable=false, "
    "queue_arguments='{\"x-max-priority\": 10}').",
)
def queues_add(
    opts: Options,
    app: str,
    name: str,
    exchange: str | None,
    exchange_type: str | None,
    routing_key: str | None,
    options: tuple[str, ...],
) -> None:
    """Declare queue NAME of APP, or replace it (PUT: what is not given is reset).

    Example: branchctl queues add shop images --exchange media --type topic --routing-key 'image.#'
    """
    option_map = _pairs(options, "--option", _json_or_str) if options else None
    with opts.client() as c:
        queue, created = c.put_queue(app, name, exchange, exchange_type, routing_key, option_map)
    verb = "created" if created else "replaced"
    _emit(opts, queue.raw, f"{verb} queue {queue.app}/{queue.name}\n{_queue_text(queue)}")


@queues.command("show")
@click.argument("app")
@click.argument("name")
def queues_show(opts: Options, app: str, name: str) -> None:
    """Show queue NAME of APP."""
    with opts.client() as c:
        queue = c.get_queue(app, name)
        consumers = c.queue_consumers(app, name)
    _emit(opts, {**queue.raw, "consumers": consumers}, _queue_text(queue, consumers))


@queues.command("depth")
@click.argument("app")
@click.argument("queue", required=False)
def queues_depth(opts: Options, app: str, queue: str | None) -> None:
    """How deep APP's queues are (or QUEUE alone), read at once.

    APP's queues: declared, consumed by an instance, in its defaults, and
    Celery's default 'celery' (where delay() sends a task with no queue)
    when a worker consumes it or it holds messages; QUEUE may be 'celery'.

    Columns: QUEUE READY (the broker's count) IN_FLIGHT (running + reserved
    in this branch's workers; '>=N' when one did not answer in time) RUNNING
    CONSUMERS (the broker's on RabbitMQ,
    else this branch's workers). On Redis a last line gives the unacked
    messages of the whole database (kombu keeps them in one hash, not per queue).
    """
    with opts.client() as c:
        items = [c.queue_depth(app, queue)] if queue else c.app_depth(app)
    rows = [
        (
            d.queue,
            d.ready,
            f">={d.in_flight}" if d.unanswered else d.in_flight,
            d.running,
            d.consumers,
        )
        for d in items
    ]
    text = render.table(("QUEUE", "READY", "IN_FLIGHT", "RUNNING", "CONSUMERS"), rows)
    unacked = next((d.unacked for d in items if d.unacked is not None), None)
    if unacked is not None:
        text += f"\nunacked (all queues of the Redis database): {unacked}"
    silent = max((d.unanswered or 0 for d in items), default=0)
    if silent:
        text += (
            f"\n>=: {silent} worker(s) did not say in time what they hold (busy, or the "
            "broker slow): the count is at least that"
        )
    _emit(opts, {"items": [dict(d.raw) for d in items]}, text)


@queues.command("remove")
@click.argument("app")
@click.argument("name")
def queues_remove(opts: Options, app: str, name: str) -> None:
    """Remove queue NAME of APP (first cancelled on every instance of the app)."""
    with opts.client() as c:
        c.delete_queue(app, name)
    if not opts.json:
        click.echo(f"removed queue {app}/{name}")


# -- consumers --------------------------------------------------------------


def _consumers_table(items: Iterable[Consumer]) -> str:
    rows = [(x.name, x.wanted, x.declared, x.live) for x in items]
    return render.table(("QUEUE", "WANTED", "DECLARED", "LIVE"), rows)


@main.group(
    cls=_ListingGroup,
    invoke_without_command=True,
    subcommand_metavar="APP NAME | COMMAND [ARGS]...",
)
@click.pass_context
def consumers(ctx: click.Context) -> None:
    """List the queues a celery instance consumes ('consumers APP NAME'), or change them.

    The table has the columns QUEUE WANTED (declared on the instance),
    DECLARED (the app declares that queue), LIVE (the running worker consumes
    it; '-' when it is not running). Changes apply without a restart.
    """
    if ctx.invoked_subcommand is None:
        raise click.UsageError("give an APP and a NAME: branchctl consumers APP NAME", ctx)


@consumers.command("list")
@click.argument("app")
@click.argument("name")
def consumers_list(opts: Options, app: str, name: str) -> None:
    """List the queues of celery instance NAME of APP."""
    with opts.client() as c:
        items = c.consumers(app, name)
    _emit(opts, _items(items), _consumers_table(items))


@consumers.command("add")
@click.argument("app")
@click.argument("name")
@click.argument("queue")
def consumers_add(opts: Options, app: str, name: str, queue: str) -> None:
    """Make instance NAME of APP consume QUEUE (no restart); prints its queues."""
    with opts.client() as c:
        items = c.add_consumer(app, name, queue)
    _emit(opts, _items(items), _consumers_table(items))


@consumers.command("remove")
@click.argument("app")
@click.argument("name")
@click.argument("queue")
def consumers_remove(opts: Options, app: str, name: str, queue: str) -> None:
    """Make instance NAME of APP stop consuming QUEUE (no restart); prints its queues."""
    with opts.client() as c:
        items = c.remove_consumer(app, name, queue)
    _emit(opts, _items(items), _consumers_table(items))


# -- autoscale --------------------------------------------------------------


def _autoscale_text(a: Autoscale) -> str:
    live = (
        "-" if not a.live else f"{render.cell(a.live.get('min'))} {render.cell(a.live.get('max'))}"
    )
    if a.min is None or a.max is None:  # no range declared: a fixed pool size
        return f"none: fixed concurrency (live: {live})"
    return f"{a.min} {a.max} (live: {live})"


def _non_negative(value: str, what: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise click.BadParameter(f"{value!r} is not a non-negative integer", param_hint=what)
    return n


@main.command("autoscale", context_settings={"ignore_unknown_options": True})
@click.argument("app")
@click.argument("name")
@click.argument("bounds", metavar="[MIN MAX]", nargs=-1)
def autoscale_cmd(opts: Options, app: str, name: str, bounds: tuple[str, ...]) -> None:
    """Show the autoscale bounds of celery instance NAME of APP, or set them to MIN MAX.

    Prints 'MIN MAX (live: MIN MAX)', live being what the running worker
    reports ('-' when it is not running), or 'none: fixed concurrency'.
    Setting applies without a restart to a worker started with a range; a
    running worker started with a fixed concurrency refuses it (exit 1,
    restart_required, nothing changed): declare a range with 'instances
    update APP NAME --autoscale MIN,MAX' and restart it. A stopped worker
    takes the range at its next start.
    """
    if len(bounds) not in (0, 2):
        raise click.UsageError("give both MIN and MAX, or neither")
    wanted = [_non_negative(v, what) for v, what in zip(bounds, ("MIN", "MAX"), strict=False)]
    with opts.client() as c:
        a = c.set_autoscale(app, name, *wanted) if wanted else c.autoscale(app, name)
    _emit(opts, a.raw, _autoscale_text(a))
