"""run.py: the eval runner. Streams each case through the real engine (one session per case,
the same submit/events path callers take), decodes greedily len(answer) bytes per turn, scores
exact match, prints a length x depth table and writes JSON.

It owns no model code and no memory system: memory hooks need NATS, so this runner runs with the
memory read off and says so in its output. Only `main` reads the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from engine import Busy, Delta, Done, Engine, EngineConfig, SamplingParams, Session
from model import ByteLM, ModelConfig
from model.config import PRESETS
from model.evals.args import add_arguments
from model.evals.tasks import TASKS, Case, parse_size

PIECE = 256 << 10  # bytes per submit: a 16 MB prompt is never copied whole into the inbox


@dataclass
class Cell:
    length: int
    depth: float
    correct: int = 0  # turns answered exactly
    turns: int = 0
    bytes_in: int = 0
    seconds: float = 0.0
    samples: list[dict[str, str]] = field(default_factory=list)  # first few (want, got)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.turns)


async def _turn(session: Session, prompt: bytes, n: int) -> bytes:
    """Submit `prompt` in pieces, the last with a greedy n-byte turn; return what came out."""
    view = memoryview(prompt)
    for at in range(0, len(prompt), PIECE):
        last = at + PIECE >= len(prompt)
        params = SamplingParams(max_bytes=n, temperature=0.0, seed=0) if last else None
        while True:
            try:
                session.submit(bytes(view[at : at + PIECE]), params)
                break
            except Busy:  # the inbox is full: wait for the engine to read it
                await asyncio.sleep(0.005)
    out = bytearray()
    async for ev in session.events():
        if isinstance(ev, Delta):
            out += ev.data
        elif isinstance(ev, Done):
            break
    return bytes(out)


async def run_case(engine: Engine, case: Case) -> list[tuple[bytes, bytes]]:
    """(want, got) per turn of one case, in a fresh session."""
    session = engine.open(binary=True)
    try:
        return [(want, await _turn(session, p, len(want))) for p, want in case.turns]
    finally:
        await session.close()


async def evaluate(
    model: ByteLM,
    task: str,
    lengths: list[int],
    depths: list[float],
    n: int,
    *,
    device: str = "cpu",
    seed: int = 0,
    **task_args: Any,
) -> list[Cell]:
    """Every (length, depth) cell over n seeded cases, one session at a time."""
    gen = TASKS[task]
    cfg = EngineConfig(max_slots=1, device=device, memory_capacity=0, idle_wait_s=0.005)
    cells = []
    async with Engine(model, cfg) as engine:
        for length in lengths:
            for depth in depths:
                cell = Cell(length, depth)
                for i in range(n):
                    case = gen(length, depth, seed + i, **task_args)
                    t0 = time.perf_counter()
                    scored = await run_case(engine, case)
                    cell.seconds += time.perf_counter() - t0
                    cell.bytes_in += sum(len(p) for p, _ in case.turns)
                    for want, got in scored:
                        cell.turns += 1
                        cell.correct += want == got
                        if len(cell.samples) < 3:
                            cell.samples.append(
                                {"want": want.decode("latin-1"), "got": got.decode("latin-1")}
                            )
                cells.append(cell)
    return cells


def table(cells: list[Cell], depths: list[float]) -> str:
    lines = [f"{'length':>10} " + " ".join(f"{f'd={d:g}':>8}" for d in depths) + f" {'B/s':>10}"]
    for length in sorted({c.length for c in cells}):
        row = [c for c in cells if c.length == length]
        rate = sum(c.bytes_in for c in row) / max(1e-9, sum(c.seconds for c in row))
        accs = {c.depth: c.accuracy for c in row}
        lines.append(
            f"{length:>10} "
            + " ".join(f"{100 * accs.get(d, 0.0):>7.1f}%" for d in depths)
            + f" {rate:>10,.0f}"
        )
    return "\n".join(lines)


def load_model(name: str, device: str, seed: int = 0) -> ByteLM:
    """A checkpoint directory, or a named config with seeded random weights."""
    if name in PRESETS:
        torch.manual_seed(seed)
        return ByteLM(ModelConfig.named(name)).to(device).eval()
    return ByteLM.load(name, device).eval()


def run(args: argparse.Namespace) -> int:
    lengths = [parse_size(x) for x in args.lengths.split(",") if x]
    depths = [float(x) for x in args.depths.split(",") if x]
    model = load_model(args.model, args.device, args.seed)
    print(f"task {args.task}  model {args.model}  n {args.n}  device {args.device}")
    print("memory: off (consolidation needs NATS hooks; this runner reads recurrent state only)")
    cells = asyncio.run(
        evaluate(model, args.task, lengths, depths, args.n, device=args.device, seed=args.seed)
    )
    print(table(cells, depths))
    state = model.state_bytes_per_row()
    print(f"state per session: {state:,} B (constant in the length)")
    if args.json:
        out = {
            "task": args.task,
            "model": args.model,
            "memory": False,
            "state_bytes_per_session": state,
            "cells": [
                {
                    **asdict(c),
                    "accuracy": c.accuracy,
                    "bytes_per_s": c.bytes_in / max(c.seconds, 1e-9),
                }
                for c in cells
            ],
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bwr eval", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
