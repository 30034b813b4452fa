"""Engine benchmarks: `bwr bench engine ...` (or `python -m benchmarks.engine_bench ...`).

Two measurements, each printing a table and writing JSON:

- serve (default on the CPU): N sessions each generate B bytes through the real asyncio Engine,
  all at once (batched) and then the same work one session at a time in the same process
  (baseline); reports tokens/s of both, their ratio, and TTFT / inter-token latency p50 and p99.
- decode grid (--batches/--contexts, for the GPU): decode throughput of the runner's batched step
  at each batch size and context length, eager vs CUDA graphs (vs torch.compile + graphs). The
  context is prefilled once for real (the parallel form, chunked), then its state is copied into
  every slot: a recurrent model's decode cost depends only on its fixed-size state, which is
  what this grid shows (flat in context length). Beside the runner's step alone, each point also
  times the scheduler and runner together (plan, launch, collect, complete: every session
  generating, turns that end restarted), once collecting each step before planning the next and
  once pipelined as the engine runs on a GPU (step k+1 planned and launched before step k is
  collected).

Needs only torch (and the project's engine/ and model/): it runs on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from engine import Delta, Done, Engine, EngineConfig, SamplingParams
from engine.gctune import tune_for_serving
from engine.runner import Launched, Runner
from engine.scheduler import Emitted, Feed, Scheduler, StepPlan
from model import ByteLM, ModelConfig


def parse_size(text: str) -> int:
    text = text.strip().lower()
    mult = {"k": 1024, "m": 1024**2}.get(text[-1:], 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


def load_model(name: str, device: str) -> ByteLM:
    torch.manual_seed(0)
    if Path(name).is_dir():
        return ByteLM.load(name, device).eval()
    return ByteLM(ModelConfig.named(name)).to(device).eval()


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# ----- serve: the asyncio engine, batched vs one at a time -----


async def _serve(
    model: ByteLM,
    device: str,
    sessions: int,
    nbytes: int,
    prompt: bytes,
    concurrent: bool,
    **options: Any,
) -> dict[str, Any]:
    cfg = EngineConfig(
        max_slots=sessions if concurrent else 1, device=device, lag_limit=1 << 20, **options
    )
    engine = Engine(model, cfg)
    await engine.start()
    ttft: list[float] = []
    itl: list[float] = []
    total = 0

    async def one(i: int) -> None:
        nonlocal total
        s = engine.open()
        t0 = time.perf_counter()
        last = None
        s.submit(prompt, SamplingParams(max_bytes=nbytes, seed=i, temperature=1.0))
        async for ev in s.events():
            now = time.perf_counter()
            if isinstance(ev, Delta) and ev.data:
                if last is None:
                    ttft.append(now - t0)
                else:
                    itl.append((now - last) / len(ev.data))
                last = now
                total += len(ev.data)
            elif isinstance(ev, Done):
                break
        await s.close()

    t0 = time.perf_counter()
    if concurrent:
        await asyncio.gather(*(one(i) for i in range(sessions)))
    else:
        for i in range(sessions):
            await one(i)
    wall = time.perf_counter() - t0
    await engine.shutdown()
    return {
        "tokens": total,
        "seconds": wall,
        "tokens_per_s": total / wall,
        "ttft_ms": {"p50": 1e3 * pct(ttft, 0.5), "p99": 1e3 * pct(ttft, 0.99)},
        "itl_ms": {"p50": 1e3 * pct(itl, 0.5), "p99": 1e3 * pct(itl, 0.99)},
        "steps": engine.metrics.steps,
        "pipelined": engine.pipelined,
    }


def serve(args: argparse.Namespace) -> dict[str, Any]:
    model = load_model(args.model, args.device)
    prompt = (b"The quick brown fox jumps over the lazy dog. " * 8)[: args.prompt]
    options: dict[str, Any] = {"compile": args.compile, "decode_dtype": args.decode_dtype}
    if args.device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")

    def go(sessions: int, concurrent: bool, pipeline: bool | None) -> dict[str, Any]:
        return asyncio.run(
            _serve(
                model,
                args.device,
                sessions,
                args.bytes,
                prompt,
                concurrent,
                pipeline=pipeline,
                **options,
            )
        )

    pipes: list[bool | None] = {
        "auto": [None],
        "on": [True],
        "off": [False],
        "both": [False, True],
    }[args.pipeline]
    go(min(4, args.sessions), True, pipes[0])  # warm up (compiles, when asked)
    runs: dict[str, dict[str, Any]] = {}
    for pipe in pipes:
        name = (
            "batched" if len(pipes) == 1 else "batched-serial" if not pipe else "batched-pipelined"
        )
        runs[name] = go(args.sessions, True, pipe)
    batched = runs.get("batched") or runs["batched-pipelined"]
    if args.baseline:
        runs["baseline"] = go(args.sessions, False, pipes[-1])
    result: dict[str, Any] = {
        "bench": "engine.serve",
        "model": args.model,
        "device": args.device,
        "sessions": args.sessions,
        "bytes": args.bytes,
        "prompt": len(prompt),
        **options,
        **runs,
        "batched": batched,
        "ttft_ms": batched["ttft_ms"],
        "itl_ms": batched["itl_ms"],
    }
    if "baseline" in runs:
        result["speedup"] = batched["tokens_per_s"] / runs["baseline"]["tokens_per_s"]
    if "batched-serial" in runs:
        result["pipelined_speedup"] = (
            runs["batched-pipelined"]["tokens_per_s"] / runs["batched-serial"]["tokens_per_s"]
        )
    print(
        f"engine serve: {args.model} on {args.device}, {args.sessions} sessions x {args.bytes} bytes, prompt {len(prompt)} B"
    )
    print(
        f"{'run':<18} {'tokens/s':>12} {'seconds':>9} {'TTFT p50':>10} {'TTFT p99':>10} {'ITL p50':>9} {'ITL p99':>9}"
    )
    for name, r in runs.items():
        print(
            f"{name:<18} {r['tokens_per_s']:>12,.0f} {r['seconds']:>9.2f} {r['ttft_ms']['p50']:>8.1f}ms {r['ttft_ms']['p99']:>8.1f}ms "
            f"{r['itl_ms']['p50']:>7.2f}ms {r['itl_ms']['p99']:>7.2f}ms"
        )
    if "speedup" in result:
        print(f"speedup batched / baseline: {result['speedup']:.1f}x")
    if "pipelined_speedup" in result:
        print(f"pipelined / serial: {result['pipelined_speedup']:.2f}x")
    return result


# ----- decode grid: the runner's batched step -----


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _context_state(model: ByteLM, ctx: int, device: str) -> dict[str, torch.Tensor]:
    """Prefill one row over ctx bytes of text-like data; -> its state (batch 1)."""
    g = torch.Generator().manual_seed(ctx)
    data = torch.randint(32, 127, (1, ctx), generator=g).to(device)
    state = model.allocate_state(1, device)
    model.prefill(data, state)
    return state


def _time_steps(runner: Runner, plan: StepPlan, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        runner.execute(plan)  # ends with the step's one host sync
        times.append(time.perf_counter() - t0)
    return times


def _time_loop(
    runner: Runner, batch: int, ctx: int, steps: int, pipelined: bool
) -> tuple[float, dict[str, float]]:
    """Bytes per second of the scheduler and runner together with `batch` sessions generating
    (their slots already hold the context's state): the engine's loop without its asyncio and
    collectors; -> (bytes/s, the host's median ms per step in plan, launch, wait and complete).
    A turn that ends (EOS) starts again, as new requests would. Each session has its
    own seed: the slots start from one state, and with one seed they would sample alike and end
    together (a burst of ended turns drops the batch to a bucket not yet captured)."""
    sched = Scheduler(batch, 1 << 20, 1 << 20)
    params = SamplingParams(max_bytes=1 << 30, temperature=1.0)
    for i in range(batch):
        sched.adopt(f"s{i}", ctx, b"a")
        sched.submit(f"s{i}", b"", params)
        runner.set_sampling(i, params, seed=1 + i, reset_counter=True)
    flight: tuple[StepPlan, Launched] | None = None
    emitted = 0
    host: dict[str, list[float]] = {"plan": [], "launch": [], "wait": [], "complete": []}

    def collect(flight: tuple[StepPlan, Launched]) -> int:
        t0 = time.perf_counter()
        ids, _ = runner.collect(flight[1])
        t1 = time.perf_counter()
        n = 0
        for o in sched.complete(flight[0], ids):
            if isinstance(o, Emitted):
                n += len(o.data)
            else:
                sched.submit(o.sid, b"", params)
        host["wait"].append(t1 - t0)
        host["complete"].append(time.perf_counter() - t1)
        return n

    for i in range(steps + 3):
        if i == 3:  # warm: the sample-only and prefill paths have run too
            _sync(runner.cfg.device)
            t0, emitted = time.perf_counter(), 0
            for v in host.values():
                v.clear()
        t1 = time.perf_counter()
        plan = sched.schedule()
        t2 = time.perf_counter()
        launched = runner.launch(plan)
        host["plan"].append(t2 - t1)
        host["launch"].append(time.perf_counter() - t2)
        if flight is not None:
            emitted += collect(flight)
        flight = (plan, launched)
        if not pipelined:
            emitted += collect(flight)
            flight = None
    if flight is not None:
        emitted += collect(flight)
    rate = emitted / (time.perf_counter() - t0)
    return rate, {k: 1e3 * statistics.median(v) for k, v in host.items()}


def graph_ms(graph: torch.cuda.CUDAGraph, replays: int = 20, repeats: int = 5) -> float:
    """Device time of one replay of a captured graph (no host work), timed with events like the
    peer: the median over `repeats` runs of `replays` back-to-back replays."""
    times = []
    for _ in range(repeats):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(replays):
            graph.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) / replays)
    return statistics.median(times)


def _replay_ms(runner: Runner, batch: int) -> float | None:
    """Device time of the runner's graph for this batch size (None without graphs)."""
    if runner.graphs is None:
        return None
    graph, _ = runner.graphs.graphs[runner.graphs.bucket(batch)]
    return graph_ms(graph)


def decode_grid(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device
    if device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # TF32 matmuls; states stay float32
    model = load_model(args.model, device)
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [parse_size(c) for c in args.contexts.split(",")]
    tune_for_serving()  # the scheduler loop's host work, with the GC settings `bwr up` uses
    modes = args.modes.split(",")
    state_bytes = model.state_bytes_per_row()
    states, prefill_rate = {}, {}
    for ctx in contexts:
        t0 = time.perf_counter()
        states[ctx] = _context_state(model, ctx, device)
        _sync(device)
        prefill_rate[ctx] = ctx / (time.perf_counter() - t0)
        print(f"context {ctx:,} bytes prefilled at {prefill_rate[ctx]:,.0f} B/s", flush=True)
    rows = []
    for mode in modes:
        for batch in batches:
            # One runner per (mode, batch): graphs are captured (and compiled) once, then each
            # context's state is copied into every slot and decode is timed.
            try:
                cfg = EngineConfig(
                    max_slots=batch,
                    device=device,
                    cuda_graphs=mode != "eager",
                    compile=mode.startswith("compile"),
                    decode_dtype="bfloat16" if mode.endswith("bf16") else "float32",
                )
                runner = Runner(model, cfg)
                feeds = tuple(
                    Feed(f"s{i}", i, bytes([65 + i % 26]), 1000, True) for i in range(batch)
                )
                plan = StepPlan((), feeds, (), ())
                t0 = time.perf_counter()
                _time_steps(
                    runner, plan, 3 if mode == "eager" else 5
                )  # the first call captures/compiles
                setup_s = time.perf_counter() - t0
            except Exception as e:  # report, keep measuring the other points
                for ctx in contexts:
                    rows.append(
                        {
                            "batch": batch,
                            "mode": mode,
                            "context": ctx,
                            "error": f"{type(e).__name__}: {e}"[:400],
                        }
                    )
                print(f"batch {batch} {mode}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            for ctx in contexts:
                for k, v in runner.state.items():
                    v.copy_(states[ctx][k].expand_as(v))
                times = _time_steps(runner, plan, args.steps)
                med = statistics.median(times)
                replay = _replay_ms(runner, batch)
                serial, serial_host = _time_loop(runner, batch, ctx, args.steps, pipelined=False)
                piped, piped_host = _time_loop(runner, batch, ctx, args.steps, pipelined=True)
                r = {
                    "batch": batch,
                    "mode": mode,
                    "context": ctx,
                    "step_ms": 1e3 * med,
                    "step_ms_p99": 1e3 * pct(times, 0.99),
                    "tokens_per_s": batch / med,
                    "replay_ms": replay,
                    "replay_tokens_per_s": batch / (replay / 1e3) if replay else None,
                    "loop_tokens_per_s": serial,
                    "pipelined_tokens_per_s": piped,
                    "loop_host_ms": serial_host,
                    "pipelined_host_ms": piped_host,
                    "setup_s": setup_s,
                    "prefill_bytes_per_s": prefill_rate[ctx],
                }
                rows.append(r)
                extra = (
                    f"  replay {replay:.3f} ms ({batch / (replay / 1e3):,.0f} tok/s)"
                    if replay
                    else ""
                )
                print(
                    f"{mode:<8} batch {batch:>5} ctx {ctx:>8,}: {1e3 * med:8.3f} ms/step {batch / med:>12,.0f} tok/s{extra}"
                    f"  loop {serial:,.0f}, pipelined {piped:,.0f} tok/s ({piped / serial:.2f}x)"
                    f"  host ms (plan/launch/wait/complete) serial "
                    + "/".join(f"{v:.2f}" for v in serial_host.values())
                    + " pipelined "
                    + "/".join(f"{v:.2f}" for v in piped_host.values()),
                    flush=True,
                )
            del runner
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    result = {
        "bench": "engine.decode",
        "model": args.model,
        "device": device,
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor(),
        "params": model.num_parameters(),
        "state_bytes_per_session": state_bytes,
        "rows": rows,
    }
    print(
        f"\n{args.model}: {model.num_parameters():,} params, state {state_bytes:,} B per session; tokens/s per engine step"
    )
    print(
        f"{'context':>9} {'batch':>6} "
        + " ".join(f"{m:>14} {'loop':>10} {'pipelined':>10}" for m in modes)
    )
    for ctx in contexts:
        for batch in batches:
            cells = []
            for m in modes:
                r = next(
                    x
                    for x in rows
                    if x["context"] == ctx and x["batch"] == batch and x["mode"] == m
                )
                cells.append(
                    " ".join(
                        f"{r.get(k, float('nan')):>{w},.0f}"
                        for k, w in (
                            ("tokens_per_s", 14),
                            ("loop_tokens_per_s", 10),
                            ("pipelined_tokens_per_s", 10),
                        )
                    )
                )
            print(f"{ctx:>9,} {batch:>6} " + " ".join(cells))
    return result


# ----- decode with memory on: segment capture, consolidation on a side stream, reads -----


def _steps_summary(times: list[float], marks: list[tuple[int, int, int]]) -> dict[str, Any]:
    """Step times split by what the step carried: marks per step are (segments closed in it,
    versions installed just before it, slots whose memory keys/values it computed before its
    decode). 'event' is any of the three, 'quiet' none."""
    kinds = {
        "quiet": [t for t, m in zip(times, marks, strict=True) if not any(m)],
        "event": [t for t, m in zip(times, marks, strict=True) if any(m)],
        "closed": [t for t, m in zip(times, marks, strict=True) if m[0]],
        "installed": [t for t, m in zip(times, marks, strict=True) if m[1]],
        "refreshed": [t for t, m in zip(times, marks, strict=True) if m[2]],
    }
    return {
        k: {"steps": len(v), "step_ms_p50": 1e3 * pct(v, 0.5), "step_ms_p99": 1e3 * pct(v, 0.99)}
        for k, v in kinds.items()
    }


def memory_compare(args: argparse.Namespace) -> dict[str, Any]:
    """Decode step time with memory off and on, the same sessions and steps. With memory on,
    every step captures hidden states; each closed segment is compressed, applied to the
    session's SessionMemory (the real level policy) and installed between steps, as the engine
    does with its hooks; the bus is left out (it costs CPU and network, not device time).

    --compress inline (default): the decode thread launches each compression on a side CUDA
    stream right after the step that closed the segment and picks the slots up (an event query,
    no sync) at a later step; merges inside apply_segment wait for their own side-stream work.
    --compress thread: a worker thread compresses, as in-process consolidation workers do (it
    shares the interpreter with the decode thread).

    Besides p50/p99 of all steps, each step is marked (a segment closed in it, a version was
    installed just before it, it computed memory keys/values before its decode) and the table
    splits the times by mark; 'between' is the host time between two steps (compress launches,
    applies, installs), which the step times leave out as the engine's step metric does."""
    from concurrent.futures import Future, ThreadPoolExecutor

    from memory.config import MemoryConfig
    from memory.store import SessionMemory

    device = args.device
    cuda = device.startswith("cuda")
    if cuda:
        torch.set_float32_matmul_precision("high")
    model = load_model(args.model, device)
    mc = model.config
    S, batch = mc.segment_len, args.sessions
    mem_cfg = MemoryConfig()
    stream = torch.cuda.Stream() if cuda else None
    # the target level as a device tensor: an int would be copied to the device (and synced)
    levels = [torch.tensor(i, device=device) for i in range(mc.mem_levels + 1)]

    def compress(hidden: torch.Tensor, level: int) -> torch.Tensor:
        """Synchronous: (1, L, D) anywhere -> (1, m, D) on the host."""
        with torch.no_grad():
            if stream is None:
                return model.compress(hidden.to(device), levels[level]).cpu()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                return model.compress(hidden.to(device), levels[level]).cpu()

    def launch(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Asynchronous on a GPU: (S, D) on the device -> (1, m, D) pinned host slots that are
        valid once the event has completed (None: valid now)."""
        if stream is None:
            return compress(hidden.unsqueeze(0), 1), None
        with torch.no_grad():
            stream.wait_stream(torch.cuda.current_stream())  # the segment's copy is queued there
            with torch.cuda.stream(stream):
                slots = model.compress(hidden.unsqueeze(0), levels[1])
                host = torch.empty(slots.shape, dtype=slots.dtype, pin_memory=True)
                host.copy_(slots, non_blocking=True)
                hidden.record_stream(stream)
                ready = torch.cuda.Event()
                ready.record(stream)
        return host, ready

    out: dict[str, Any] = {
        "bench": "engine.memory",
        "model": args.model,
        "device": device,
        "sessions": batch,
        "compress": args.compress,
    }
    for memory_on in (False, True):
        cfg = EngineConfig(
            max_slots=batch,
            device=device,
            cuda_graphs=True,
            memory_capacity=mem_cfg.max_slots if memory_on else 0,
        )
        runner = Runner(model, cfg, capture_segments=memory_on)
        stores = [SessionMemory.for_model(mc, mem_cfg) for _ in range(batch)]
        pos = [(i * S) // batch for i in range(batch)]  # staggered: segments close every few steps
        pool = ThreadPoolExecutor(1) if args.compress == "thread" else None
        threaded: list[tuple[int, int, Future[torch.Tensor]]] = []
        inline: list[tuple[int, int, torch.Tensor, torch.cuda.Event | None]] = []
        times: list[float] = []
        between: list[float] = []
        marks: list[tuple[int, int, int]] = []
        applied = installs = 0
        t_end = time.perf_counter()  # when the last step returned
        for step in range(args.steps + 20):
            plan = StepPlan(
                (), tuple(Feed(f"s{i}", i, b"a", pos[i], True) for i in range(batch)), (), ()
            )
            t0 = time.perf_counter()
            _, closed = runner.execute(plan)
            t1 = time.perf_counter()
            if step >= 20:
                times.append(t1 - t0)
                between.append(t0 - t_end)
                marks.append((len(closed), installs, runner.refreshed))
            t_end = t1
            pos = [p + 1 for p in pos]
            for seg in closed:
                if pool is not None:
                    threaded.append(
                        (seg.slot, seg.index, pool.submit(compress, seg.hidden.unsqueeze(0), 1))
                    )
                else:
                    inline.append((seg.slot, seg.index, *launch(seg.hidden)))
            done: list[tuple[int, int, torch.Tensor]] = []
            for item in [x for x in threaded if x[2].done()]:
                threaded.remove(item)
                done.append((item[0], item[1], item[2].result()))
            for entry in [x for x in inline if x[3] is None or x[3].query()]:
                inline.remove(entry)
                done.append((entry[0], entry[1], entry[2]))
            installs = 0
            for slot, index, slots in done:  # install between steps
                mem = stores[slot]
                if index != mem.last_seq + 1:
                    continue
                stores[slot] = mem = mem.apply_segment(
                    index, slots[0], (index * S, (index + 1) * S), compress
                )
                runner.install_memory(
                    slot, mem.to_slots(mem_cfg.max_slots, index + 1), mem.written(mem_cfg.max_slots)
                )
                applied += 1
                installs += 1
        if pool is not None:
            pool.shutdown(wait=True)
        key = "on" if memory_on else "off"
        split = _steps_summary(times, marks)
        out[key] = {
            "step_ms_p50": 1e3 * pct(times, 0.5),
            "step_ms_p99": 1e3 * pct(times, 0.99),
            "segments_applied": applied,
            "between_ms_p50": 1e3 * pct(between, 0.5),
            "between_ms_p99": 1e3 * pct(between, 0.99),
            "steps": split,
        }
        print(
            f"memory {key:<3}: step p50 {out[key]['step_ms_p50']:.3f} ms, p99 {out[key]['step_ms_p99']:.3f} ms, "
            f"segments consolidated {applied}; between steps p50 {out[key]['between_ms_p50']:.3f} ms, "
            f"p99 {out[key]['between_ms_p99']:.3f} ms",
            flush=True,
        )
        if memory_on:
            print(f"  {'steps':<10} {'count':>6} {'p50 ms':>8} {'p99 ms':>8}")
            for k, v in split.items():
                print(
                    f"  {k:<10} {v['steps']:>6} {v['step_ms_p50']:>8.3f} {v['step_ms_p99']:>8.3f}"
                )
        del runner
    out["p99_ratio"] = out["on"]["step_ms_p99"] / out["off"]["step_ms_p99"]
    print(f"p99 with memory / without: {out['p99_ratio']:.3f} (compress {args.compress})")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="tiny", help="tiny, small, base, or a checkpoint directory")
    p.add_argument("--sessions", type=int, default=64)
    p.add_argument("--bytes", type=int, default=256, help="bytes each session generates")
    p.add_argument("--prompt", type=int, default=64, help="prompt bytes per session")
    p.add_argument("--batches", default=None, help="decode grid: comma-separated batch sizes")
    p.add_argument(
        "--contexts",
        default="1k",
        help="decode grid: comma-separated context lengths (1k, 32k, 128k)",
    )
    p.add_argument(
        "--modes", default="eager,graph", help="decode grid: eager, graph, compile, compile-bf16"
    )
    p.add_argument("--steps", type=int, default=50, help="decode grid: timed steps per point")
    p.add_argument("--memory", action="store_true", help="decode step time with memory on vs off")
    p.add_argument(
        "--compress",
        choices=("inline", "thread"),
        default="inline",
        help="--memory: compress in the decode thread on a side stream, or in a worker thread",
    )
    p.add_argument("--compile", action="store_true", help="serve: torch.compile the decode step")
    p.add_argument(
        "--decode-dtype", default="float32", help="serve: float32 or bfloat16 matmul weights"
    )
    p.add_argument(
        "--pipeline",
        choices=("auto", "on", "off", "both"),
        default="auto",
        help="serve: plan step k+1 before collecting step k (auto: on a GPU); both: one run each",
    )
    p.add_argument(
        "--no-baseline",
        dest="baseline",
        action="store_false",
        help="serve: skip the one-session-at-a-time run (slow at many sessions)",
    )
    p.add_argument("--json", default=None, help="write the result here")


def run(args: argparse.Namespace) -> int:
    result = (
        memory_compare(args) if args.memory else decode_grid(args) if args.batches else serve(args)
    )
    result["date"] = time.strftime("%Y-%m-%d")
    result["torch"] = torch.__version__
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
