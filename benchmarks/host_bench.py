"""Engine host overhead: `python -m benchmarks.host_bench --json out.json`.

The engine's own time per step, apart from the model: N sessions each generate B bytes through
the real asyncio Engine (scheduler, collectors, metrics, consumers on the event loop), while the
runner's launch and collect are replaced by ones that return a byte for every sample at once. What remains is
what a GPU step can never hide: at a thousand sessions it is this time, not the device, that
bounds a step. Prints a table (ms of host time per step, split by part; the median of --repeat
runs) and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from collections.abc import Callable
from typing import Any

import torch

from engine import Done, Engine, EngineConfig, SamplingParams
from engine.scheduler import StepPlan
from model import ByteLM, ModelConfig

PARTS = {"scheduler": ("schedule", "complete"), "engine": ("_emit", "_account", "_between_steps")}


def _timed(spent: dict[str, float], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t

    return timed


def no_launch(plan: StepPlan) -> StepPlan:
    return plan


def no_model(plan: StepPlan) -> tuple[list[int], list[Any]]:
    return [ord("a")] * len(plan.samples), []


async def _run(model: ByteLM, sessions: int, nbytes: int, interval: int) -> dict[str, Any]:
    extra = {"stream_interval": interval} if interval != 1 else {}  # 1 also runs older engines
    cfg = EngineConfig(max_slots=sessions, device="cpu", threaded_steps=False, **extra)
    engine = Engine(model, cfg)
    engine.runner.launch = no_launch  # type: ignore[method-assign,assignment]
    engine.runner.collect = no_model  # type: ignore[method-assign,assignment]
    spent: dict[str, float] = {}
    for obj, names in ((engine.scheduler, PARTS["scheduler"]), (engine, PARTS["engine"])):
        for name in names:
            setattr(obj, name, _timed(spent, name, getattr(obj, name)))
    wakes = 0

    async def one() -> None:
        nonlocal wakes
        session = engine.open(binary=True)
        session.submit(b"x", SamplingParams(max_bytes=nbytes, temperature=0.0))
        while True:
            batch = await session.next_batch()
            wakes += 1
            if any(isinstance(e, Done) for e in batch):
                break
        await session.close()

    async with engine:
        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(sessions)))
        seconds = time.perf_counter() - t0
    steps = engine.metrics.steps
    ms = {k: 1e3 * v / steps for k, v in spent.items()}
    return {
        "sessions": sessions,
        "bytes": nbytes,
        "stream_interval": interval,
        "steps": steps,
        "ms_per_step": 1e3 * seconds / steps,
        "scheduler_ms": sum(ms.get(k, 0.0) for k in PARTS["scheduler"]),
        "emit_ms": ms.get("_emit", 0.0),
        "other_engine_ms": ms.get("_account", 0.0) + ms.get("_between_steps", 0.0),
        "consumers_ms": 1e3 * seconds / steps - sum(ms.values()),
        "wakes_per_session": wakes / sessions,
        "bytes_per_s": sessions * nbytes / seconds,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="host_bench", description=__doc__)
    p.add_argument("--sessions", default="64,256,1024")
    p.add_argument("--intervals", default="1,4,16")
    p.add_argument("--bytes", type=int, default=128, help="bytes each session generates")
    p.add_argument("--repeat", type=int, default=3, help="runs per cell (the median is shown)")
    p.add_argument(
        "--gc", choices=["default", "serving"], default="serving", help="collector settings"
    )
    p.add_argument(
        "--loop",
        choices=["asyncio", "uvloop"],
        default="uvloop",
        help="event loop (`bwr up` serves on uvloop; --no-uvloop on asyncio's own)",
    )
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    factory = None
    if args.loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    torch.manual_seed(0)
    model = ByteLM(ModelConfig.named("tiny")).eval()  # built, never run: execute is replaced
    if args.gc == "serving":  # what `bwr up` does once its model is loaded
        from engine.gctune import tune_for_serving

        tune_for_serving()
    print(f"garbage collector: {args.gc}, event loop: {args.loop}")
    rows = []
    head = f"{'sessions':>8} {'interval':>8} {'ms/step':>8} {'sched':>7} {'emit':>7} {'other':>7}"
    print(head + f" {'consumers':>9} {'wakes/sess':>10} {'bytes/s':>12}")
    for n in (int(x) for x in args.sessions.split(",")):
        for interval in (int(x) for x in args.intervals.split(",")):
            runs = []
            for _ in range(args.repeat):
                with asyncio.Runner(loop_factory=factory) as runner:
                    runs.append(runner.run(_run(model, n, args.bytes, interval)))
            r = sorted(runs, key=lambda x: x["ms_per_step"])[len(runs) // 2]  # the median run
            r["ms_per_step_runs"] = [x["ms_per_step"] for x in runs]
            rows.append(r)
            print(
                f"{n:>8} {interval:>8} {r['ms_per_step']:>8.2f} {r['scheduler_ms']:>7.2f}"
                f" {r['emit_ms']:>7.2f} {r['other_engine_ms']:>7.2f} {r['consumers_ms']:>9.2f}"
                f" {r['wakes_per_session']:>10.1f} {r['bytes_per_s']:>12,.0f}",
                flush=True,
            )
    if args.json:
        out = {
            "bench": "engine_host",
            "machine": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "loop": args.loop,
            "date": time.strftime("%Y-%m-%d"),
            "gc": args.gc,
            "rows": rows,
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
