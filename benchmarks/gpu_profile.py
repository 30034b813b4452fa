"""Where a decode step's device time goes: `python -m benchmarks.gpu_profile --batches 1,1024`.

For each batch size, builds the runner as the decode grid does (compile + CUDA graphs, float32
or bfloat16 weights), then profiles the step function (the compiled function the graph captures,
launched directly so the profiler sees each kernel) over a few steps and prints, per kernel name,
calls per step, device microseconds per step and share of the step; also kernels per step and
the replay time of the captured graph. Beside it, the floor a step cannot beat: the bytes it must
move (recurrent state read and written, weights read once) over the device's bandwidth.

Needs only torch: it runs on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.engine_bench import _replay_ms, graph_ms, load_model
from engine.config import EngineConfig
from engine.runner import Runner
from engine.scheduler import Feed, StepPlan


def host_breakdown(runner: Runner, plan: StepPlan, n: int = 50) -> dict[str, float]:
    """Median microseconds of a step's parts: building the rows, copying them in and launching
    the graph, waiting for the sampled ids; and one replay launched and waited for alone (the
    device's latency for one step when nothing is pipelined)."""
    assert runner.graphs is not None
    parts: dict[str, list[float]] = {"rows": [], "launch": [], "wait": [], "replay+sync": []}
    graph, _ = runner.graphs.graphs[runner.graphs.bucket(len(plan.decode))]
    for _ in range(n):
        t0 = time.perf_counter()
        runner._rows(plan.decode, plan.spec, runner.graphs.host_rows)
        t1 = time.perf_counter()
        out = runner.graphs.launch(len(plan.decode))
        t2 = time.perf_counter()
        out.tolist()
        t3 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        t4 = time.perf_counter()
        for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            parts[k].append(v * 1e6)
    return {k: statistics.median(v) for k, v in parts.items()}


def profile_batch(
    model: Any, batch: int, dtype: str, steps: int, top: int, mode: str = "default"
) -> dict[str, Any]:
    cfg = EngineConfig(
        max_slots=batch, device="cuda", compile=True, decode_dtype=dtype, compile_mode=mode
    )
    runner = Runner(model, cfg)
    feeds = tuple(Feed(f"s{i}", i, b"a", 1000, True) for i in range(batch))
    plan = StepPlan((), feeds, (), ())
    for _ in range(5):
        runner.execute(plan)  # compile and capture
    torch.cuda.synchronize()
    runner._rows(feeds, (), runner._host_np)
    rows = runner._host_rows[:, :batch].to("cuda")
    for _ in range(3):
        runner._decode_fn(rows)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            runner._decode_fn(rows)
        torch.cuda.synchronize()
    per: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            p = per[ev.name]
            p[0] += 1
            p[1] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time
    total = sum(v[1] for v in per.values()) / steps
    kernels = sum(v[0] for v in per.values()) / steps
    table = sorted(
        (
            {
                "kernel": k[:90],
                "calls": v[0] / steps,
                "us": v[1] / steps,
                "share": v[1] / steps / total,
            }
            for k, v in per.items()
        ),
        key=lambda r: -r["us"],
    )
    replay = _replay_ms(runner, batch)
    t0 = time.perf_counter()
    for _ in range(20):
        runner.execute(plan)
    step_ms = (time.perf_counter() - t0) / 20 * 1e3
    host = host_breakdown(runner, plan)
    state_bytes = model.state_bytes_per_row() * batch
    weight_bytes = sum(
        p.numel() * (2 if dtype == "bfloat16" and p.dim() == 2 else 4) for p in model.parameters()
    )
    bw = 3.35e12 if "H100" in torch.cuda.get_device_name() else 4.8e12
    floor_us = (2 * state_bytes + weight_bytes) / bw * 1e6
    print(
        f"\nbatch {batch} ({dtype}, {mode}): {kernels:.0f} kernels/step, kernel time {total:.0f} us/step, "
        f"replay {replay * 1e3:.0f} us, step {step_ms * 1e3:.0f} us, bandwidth floor {floor_us:.0f} us"
    )
    print("host, median us: " + ", ".join(f"{k} {v:.0f}" for k, v in host.items()))
    print(f"{'kernel':<90} {'calls':>6} {'us':>8} {'share':>6}")
    for r in table[:top]:
        print(f"{r['kernel']:<90} {r['calls']:>6.1f} {r['us']:>8.1f} {100 * r['share']:>5.1f}%")
    del runner
    torch.cuda.empty_cache()
    return {
        "batch": batch,
        "dtype": dtype,
        "compile_mode": mode,
        "kernels_per_step": kernels,
        "kernel_us": total,
        "replay_us": replay * 1e3 if replay else None,
        "step_us": step_ms * 1e3,
        "floor_us": floor_us,
        "host_us": host,
        "table": table[:60],
    }


def sweep(model: Any, batch: int, dtype: str) -> list[dict[str, Any]]:
    """Device time of the two fused mixer kernels (summed over a step's layers, from the
    profiler) under each launch shape of model.kernels.TUNING, at one batch size."""
    from model import kernels
    from model.decode_cache import build_decode_cache

    cache = build_decode_cache(model, getattr(torch, dtype))
    pool = model.allocate_state(batch)
    slots = torch.arange(batch, device="cuda")
    tokens = torch.randint(0, 256, (batch,), device="cuda")
    base = dict(kernels.TUNING)
    out = []
    for key, values in (("delta_warps", (2, 4, 8, 16)), ("hyena_warps", (1, 2, 4, 8)),
                        ("hyena_channels", (16, 32, 64, 128, 256))):  # fmt: skip
        for v in values:
            kernels.TUNING.update(base)
            kernels.TUNING[key] = v
            with torch.no_grad():
                for _ in range(2):
                    model.step(tokens, pool, slots, cache=cache)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        model.step(tokens, pool, slots, cache=cache)
                    torch.cuda.synchronize()
            us = {"delta": 0.0, "hyena": 0.0}
            for ev in prof.events():
                for name in us:
                    if ev.name == f"_{name}_step_kernel":
                        us[name] += ev.device_time_total / 5
            out.append({"batch": batch, key: v, "delta_us": us["delta"], "hyena_us": us["hyena"]})
            print(
                f"sweep batch {batch} {key}={v}: delta kernels {us['delta']:.0f} us, "
                f"hyena kernels {us['hyena']:.0f} us per step",
                flush=True,
            )
    kernels.TUNING.update(base)
    return out


def sampler(batches: list[int]) -> list[dict[str, Any]]:
    """Device time of engine.sampling.sample alone on (batch, 260) logits with mixed top-k/top-p
    rows: eager, compiled, and compiled without persistent reductions, each captured in a CUDA
    graph and timed with events."""
    import torch._inductor.config as inductor_config

    from engine.sampling import sample

    out = []
    for batch in batches:
        g = torch.Generator(device="cuda").manual_seed(0)
        logits = torch.randn(batch, 260, device="cuda", generator=g) * 3
        temp = torch.ones(batch, device="cuda")
        top_k = torch.randint(0, 40, (batch,), device="cuda", generator=g)
        top_p = torch.rand(batch, device="cuda", generator=g) * 0.5 + 0.5
        seed = torch.arange(batch, device="cuda")
        counter = torch.zeros(batch, dtype=torch.long, device="cuda")
        args = (logits, temp, top_k, top_p, seed, counter)
        for name in ("eager", "compiled", "compiled, no persistent reductions"):
            torch._dynamo.reset()
            inductor_config.triton.persistent_reductions = "no persistent" not in name
            fn = sample if name == "eager" else torch.compile(sample, dynamic=False)
            for _ in range(3):
                fn(*args)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn(*args)
            us = graph_ms(graph) * 1e3
            out.append({"batch": batch, "sampler": name, "us": us})
            print(f"sampler batch {batch:>5} {name:<36} {us:8.1f} us", flush=True)
    inductor_config.triton.persistent_reductions = True
    return out


def gemv(model: Any, rows: list[int], dtype: str) -> list[dict[str, Any]]:
    """Device time of each distinct decode projection of the model (the decode cache's weights)
    with a few rows: cuBLAS (F.linear) against the GEMV kernel at each warps setting, each
    captured in a CUDA graph of 20 calls and timed with events."""
    from model.decode_cache import build_decode_cache

    cache = build_decode_cache(model, getattr(torch, dtype))
    shapes = sorted({tuple(w.shape) for w in cache.values() if w.dim() == 2})
    out = []
    for n, k in shapes:
        w = next(w for w in cache.values() if tuple(w.shape) == (n, k))
        for m in rows:
            x = torch.randn(m, k, device="cuda")
            row: dict[str, Any] = {"n": n, "k": k, "rows": m}
            variants: dict[str, Any] = {
                "cublas": lambda x=x, w=w: torch.nn.functional.linear(x.to(w.dtype), w)
            }
            for warps in (1, 2, 4, 8):
                variants[f"gemv_w{warps}"] = lambda x=x, w=w, warps=warps: _gemv_warps(x, w, warps)
            for name, fn in variants.items():
                fn()
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for _ in range(20):
                        fn()
                row[name] = graph_ms(graph) * 1e3 / 20
            out.append(row)
            best = min((v, k2) for k2, v in row.items() if k2.startswith("gemv"))
            print(
                f"gemv {n:>5} x {k:>5} rows {m}: cuBLAS {row['cublas']:6.2f} us, "
                f"best GEMV {best[0]:6.2f} us ({best[1]})",
                flush=True,
            )
    return out


def _gemv_warps(x: torch.Tensor, w: torch.Tensor, warps: int) -> torch.Tensor:
    from model import kernels

    was = kernels.TUNING["gemv_warps"]
    kernels.TUNING["gemv_warps"] = warps
    try:
        return kernels.gemv(x, w)
    finally:
        kernels.TUNING["gemv_warps"] = was


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="base")
    p.add_argument("--batches", default="1,256,1024")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--modes", default="default", help="torch.compile modes, comma-separated")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--sweep", default="", help="batch sizes to sweep kernel launch shapes at")
    p.add_argument(
        "--no-split-reductions", action="store_true", help="inductor: one program per reduction"
    )
    p.add_argument("--sampler", default="", help="batch sizes to time the sampler alone at")
    p.add_argument("--gemv", default="", help="rows to time each projection at, cuBLAS vs GEMV")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_float32_matmul_precision("high")
    if args.no_split_reductions:
        import torch._inductor.config as inductor_config

        inductor_config.split_reductions = False
    model = load_model(args.model, "cuda")
    out = {
        "bench": "engine.profile",
        "model": args.model,
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "points": [
            profile_batch(model, int(b), args.dtype, args.steps, args.top, mode)
            for mode in args.modes.split(",")
            for b in filter(None, args.batches.split(","))
        ],
    }
    out["sweep"] = [
        r for b in filter(None, args.sweep.split(",")) for r in sweep(model, int(b), args.dtype)
    ]
    out["sampler"] = sampler([int(b) for b in filter(None, args.sampler.split(","))])
    out["gemv"] = gemv(model, [int(b) for b in filter(None, args.gemv.split(","))], args.dtype)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
