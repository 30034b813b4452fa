"""Model speed on the CPU: `python -m benchmarks.model_speed [--models tiny,small] [--json F]`.

Bytes per second of the three ways the model runs, measured on the model alone (no engine):

- forward: the parallel form from an empty state, `model(tokens)` over (batch, seq) bytes;
- prefill: the parallel form carrying state, `model.prefill(tokens, state)`, in pieces of
  `prefill_chunk` as the engine runs it;
- step: the recurrent form, one byte for each of `batch` rows per call, `model.step`.

Each figure is the median of --repeats timed runs after --warmup untimed ones, under
torch.no_grad, with torch's default thread count. Random weights: speed does not depend on them.
Prints a table and, with --json, writes the figures and the machine they were taken on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from model import ByteLM, ModelConfig


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
    }


def timed(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median wall seconds of fn() over `repeats` runs after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_model(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = ByteLM(ModelConfig.named(name)).eval()
    params = model.num_parameters()
    gen = torch.Generator().manual_seed(0)
    rows: list[dict[str, Any]] = []

    def record(form: str, batch: int, bytes_per_call: int, seconds: float) -> None:
        row = {
            "model": name,
            "params": params,
            "form": form,
            "batch": batch,
            "bytes_per_call": bytes_per_call,
            "ms_per_call": 1e3 * seconds,
            "bytes_per_s": bytes_per_call / seconds,
        }
        rows.append(row)
        print_row(row)

    with torch.no_grad():
        pb, seq = args.parallel_batch, args.seq
        tokens = torch.randint(0, 256, (pb, seq), generator=gen)
        record("forward", pb, pb * seq, timed(lambda: model(tokens), args.warmup, args.repeats))
        state = model.allocate_state(pb)
        record(
            "prefill",
            pb,
            pb * seq,
            timed(lambda: model.prefill(tokens, state), args.warmup, args.repeats),
        )
        for b in args.batches:
            state = model.allocate_state(b)
            byte = torch.randint(0, 256, (b,), generator=gen)

            def steps(state: dict[str, torch.Tensor] = state, byte: torch.Tensor = byte) -> None:
                for _ in range(args.steps):
                    model.step(byte, state)

            record("step", b, b * args.steps, timed(steps, args.warmup, args.repeats))
    return rows


HEADER = (
    f"{'model':<7} {'params':>11} {'form':<8} {'batch':>5} {'bytes/call':>10}"
    f" {'ms/call':>9} {'bytes/s':>11}"
)


def print_row(r: dict[str, Any]) -> None:
    print(
        f"{r['model']:<7} {r['params']:>11,} {r['form']:<8} {r['batch']:>5}"
        f" {r['bytes_per_call']:>10,} {r['ms_per_call']:>9.1f} {r['bytes_per_s']:>11,.0f}",
        flush=True,
    )


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.model_speed", description=__doc__.splitlines()[0]
    )
    p.add_argument("--models", default="tiny,small", help="comma-separated named configs")
    p.add_argument("--batches", type=parse_ints, default=[1, 64], help="rows per recurrent step")
    p.add_argument("--seq", type=int, default=1024, help="bytes per row for forward and prefill")
    p.add_argument("--parallel-batch", type=int, default=1, help="rows for forward and prefill")
    p.add_argument("--steps", type=int, default=32, help="recurrent steps per timed run")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    p.add_argument("--repeats", type=int, default=7, help="timed runs; the median is reported")
    p.add_argument("--json", type=Path, help="write the results here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    info = machine()
    started = datetime.datetime.now(datetime.UTC)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(
        f"{info['cpu']}, {info['cores']} cores,"
        f" torch {info['torch']} ({info['torch_threads']} threads)"
    )
    print(HEADER)
    t0 = time.perf_counter()
    rows = [r for name in args.models.split(",") if name for r in bench_model(name, args)]
    wall = time.perf_counter() - t0
    print(f"({wall:.0f} s)")
    if args.json:
        report = {
            "benchmark": "model_speed",
            "date": started.isoformat(timespec="seconds"),
            "command": " ".join(
                ["python -m benchmarks.model_speed", *(argv if argv is not None else sys.argv[1:])]
            ),
            "machine": info,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "settings": {
                "seq": args.seq,
                "parallel_batch": args.parallel_batch,
                "batches": args.batches,
                "steps": args.steps,
                "warmup": args.warmup,
                "repeats": args.repeats,
            },
            "wall_s": wall,
            "results": rows,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
