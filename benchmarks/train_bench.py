"""Training throughput: `python -m benchmarks.train_bench [--config base] [--grid ...] [--json F]`.

For each point of the grid (rows x seq_len x segments, gradient checkpointing on or off,
torch.compile off, of each block as the trainer does, or of the whole objective) it builds the
model, runs `TrainLoop.run_step` (the same step the trainer runs: AdamW, bf16 autocast and TF32
on a GPU, clipping) for --warmup untimed steps and
--steps timed ones on random bytes already on the device, and reports bytes/s, MFU (6 N bytes/s
over --peak-flops, N the parameters outside the embedding), step time and peak memory. The data
path (packing, the bus) is not timed: it is a small fraction of a step.

Prints a table a person can read and, with --json, writes the figures and the machine.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.delta_ops import VARIANTS
from model import ByteLM, ModelConfig, delta, hyena
from model.train import TrainConfig, TrainLoop


def point(spec: str) -> tuple[int, int, int]:
    """ "16x1024x1" -> (rows, seq_len, segments)."""
    rows, seq, segs = (int(x) for x in spec.lower().split("x"))
    return rows, seq, segs


def measure(
    config: ModelConfig,
    rows: int,
    seq: int,
    segs: int,
    *,
    checkpointing: bool,
    compile: str,
    steps: int,
    warmup: int,
    peak: float,
    device: str,
) -> dict[str, Any]:
    torch.manual_seed(0)
    model = ByteLM(config).to(device)
    cfg = TrainConfig(
        steps=1000, batch_size=rows, seq_len=seq, segments=segs, warmup=10,
        grad_checkpoint=checkpointing, peak_flops=peak,
        compile="blocks" if compile == "blocks" else "off",  # the trainer's own option
    )  # fmt: skip
    loop = TrainLoop(model, cfg)
    if compile == "on":  # the whole objective, for comparison
        loop.objective = torch.compile(loop.objective)  # type: ignore[assignment]
    g = torch.Generator(device=device).manual_seed(0)
    batches = [torch.randint(0, 256, (rows, seq + 1), generator=g, device=device) for _ in range(4)]
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_compile = time.perf_counter()
    for i in range(warmup):
        loop.run_step([batches[i % 4]])
    t_compile = time.perf_counter() - t_compile
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    losses = [loop.run_step([batches[i % 4]]) for i in range(steps)]  # each syncs on its loss
    dt = time.perf_counter() - t0
    rate = steps * rows * seq / dt
    loop.close()
    return dict(
        rows=rows, seq_len=seq, segments=segs, grad_checkpoint=checkpointing, compile=compile,
        bytes_per_s=rate, mfu=loop.flops_per_byte * rate / peak if cuda else 0.0,
        step_ms=1000 * dt / steps, warmup_s=t_compile, loss=losses[-1],
        peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        params=model.num_parameters(),
    )  # fmt: skip


def profile(config: ModelConfig, rows: int, seq: int, segs: int, device: str) -> None:
    """Where a step's device time goes: the 25 costliest operators over 3 steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.manual_seed(0)
    loop = TrainLoop(ByteLM(config).to(device), TrainConfig(batch_size=rows, seq_len=seq))
    batch = torch.randint(0, 256, (rows, seq + 1), device=device)
    for _ in range(2):
        loop.run_step([batch], segs)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch_profile(activities=acts) as prof:
        for _ in range(3):
            loop.run_step([batch], segs)
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="base")
    p.add_argument("--grid", default="16x1024x1,32x1024x1,16x2048x2", help="ROWSxSEQxSEGS,...")
    p.add_argument("--checkpointing", default="off", help="off, on, or both")
    p.add_argument(
        "--compile",
        default="off",
        help="off, on (the whole objective), blocks (each block), or a comma list of them",
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--peak-flops", type=float, default=800e12)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path)
    p.add_argument("--profile", action="store_true", help="top kernels of 3 steps, first point")
    p.add_argument(
        "--delta",
        default="loop",
        help=f"paths of the chunked delta rule to time in turn, a comma list of {', '.join(VARIANTS)}",
    )
    p.add_argument(
        "--long-conv",
        default=hyena.LONG_CONV,
        help="Hyena's long convolution paths to time in turn: fft, chunked, chunked-bf16",
    )
    p.add_argument(
        "--delta-chunk",
        default="",
        help="the delta rule's chunk lengths to time in turn (ModelConfig.delta_chunk: the same"
        " function, other work per chunk); empty: the config's",
    )
    args = p.parse_args()
    config = ModelConfig.named(args.config)
    choice = {"off": [False], "on": [True], "both": [False, True]}
    results = []
    variants = args.delta.split(",")
    if unknown := set(variants) - set(VARIANTS):
        p.error(f"unknown --delta {', '.join(sorted(unknown))}")
    if args.profile:
        with delta.switched(**VARIANTS[variants[0]]):
            profile(config, *point(args.grid.split(",")[0]), args.device)
    head = (
        f"{'rows':>5} {'seq':>6} {'segs':>4} {'ckpt':>4} {'comp':>6} {'delta':>10}"
        f" {'long conv':>12} {'chunk':>5} {'bytes/s':>12}"
    )
    print(head + f" {'MFU':>6} {'step ms':>8} {'mem GB':>7} {'warm s':>7}", flush=True)
    for spec in filter(None, args.grid.split(",")):
        rows, seq, segs = point(spec)
        for ck in choice[args.checkpointing]:
            for comp in args.compile.split(","):
                convs, chunks = args.long_conv.split(","), args.delta_chunk.split(",")
                for variant, conv, chunk in itertools.product(variants, convs, chunks):
                    where = f"{rows:>5} {seq:>6} {segs:>4} {ck!s:>4} {comp:>6} {variant:>10}"
                    where += f" {conv:>12} {chunk or config.delta_chunk:>5}"
                    cfg = replace(config, delta_chunk=int(chunk)) if chunk else config
                    hyena.LONG_CONV = "fft" if conv == "fft" else "chunked"
                    hyena.CHUNKED_DTYPE = "bfloat16" if conv.endswith("bf16") else "float32"
                    try:
                        with delta.switched(**VARIANTS[variant]):
                            r = measure(
                                cfg, rows, seq, segs, checkpointing=ck, compile=comp,
                                steps=args.steps, warmup=args.warmup, peak=args.peak_flops,
                                device=args.device,
                            )  # fmt: skip
                    except torch.OutOfMemoryError:
                        print(f"{where} out of memory")
                        torch.cuda.empty_cache()
                        continue
                    results.append(
                        {**r, "delta": variant, "long_conv": conv, "delta_chunk": cfg.delta_chunk}
                    )
                    print(
                        f"{where} {r['bytes_per_s']:>12,.0f} {100 * r['mfu']:>5.1f}%"
                        f" {r['step_ms']:>8.1f} {r['peak_mem_gb']:>7.1f} {r['warmup_s']:>7.1f}",
                        flush=True,
                    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        machine = dict(
            platform=platform.platform(), torch=torch.__version__,
            device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            date=datetime.date.today().isoformat(),
        )  # fmt: skip
        out = dict(config=args.config, peak_flops=args.peak_flops, machine=machine)
        args.json.write_text(json.dumps({**out, "results": results}, indent=2))


if __name__ == "__main__":
    main()
