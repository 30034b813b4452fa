"""The runner's cached memory keys/values give the same logits as reading the memory directly,
across installs and segment boundaries (where the slots' ages change)."""

from __future__ import annotations

import torch

from engine import EngineConfig
from engine.runner import Runner
from engine.scheduler import Feed, StepPlan
from model import ByteLM, MemorySlots, ModelConfig, age_bucket


def test_cached_memory_kv_matches_direct_reads() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig.named("tiny").replace(segment_len=8)
    model = ByteLM(cfg).eval()
    M = 6
    runner = Runner(model, EngineConfig(max_slots=3, memory_capacity=M))
    ref_state = model.allocate_state(1)
    slot = 1
    mem = MemorySlots(
        torch.randn(1, M, cfg.d_model),
        torch.randint(1, 4, (1, M)),
        torch.zeros(1, M, dtype=torch.long),
        torch.tensor([[True, True, False, True, True, False]]),
    )
    written = torch.tensor([0, 0, 1, 1, 2, 2])
    runner.install_memory(slot, mem, written)
    gen = torch.Generator().manual_seed(1)
    for pos in range(30):  # crosses three segment boundaries
        if pos == 17:  # a new version mid-run
            mem = MemorySlots(
                torch.randn(1, M, cfg.d_model),
                mem.level,
                mem.age,
                torch.ones(1, M, dtype=torch.bool),
            )
            runner.install_memory(slot, mem, written)
        tok = int(torch.randint(0, 256, (1,), generator=gen))
        runner.execute(StepPlan((), (Feed("s", slot, bytes([tok]), pos, False),), (), ()))
        age = age_bucket(
            (pos // cfg.segment_len - written).clamp(min=0), cfg.age_buckets
        ).unsqueeze(0)
        direct = MemorySlots(mem.slots, mem.level, age, mem.mask)
        with torch.no_grad():
            want = model.step(torch.tensor([tok]), ref_state, memory=direct)
        assert torch.allclose(runner.logits[slot], want[0], atol=1e-5), pos
