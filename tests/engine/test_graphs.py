"""CUDA-graph decode equals the eager decode: the same plans through a Runner with graphs and one
without give the same bytes, logits, states, counters and captured hidden states, for batches
that fill a bucket and batches padded up to one. Needs a GPU (skipped without one)."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import random

import pytest
import torch

from engine import Engine, EngineConfig, SamplingParams
from engine.runner import Runner
from engine.scheduler import Feed, StepPlan
from engine.types import Delta, Done
from model import ByteLM, MemorySlots, ModelConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SLOTS = 8
TOL = 1e-4  # batch buckets pad rows, so kernels may differ: equal up to float32 error


def runners() -> tuple[Runner, Runner]:
    torch.manual_seed(0)
    model = ByteLM(ModelConfig.named("tiny")).eval()
    cfg = EngineConfig(max_slots=SLOTS, memory_capacity=4, device="cuda", cuda_graphs=True)
    graphed = Runner(model, cfg, capture_segments=True)
    eager = Runner(
        copy.deepcopy(model), dataclasses.replace(cfg, cuda_graphs=False), capture_segments=True
    )
    assert graphed.graphs is not None and eager.graphs is None
    gen = torch.Generator().manual_seed(1)
    for slot in range(SLOTS):
        params = SamplingParams(
            temperature=0.5 + 0.1 * slot,
            top_k=[0, 5, 40][slot % 3],
            top_p=[1.0, 0.9][slot % 2],
            ignore_eos=slot % 3 == 0,
        )
        mem = MemorySlots(
            torch.randn(1, 4, model.config.d_model, generator=gen),
            torch.ones(1, 4, dtype=torch.long),
            torch.zeros(1, 4, dtype=torch.long),
            torch.rand(1, 4, generator=gen) < 0.7,
        )
        for r in (graphed, eager):
            r.reset_slot(slot)
            r.set_sampling(slot, params, seed=100 + slot, reset_counter=True)
            if slot % 2:
                r.install_memory(slot, mem, torch.zeros(4, dtype=torch.long))
    return graphed, eager


def assert_same(graphed: Runner, eager: Runner) -> None:
    rows = slice(0, SLOTS)  # the scratch row past them takes padded writes
    assert torch.allclose(graphed.logits[rows], eager.logits[rows], atol=TOL)
    assert torch.equal(graphed.counter[rows], eager.counter[rows])
    for k in eager.state:
        assert torch.allclose(graphed.state[k][rows], eager.state[k][rows], atol=TOL, rtol=TOL), k
    assert graphed.seg_buf is not None and eager.seg_buf is not None
    assert torch.allclose(graphed.seg_buf[rows], eager.seg_buf[rows], atol=TOL)


def test_graph_replay_equals_eager_for_every_bucket() -> None:
    graphed, eager = runners()
    rng = random.Random(0)
    pos = [0] * SLOTS
    prompts = [bytes(rng.randrange(256) for _ in range(90 + 5 * i)) for i in range(SLOTS)]
    plan = StepPlan((), (), tuple(Feed(f"s{i}", i, p, 0, True) for i, p in enumerate(prompts)), ())
    out_g, _ = graphed.execute(plan)
    out_e, _ = eager.execute(plan)
    assert out_g == out_e
    pos = [len(p) for p in prompts]
    last = dict(enumerate(out_g))
    seen_buckets, segments = set(), 0
    for n in [
        1,
        2,
        3,
        4,
        5,
        8,
        7,
        6,
        1,
        2,
        8,
        3,
    ] * 12:  # long enough for segments (128 bytes) to close
        slots = rng.sample(range(SLOTS), n)
        feeds = tuple(
            Feed(f"s{s}", s, bytes([last.get(s, 65) % 256]), pos[s], rng.random() < 0.8)
            for s in slots
        )
        plan = StepPlan((), feeds, (), ())
        out_g, closed_g = graphed.execute(plan)
        out_e, closed_e = eager.execute(plan)
        assert out_g == out_e, f"batch of {n}"
        assert [(c.slot, c.index, c.start) for c in closed_g] == [
            (c.slot, c.index, c.start) for c in closed_e
        ]
        for a, b in zip(closed_g, closed_e, strict=True):
            assert torch.allclose(a.hidden, b.hidden, atol=TOL)
        segments += len(closed_g)
        for f, v in zip((f for f in feeds if f.sample), out_g, strict=True):
            last[f.slot] = v
        for s in slots:
            pos[s] += 1
        seen_buckets.add(graphed.graphs.bucket(n))  # type: ignore[union-attr]
    assert_same(graphed, eager)
    assert seen_buckets == set(graphed.cfg.buckets)
    assert segments >= SLOTS, "every slot crosses a segment end (128 bytes) in decode"


def test_engine_with_graphs_gives_the_bytes_of_the_eager_engine() -> None:
    """Graphs and pipelined steps (speculative feeds, EOS skipped on the device, a stop
    sequence's void sample taken back, sample-only rows inside the graph) change no byte: the
    eager engine that collects every step before planning the next gives the same, over three
    turns per session."""
    torch.manual_seed(0)
    model = ByteLM(ModelConfig.named("tiny")).eval()
    prompts = [b"graphs", b"and eager " * 8, b"agree"]
    params = [
        SamplingParams(
            max_bytes=32,
            temperature=t,
            seed=i,
            stop=(b"e",) if i == 2 else (),
            ignore_eos=i == 1,
        )
        for i, t in enumerate((0.0, 0.8, 1.1))
    ]

    async def run(graphs: bool, pipeline: bool) -> list[bytes]:
        cfg = EngineConfig(
            max_slots=4, device="cuda", cuda_graphs=graphs, prefill_chunk=16, pipeline=pipeline
        )
        async with Engine(copy.deepcopy(model), cfg) as engine:
            assert engine.pipelined is pipeline
            sessions = [engine.open() for _ in prompts]
            outs = []
            for turn in range(3):  # a prompt, more input, then no input (sample-only rows)
                for s, p, sp in zip(sessions, prompts, params, strict=True):
                    s.submit((p, b" then", b"")[turn], sp)
                for s in sessions:
                    data = b""
                    while True:
                        batch = await asyncio.wait_for(s.next_batch(), 60)
                        data += b"".join(e.data for e in batch if isinstance(e, Delta))
                        if any(isinstance(e, Done) for e in batch):
                            break
                    outs.append(data)
            return outs

    want = asyncio.run(run(False, False))
    assert asyncio.run(run(True, True)) == want
    assert asyncio.run(run(True, False)) == want
