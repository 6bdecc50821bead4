"""The argv of a Celery worker: pure, no shell, ever.

Celery 5 parses ``-A``/``-b`` as options of the ``celery`` group, so they must
come before the ``worker`` subcommand (``celery worker -A app`` is an error
since 5.0); the rest are options of ``worker``.
"""

from __future__ import annotations

from collections.abc import Sequence

from branchd.errors import Invalid
from branchd.model import Limits


def worker_argv(
    python: str,
    celery_app: str,
    node: str,
    broker_url: str | None,
    queues: Sequence[str],
    autoscale: tuple[int, int] | None,
    concurrency: int | None,
    pool: str,
    loglevel: str,
    extra: Sequence[str],
    without_mingle_gossip: bool = True,
    result_backend: str | None = None,
    limits: Limits | None = None,
) -> list[str]:
    """``[python, -m, celery, -A, app, [-b, url,] [--result-backend, url,] worker, -n, node, ...]``.

    branchd passes no URL (``broker_url=None``): it hands them to the worker in
    its environment, where other users cannot read them.

    ``autoscale`` is ``(max, min)`` in Celery's order; it wins over
    ``concurrency`` (runtime concurrency changes need ``--autoscale`` from the
    start). Mingle and gossip are off by default: branchd does not use them
    and mingle alone adds a fixed second to every start.
    """
    if not celery_app:
        raise Invalid("celery app module is empty")
    if "@" not in node or node.startswith("@") or node.endswith("@"):
        raise Invalid(f"node name {node!r} is not name@host")
    bad = [q for q in queues if not q or "," in q or q != q.strip()]
    if bad:
        raise Invalid(f"bad queue names: {bad!r}")
    argv = [python, "-m", "celery", "-A", celery_app]
    if broker_url:
        argv += ["-b", broker_url]
    if result_backend:
        argv += ["--result-backend", result_backend]
    argv += ["worker", "-n", node]
    if queues:
        argv += ["-Q", ",".join(queues)]
    if autoscale is not None:
        high, low = autoscale
        if low < 0 or high < 1 or low > high:
            raise Invalid(f"autoscale max,min must satisfy max >= min >= 0: {autoscale!r}")
        argv.append(f"--autoscale={high},{low}")
    elif concurrency is not None:
        if concurrency < 1:
            raise Invalid(f"concurrency must be at least 1: {concurrency!r}")
        argv.append(f"--concurrency={concurrency}")
    argv += [f"--pool={pool}", f"--loglevel={loglevel}"]
    if without_mingle_gossip:
        argv += ["--without-mingle", "--without-gossip"]
    argv += limit_flags(limits or Limits())
    argv += list(extra)  # (last: a user's own flag wins over ours)
    return argv


def _seconds(value: float) -> str:
    return f"{value:g}"


def limit_flags(limits: Limits) -> list[str]:
    """The worker flags of a worker's limits (per-task ones go by remote
    control, see ``limits.drift``). ``--max-memory-per-child`` takes KiB."""
    out: list[str] = []
    if limits.time_limit is not None:
        out.append(f"--time-limit={_seconds(limits.time_limit)}")
    if limits.soft_time_limit is not None:
        out.append(f"--soft-time-limit={_seconds(limits.soft_time_limit)}")
    if limits.max_tasks_per_child is not None:
        out.append(f"--max-tasks-per-child={limits.max_tasks_per_child}")
    if limits.max_memory_per_child is not None:
        # (rounded up: a limit of 1,500 bytes must not become 1 KiB's worth less)
        out.append(f"--max-memory-per-child={-(-limits.max_memory_per_child // 1024)}")
    if limits.prefetch_multiplier is not None:
        out.append(f"--prefetch-multiplier={limits.prefetch_multiplier}")
    if limits.disable_prefetch:
        out.append("--disable-prefetch")
    return out
