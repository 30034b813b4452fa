"""Memory per session is bounded whatever the context length.

Feeds segments worth of bytes (16 MB by default) through one session's SessionMemory with the real
compressor of a model (random weights: what is measured is the store's bookkeeping and size, not
what the slots mean) and reports, at growing context lengths, the recurrent state bytes of one
session, the memory's slots and bytes, and the time per segment. Hidden states of a segment are
random (S, D) tensors drawn from a pool of 64 (drawing a fresh one per segment only costs time).

    .venv/bin/python benchmarks/memory_bound.py --json out/memory_bound.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from memory.config import MemoryConfig
from memory.store import SessionMemory
from model import ByteLM, ModelConfig

KB, MB = 1 << 10, 1 << 20
MARKS = (64 * KB, 256 * KB, 1 * MB, 4 * MB, 16 * MB)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="named model config")
    p.add_argument("--mb", type=float, default=16, help="context to feed, in MB")
    p.add_argument("--levels", default="64,64,64", help="level capacities in slots")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", default=None, help="write the rows here")
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = ModelConfig.named(a.model)
    model = ByteLM(cfg).eval()
    mcfg = MemoryConfig(level_capacities=tuple(int(x) for x in a.levels.split(",")))
    mem = SessionMemory.for_model(cfg, mcfg)
    S, D = cfg.segment_len, cfg.d_model
    total = int(a.mb * MB)
    marks = sorted({m for m in MARKS if m <= total} | {total})
    pool = torch.randn(64, 1, S, D)
    state_bytes = model.state_bytes_per_row()

    def feed(mem: SessionMemory, first: int, n: int) -> SessionMemory:
        with torch.no_grad():
            for seg in range(first, first + n):
                slots = model.compress(pool[seg % 64], 1)[0]  # (m, D)
                mem = mem.apply_segment(seg, slots, (seg * S, (seg + 1) * S), model.compress)
        return mem

    rows = []
    fresh, done = mem, 0
    t0 = time.perf_counter()
    for mark in marks:
        n = mark // S - done
        t = time.perf_counter()
        mem = feed(mem, done, n)
        dt = time.perf_counter() - t
        done += n
        rows.append(
            dict(
                context_bytes=mark,
                segments=done,
                state_bytes=state_bytes,
                memory_slots=mem.slot_count,
                max_slots=mcfg.max_slots,
                memory_bytes=mem.nbytes(),
                serialized_bytes=len(mem.to_bytes()),
                session_bytes=state_bytes + mem.nbytes(),
                bytes_covered=mem.summary()["bytes_covered"],
                ms_per_segment=1e3 * dt / n,
            )
        )
    elapsed = time.perf_counter() - t0
    # Cost per segment early vs late, interleaved so the machine's load hits both alike.
    early, late = [], []
    for _ in range(3):
        t = time.perf_counter()
        feed(fresh, 0, 1000)
        early.append(time.perf_counter() - t)
        t = time.perf_counter()
        feed(mem, done, 1000)
        late.append(time.perf_counter() - t)
    flat = dict(first_1000_ms=min(early) / 1000 * 1e3, after_all_ms=min(late) / 1000 * 1e3)

    head = (
        "context",
        "segments",
        "state B",
        "slots",
        "memory B",
        "serialized B",
        "session B",
        "ms/seg",
    )
    print(
        f"model {cfg.name} (D={D}, S={S}, m={cfg.mem_slots}), levels {mcfg.level_capacities}, "
        f"merge group {mcfg.group_for(cfg.mem_slots)}, {a.threads} torch thread(s)"
    )
    print(" | ".join(f"{h:>12}" for h in head))
    for r in rows:
        ctx = (
            f"{r['context_bytes'] / MB:g} MB"
            if r["context_bytes"] >= MB
            else f"{r['context_bytes'] // KB} KB"
        )
        vals = (
            ctx,
            r["segments"],
            r["state_bytes"],
            f"{r['memory_slots']}/{r['max_slots']}",
            r["memory_bytes"],
            r["serialized_bytes"],
            r["session_bytes"],
            f"{r['ms_per_segment']:.3f}",
        )
        print(" | ".join(f"{v:>12}" for v in vals))
    equal = len({r["memory_bytes"] for r in rows}) == 1
    print(f"memory bytes equal at every mark: {equal}; {elapsed:.1f} s for {done} segments")
    print(
        f"ms per segment, best of 3 runs of 1000, interleaved: first segments"
        f" {flat['first_1000_ms']:.3f}, after {done} segments {flat['after_all_ms']:.3f}"
    )

    if a.json:
        out = dict(
            model=cfg.name,
            levels=list(mcfg.level_capacities),
            merge_group=mcfg.group_for(cfg.mem_slots),
            threads=a.threads,
            machine=platform.machine(),
            processor=platform.processor(),
            date=datetime.now(UTC).isoformat(timespec="seconds"),
            seconds=elapsed,
            memory_bytes_equal=equal,
            ms_per_segment_early_vs_late=flat,
            rows=rows,
        )
        path = Path(a.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
