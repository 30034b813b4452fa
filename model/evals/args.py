"""args.py: the `bwr eval` flags, apart from the runner (gateway/evals.py) so the CLI parser
imports no torch."""

from __future__ import annotations

import argparse

from memory.config import add_hierarchy_arguments
from model.evals.tasks import TASKS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", choices=sorted(TASKS))
    p.add_argument("--model", default="tiny", help="checkpoint directory or a named config")
    p.add_argument("--lengths", default="4k", help="comma-separated prompt bytes: 4k,64k,1m")
    p.add_argument("--depths", default="0.1,0.5,0.9", help="comma-separated fractions")
    p.add_argument("--n", type=int, default=10, help="cases per (length, depth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pairs", type=int, default=None, help="mqar: key-value pairs (default 16)")
    p.add_argument("--queries", type=int, default=None, help="mqar: queries a case (default 4)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument(
        "--no-memory",
        action="store_true",
        help="the ablation: memory read off (memory_capacity 0), no NATS",
    )
    p.add_argument("--nats-url", default=None, help="use this NATS server instead of starting one")
    p.add_argument("--memory-workers", type=int, default=2, help="consolidation workers")
    add_hierarchy_arguments(p)
    p.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="cases run at once, each its own session (the engine batches their steps)",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=60.0,
        help="seconds to wait for consolidation before each case's question",
    )


def task_args(args: argparse.Namespace) -> dict[str, int]:
    """The generator keywords the flags set (--pairs, --queries: MQAR's); ValueError where the
    task takes none of them."""
    given = {k: getattr(args, k) for k in ("pairs", "queries") if getattr(args, k) is not None}
    if given and args.task != "mqar":
        raise ValueError(f"--{'/--'.join(given)} apply to mqar, not {args.task}")
    for k, v in given.items():
        if v < 1:
            raise ValueError(f"--{k} {v}: want >= 1")
    return given
