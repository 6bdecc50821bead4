"""worker_argv: the exact argv of a Celery worker, checked against celery 5.7's parser."""

from __future__ import annotations

import pytest

from branchd.celery.argv import worker_argv
from branchd.errors import Invalid

BASE = dict(
    python="/venv/bin/python",
    celery_app="proj.celery",
    node="w1@host",
    broker_url="amqp://guest:guest@127.0.0.1:5672//",
    queues=["a", "b"],
    autoscale=None,
    concurrency=None,
    pool="prefork",
    loglevel="INFO",
    extra=[],
)


def argv(**changes: object) -> list[str]:
    return worker_argv(**{**BASE, **changes})  # type: ignore[arg-type]


def test_full_argv_with_autoscale() -> None:
    assert argv(autoscale=(8, 2), extra=["--max-tasks-per-child=100"]) == [
        "/venv/bin/python",
        "-m",
        "celery",
        "-A",
        "proj.celery",
        "-b",
        "amqp://guest:guest@127.0.0.1:5672//",
        "worker",
        "-n",
        "w1@host",
        "-Q",
        "a,b",
        "--autoscale=8,2",
        "--pool=prefork",
        "--loglevel=INFO",
        "--without-mingle",
        "--without-gossip",
        "--max-tasks-per-child=100",
    ]


def test_global_options_come_before_the_worker_subcommand() -> None:
    args = argv()
    assert args.index("-A") < args.index("worker") and args.index("-b") < args.index("worker")


@pytest.mark.parametrize(
    ("autoscale", "concurrency", "expected"),
    [
        ((4, 1), None, ["--autoscale=4,1"]),
        ((4, 0), 3, ["--autoscale=4,0"]),  # autoscale wins
        (None, 3, ["--concurrency=3"]),
        (None, None, []),
    ],
)
def test_concurrency_flags(
    autoscale: tuple[int, int] | None, concurrency: int | None, expected: list[str]
) -> None:
    args = argv(autoscale=autoscale, concurrency=concurrency)
    assert [a for a in args if a.startswith(("--autoscale", "--concurrency"))] == expected


def test_mingle_and_gossip_can_stay_on() -> None:
    args = argv(without_mingle_gossip=False)
    assert "--without-mingle" not in args and "--without-gossip" not in args


def test_no_queues_means_no_q_flag() -> None:
    assert "-Q" not in argv(queues=[])


def test_extra_args_are_kept_verbatim_at_the_end() -> None:
    extra = ["--hostname-is-not-parsed", "a b; rm -rf /", "$HOME"]
    assert argv(extra=extra)[-3:] == extra


@pytest.mark.parametrize(
    "changes",
    [
        {"celery_app": ""},
        {"node": "nohost"},
        {"node": "@host"},
        {"node": "w1@"},
        {"queues": ["a,b"]},
        {"queues": [""]},
        {"queues": [" a"]},
        {"autoscale": (1, 2)},
        {"autoscale": (0, 0)},
        {"autoscale": (2, -1)},
        {"concurrency": 0},
    ],
)
def test_rejects_bad_input(changes: dict[str, object]) -> None:
    with pytest.raises(Invalid):
        argv(**changes)


def test_celery_parses_it() -> None:
    """celery 5.7's own click parser accepts the argv (no worker is started)."""
    celery_bin = pytest.importorskip("celery.bin.celery")
    args = argv(autoscale=(4, 1))[3:]  # drop python -m celery
    group = celery_bin.celery
    ctx = group.make_context("celery", list(args), resilient_parsing=True)
    assert ctx.params["app"] == "proj.celery"
    assert ctx.params["broker"] == BASE["broker_url"]
    sub_name, sub, rest = group.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
    assert sub_name == "worker"
    sub_ctx = sub.make_context("worker", rest, parent=ctx, resilient_parsing=True)
    assert sub_ctx.params["hostname"] == "w1@host"
    assert sub_ctx.params["autoscale"] in ((4, 1), [4, 1], "4,1")
    assert sub_ctx.params["without_mingle"] and sub_ctx.params["without_gossip"]
