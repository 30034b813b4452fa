"""evals.py is `bwr eval`: it streams long-context eval cases (model/evals/tasks.py) through the
real engine, one session per case, with the memory system on by default, the way `bwr up` runs it:
an embedded nats-server (unless a NATS URL is given), a MemoryPlugin whose hooks the engine closes
segments into, consolidation workers, and memory versions installed between steps.

Per case it prefills the context, waits (bounded) until consolidation has caught up for the
session (every closed segment applied, no job pending, the latest version installed in the
engine), then asks the question and decodes greedily len(answer) bytes per turn; exact match. It
prints a length x depth table with bytes/s, settling time and bytes per session (state plus
memory), and writes JSON. `--no-memory` is the ablation: memory_capacity 0, no NATS, no read.

It owns no model code and no task generator; only `run` reads parsed flags.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import torch

from engine import Busy, Delta, Done, Engine, EngineConfig, SamplingParams, Session
from engine.engine import MemoryHooks, MemoryUpdate
from gateway.natsd import NatsServer, NatsServerError
from gateway.persistence import MemoryPlugin
from memory.config import MemoryConfig, parse_levels
from memory.store import SessionMemory
from model import ByteLM, ModelConfig
from model.config import PRESETS
from model.evals.args import task_args
from model.evals.tasks import TASKS, Case, parse_size

PIECE = 256 << 10  # bytes per submit: a 16 MB prompt is never copied whole into the inbox
POLL_S = 0.01  # between looks at the engine and the bus while waiting


@dataclass
class Cell:
    length: int
    depth: float
    correct: int = 0  # turns answered exactly
    turns: int = 0
    bytes_in: int = 0
    seconds: float = 0.0  # reading and answering, settling excluded
    settle_s: float = 0.0  # waiting for consolidation before the questions, all cases
    settle_max_s: float = 0.0
    settle_timeouts: int = 0  # cases asked before consolidation caught up
    segments: int = 0  # segments closed into memory, all cases
    memory_version_max: int = 0  # highest memory version installed in the engine
    memory_slots_max: int = 0
    memory_bytes_max: int = 0  # a session's memory (all levels' buffers) at question time
    total_bytes_max: int = 0  # state plus memory, as the gateway's session view counts them
    samples: list[dict[str, str]] = field(default_factory=list)  # first few (want, got)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.turns)


@dataclass
class Report:
    task: str
    model: str
    memory: bool
    memory_capacity: int  # slots a session reads (0: memory off)
    state_bytes_per_session: int
    cells: list[Cell]
    consolidation: dict[str, int] = field(default_factory=dict)  # totals over the run
    task_args: dict[str, Any] = field(default_factory=dict)  # generator keywords (mqar's pairs)
    memory_levels: list[int] = field(default_factory=list)  # level capacities (memory on)
    merge_group: int = 0  # slots a full level merged at once (memory on)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["cells"] = [
            {**asdict(c), "accuracy": c.accuracy, "bytes_per_s": c.bytes_in / max(c.seconds, 1e-9)}
            for c in self.cells
        ]
        return out


# ----- one case -----


async def _feed(session: Session, data: bytes, params: SamplingParams | None) -> None:
    """Submit data in pieces; params (a turn) go with the last piece."""
    view = memoryview(data)
    for at in range(0, max(1, len(data)), PIECE):
        last = at + PIECE >= len(data)
        while True:
            try:
                session.submit(bytes(view[at : at + PIECE]), params if last else None)
                break
            except Busy:  # the inbox is full: wait for the engine to read it
                await asyncio.sleep(0.005)


async def _answer(session: Session, prompt: bytes, n: int) -> bytes:
    """Submit prompt with a greedy n-byte turn; return what came out."""
    await _feed(session, prompt, SamplingParams(max_bytes=n, temperature=0.0, seed=0))
    out = bytearray()
    async for ev in session.events():
        if isinstance(ev, Delta):
            out += ev.data
        elif isinstance(ev, Done):
            break
    return bytes(out)


class CountingHooks:
    """The memory plugin's hooks, counting each session's closed segments as the engine hands
    them over (cases run at once share the engine's totals)."""

    def __init__(self, inner: MemoryHooks) -> None:
        self.inner = inner
        self.closed: dict[str, int] = {}

    def segment_closed(self, session: str, index: int, start: int, hidden: torch.Tensor) -> None:
        self.closed[session] = self.closed.get(session, 0) + 1
        self.inner.segment_closed(session, index, start, hidden)

    def take_updates(self) -> list[MemoryUpdate]:
        return self.inner.take_updates()

    def forget(self, session: str) -> None:
        self.closed.pop(session, None)
        self.inner.forget(session)


async def _closed(
    engine: Engine, counts: CountingHooks, sid: str, want: int, timeout: float
) -> int:
    """Until the engine has read the session's input and closed `want` of its segments (the
    scheduler counts bytes as fed when it plans a step, segments close when the step ran) ->
    segments closed. Reading a long context takes as long as it takes: this gives up only once
    the session has made no progress (bytes fed, segments closed) for timeout s."""
    last, deadline = (-1, -1), 0.0
    while True:
        seq = engine.scheduler.seqs.get(sid)
        done = counts.closed.get(sid, 0)
        if seq is None or (not seq.pending and done >= want):
            return done
        now = time.perf_counter()
        if (seq.fed, done) != last:
            last, deadline = (seq.fed, done), now + timeout
        elif now > deadline:
            return done
        await asyncio.sleep(POLL_S)


async def caught_up(engine: Engine, plugin: MemoryPlugin, sid: str, closed: int) -> bool:
    """The session's `closed` segments are published, applied, and the resulting version is the
    one the engine reads."""
    assert plugin.hooks is not None
    if plugin.hooks.pending:
        return False
    info = await plugin.inspect(sid)
    if info["pending_jobs"] or info["last_seq"] < closed - 1:
        return False
    return closed == 0 or engine.memory_versions.get(sid, 0) >= info["version"]


async def settle(
    engine: Engine, plugin: MemoryPlugin, sid: str, closed: int, timeout: float
) -> tuple[float, bool]:
    """Wait up to timeout s for consolidation of the session -> (seconds waited, caught up)."""
    t0 = time.perf_counter()
    while not await caught_up(engine, plugin, sid, closed):
        if time.perf_counter() - t0 > timeout:
            return time.perf_counter() - t0, False
        await asyncio.sleep(POLL_S)
    return time.perf_counter() - t0, True


async def run_case(
    engine: Engine,
    case: Case,
    cell: Cell,
    plugin: MemoryPlugin | None = None,
    settle_s: float = 60.0,
    counts: CountingHooks | None = None,
) -> list[tuple[bytes, bytes]]:
    """(want, got) per turn of one case, in a fresh session; memory figures go into cell. With
    the plugin, counts are the hooks the engine was given."""
    session = engine.open(binary=True)
    sid = session.id
    try:
        first, want0 = case.turns[0]
        context, question = first[: case.question_at], first[case.question_at :]
        t0 = time.perf_counter()
        await _feed(session, context, None)
        if plugin is not None:
            assert counts is not None
            want = len(context) // engine.model.config.segment_len
            closed = await _closed(engine, counts, sid, want, settle_s)
            elapsed = time.perf_counter() - t0
            waited, ok = await settle(engine, plugin, sid, closed, settle_s)
            ok = ok and closed >= want
            info = await plugin.inspect(sid)
            state = engine.model.state_bytes_per_row()
            cell.segments += closed
            cell.settle_s += waited
            cell.settle_max_s = max(cell.settle_max_s, waited)
            cell.settle_timeouts += not ok
            cell.memory_version_max = max(
                cell.memory_version_max, engine.memory_versions.get(sid, 0)
            )
            cell.memory_slots_max = max(cell.memory_slots_max, int(info["slots"]))
            cell.memory_bytes_max = max(cell.memory_bytes_max, int(info["memory_bytes"]))
            cell.total_bytes_max = max(cell.total_bytes_max, state + int(info["memory_bytes"]))
        else:
            elapsed = 0.0  # the question queues behind the context: timed with it below
        t0 = time.perf_counter()
        scored = [(want0, await _answer(session, question, len(want0)))]
        for later, expect in case.turns[1:]:
            scored.append((expect, await _answer(session, later, len(expect))))
        cell.seconds += elapsed + time.perf_counter() - t0
        return scored
    finally:
        await session.close()  # the engine tells the memory hooks to forget the session


# ----- a sweep -----


async def _sweep(
    engine: Engine,
    plugin: MemoryPlugin | None,
    task: str,
    lengths: list[int],
    depths: list[float],
    n: int,
    seed: int,
    settle_s: float,
    task_args: dict[str, Any],
    concurrency: int = 1,
    counts: CountingHooks | None = None,
) -> list[Cell]:
    """Every case of every cell, up to `concurrency` sessions at once (each case its own
    session; the engine batches their steps), scored in case order."""
    gen = TASKS[task]
    cells = [Cell(length, depth) for length in lengths for depth in depths]
    jobs = [(cell, i) for cell in cells for i in range(n)]
    scores: list[list[tuple[bytes, bytes]]] = [[] for _ in jobs]
    slots = asyncio.Semaphore(concurrency)

    async def one(k: int) -> None:
        cell, i = jobs[k]
        async with slots:
            case = gen(cell.length, cell.depth, seed + i, **task_args)
            scores[k] = await run_case(engine, case, cell, plugin, settle_s, counts)
            cell.bytes_in += sum(len(p) for p, _ in case.turns)

    await asyncio.gather(*(one(k) for k in range(len(jobs))))
    for (cell, _), scored in zip(jobs, scores, strict=True):
        for want, got in scored:
            cell.turns += 1
            cell.correct += want == got
            if len(cell.samples) < 3:
                cell.samples.append({"want": want.decode("latin-1"), "got": got.decode("latin-1")})
    return cells


async def evaluate(
    model: ByteLM,
    task: str,
    lengths: list[int],
    depths: list[float],
    n: int,
    *,
    nats_url: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    workers: int = 2,
    settle_s: float = 60.0,
    model_name: str = "",
    memory_config: MemoryConfig | None = None,
    concurrency: int = 1,
    **task_args: Any,
) -> Report:
    """Every (length, depth) cell over n seeded cases, `concurrency` sessions at a time. With
    nats_url the memory system runs as under `bwr up`; without it, memory is off (the
    ablation)."""
    k = concurrency
    cfg = EngineConfig(max_slots=k, device=device, memory_capacity=0, idle_wait_s=0.005)
    state = model.state_bytes_per_row()
    if nats_url is None:
        async with Engine(model, cfg) as engine:
            cells = await _sweep(engine, None, task, lengths, depths, n, seed, 0.0, task_args, k)
        return Report(task, model_name, False, 0, state, cells, task_args=task_args)
    with tempfile.TemporaryDirectory(prefix="bwr-eval-") as data_dir:
        mc = memory_config or MemoryConfig()
        plugin = MemoryPlugin(nats_url, model, mc, workers=workers, data_dir=data_dir, ingest=False)
        try:
            hooks = await plugin.connect()
            cfg = EngineConfig(
                max_slots=k, device=device, memory_capacity=plugin.capacity, idle_wait_s=0.005
            )
            counts = CountingHooks(hooks)
            engine = Engine(model, cfg, hooks=counts)
            await engine.start()
            try:
                async with anyio.create_task_group() as tg:
                    await tg.start(plugin.run, engine)
                    cells = await _sweep(
                        engine, plugin, task, lengths, depths, n, seed, settle_s, task_args,
                        k, counts,
                    )  # fmt: skip
                    tg.cancel_scope.cancel()
            finally:
                with anyio.CancelScope(shield=True):
                    await engine.shutdown(drain_s=0.0)
        finally:
            await plugin.close()
    assert plugin.service is not None
    totals = {
        "segments_published": hooks.submitted,
        "versions_applied": plugin.service.stats.applied,
        "versions_installed": engine.metrics.memory_installs,
        "jobs_failed": plugin.service.stats.failed,
    }
    levels, group = list(mc.level_capacities), mc.group_for(model.config.mem_slots)
    return Report(
        task, model_name, True, plugin.capacity, state, cells, totals, task_args, levels, group
    )


# ----- output -----


def table(report: Report, depths: list[float]) -> str:
    head = f"{'length':>10} " + " ".join(f"{f'd={d:g}':>8}" for d in depths) + f" {'B/s':>10}"
    if report.memory:
        head += f" {'settle s':>9} {'segs':>6} {'mem B':>10} {'total B':>10}"
    lines = [head]
    for length in sorted({c.length for c in report.cells}):
        row = [c for c in report.cells if c.length == length]
        rate = sum(c.bytes_in for c in row) / max(1e-9, sum(c.seconds for c in row))
        accs = {c.depth: c.accuracy for c in row}
        line = (
            f"{length:>10} "
            + " ".join(f"{100 * accs.get(d, 0.0):>7.1f}%" for d in depths)
            + f" {rate:>10,.0f}"
        )
        if report.memory:
            line += (
                f" {max(c.settle_max_s for c in row):>9.2f}"
                f" {sum(c.segments for c in row):>6}"
                f" {max(c.memory_bytes_max for c in row):>10,}"
                f" {max(c.total_bytes_max for c in row):>10,}"
            )
        lines.append(line)
    return "\n".join(lines)


def load_model(name: str, device: str, seed: int = 0) -> ByteLM:
    """A checkpoint directory, or a named config with seeded random weights."""
    if name in PRESETS:
        torch.manual_seed(seed)
        return ByteLM(ModelConfig.named(name)).to(device).eval()
    return ByteLM.load(name, device).eval()


def run(args: argparse.Namespace) -> int:
    try:
        extra = task_args(args)
        levels = parse_levels(args.memory_levels)
        memory_config = MemoryConfig.hierarchy(levels, args.merge_group)
        if args.concurrency < 1:
            raise ValueError(f"--concurrency {args.concurrency}: want >= 1")
    except ValueError as e:
        print(f"bwr eval: {e}", file=sys.stderr)
        return 2
    lengths = [parse_size(x) for x in args.lengths.split(",") if x]
    depths = [float(x) for x in args.depths.split(",") if x]
    model = load_model(args.model, args.device, args.seed)
    try:
        SessionMemory.for_model(model.config, memory_config)  # the hierarchy fits the model
    except ValueError as e:
        print(f"bwr eval: --memory-levels/--merge-group: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    opts = "".join(f"  {k} {v}" for k, v in extra.items())
    print(f"task {args.task}{opts}  model {args.model}  n {args.n}  device {args.device}")

    def go(url: str | None) -> Report:
        return asyncio.run(
            evaluate(
                model,
                args.task,
                lengths,
                depths,
                args.n,
                nats_url=url,
                device=args.device,
                seed=args.seed,
                workers=args.memory_workers,
                settle_s=args.settle,
                model_name=args.model,
                memory_config=memory_config,
                concurrency=args.concurrency,
                **extra,
            )
        )

    if args.no_memory:
        print("memory: off (--no-memory: memory_capacity 0, the recurrent state alone)")
        report = go(None)
    elif args.nats_url:
        print(f"memory: on (consolidation over {args.nats_url})")
        report = go(args.nats_url)
    else:
        with tempfile.TemporaryDirectory(prefix="bwr-eval-nats-") as tmp:
            try:
                server = NatsServer(Path(tmp) / "nats")
                url = server.start()
            except NatsServerError as e:
                print(f"bwr eval: {e}; or run with --no-memory", file=sys.stderr)
                return 1
            try:
                print(f"memory: on (embedded nats-server {url}, pid {server.pid})")
                report = go(url)
            finally:
                server.stop()
    print(table(report, depths))
    print(f"state per session: {report.state_bytes_per_session:,} B (constant in the length)")
    if report.memory:
        print(
            f"memory: capacity {report.memory_capacity} slots, levels {report.memory_levels}"
            f" merging {report.merge_group}; {report.consolidation}"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report.to_json(), f, indent=2)
        print(f"wrote {args.json}")
    return 0
