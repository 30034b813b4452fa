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


def test_last_read_reports_the_slots_the_step_picked() -> None:
    """Runner.last_read names the slots the decode step's top-k picked, as (level, place from the
    level's newest slot), matching a direct read of the same memory; memory slots installed in
    read order (level 1 newest first, then level 2)."""
    torch.manual_seed(3)
    cfg = ModelConfig.named("tiny").replace(segment_len=8, read_topk=3)
    model = ByteLM(cfg).eval()
    M = 8
    runner = Runner(model, EngineConfig(max_slots=2, memory_capacity=M))
    slot = 0
    assert runner.last_read(slot) == {
        "at": -1,
        "heads": runner.picks.shape[1] * cfg.read_heads,
        "k": 3,
        "null": 0,
        "slots": [],
        "earlier_version": False,
    }
    level = torch.tensor([[1, 1, 1, 2, 2, 2, 2, 1]])  # the last one is not valid
    mask = torch.tensor([[True] * 7 + [False]])
    mem = MemorySlots(
        torch.randn(1, M, cfg.d_model), level, torch.zeros(1, M, dtype=torch.long), mask
    )
    written = torch.zeros(M, dtype=torch.long)
    runner.install_memory(slot, mem, written)
    runner.execute(StepPlan((), (Feed("s", slot, b"x", 5, False),), (), ()))
    picks: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        direct = MemorySlots(mem.slots, level, torch.zeros_like(level), mask)
        model.step(torch.tensor([ord("x")]), model.allocate_state(1), memory=direct, picks=picks)
    want: dict[tuple[int, int], int] = {}
    null = 0
    for j in torch.cat([p.flatten() for p in picks.values()]).tolist():
        if j < 0:
            null += 1
        elif j < 3:
            want[(1, j)] = want.get((1, j), 0) + 1
        else:
            want[(2, j - 3)] = want.get((2, j - 3), 0) + 1
    got = runner.last_read(slot)
    assert got is not None and got["at"] == 5 and got["null"] == null
    assert {(s["level"], s["from_newest"]): s["heads"] for s in got["slots"]} == want
    assert sum(want.values()) + null == len(picks) * cfg.read_heads * 3
    assert got["earlier_version"] is False
    # a new version changes the layout the picks index: the read is kept as it was made, marked
    runner.install_memory(slot, MemorySlots(mem.slots.flip(1), level, mem.age, mask), written)
    kept = runner.last_read(slot)
    assert kept == {**got, "earlier_version": True}
    runner.execute(StepPlan((), (Feed("s", slot, b"y", 6, False),), (), ()))
    fresh = runner.last_read(slot)
    assert fresh is not None and fresh["at"] == 6 and fresh["earlier_version"] is False
    runner.reset_slot(slot)
    assert runner.last_read(slot)["at"] == -1


def test_batched_refresh_of_many_slots_matches_direct_reads() -> None:
    """Several sessions cross segment boundaries and get new versions in the same steps: one
    batched refresh serves them all, each as if it were read directly."""
    torch.manual_seed(5)
    cfg = ModelConfig.named("tiny").replace(segment_len=4)
    model = ByteLM(cfg).eval()
    M, n = 5, 3
    runner = Runner(model, EngineConfig(max_slots=4, memory_capacity=M))
    refs = [model.allocate_state(1) for _ in range(n)]
    mems = []
    written = torch.tensor([0, 1, 1, 2, 3])
    for slot in range(n):
        mem = MemorySlots(
            torch.randn(1, M, cfg.d_model),
            torch.randint(1, 4, (1, M)),
            torch.zeros(1, M, dtype=torch.long),
            torch.rand(1, M) < 0.8,
        )
        runner.install_memory(slot, mem, written)
        mems.append(mem)
    gen = torch.Generator().manual_seed(2)
    for pos in range(14):
        if pos == 9:  # new versions for two sessions between the same two steps
            for slot in (0, 2):
                mems[slot] = MemorySlots(
                    torch.randn(1, M, cfg.d_model),
                    mems[slot].level,
                    mems[slot].age,
                    torch.ones(1, M, dtype=torch.bool),
                )
                runner.install_memory(slot, mems[slot], written)
        toks = torch.randint(0, 256, (n,), generator=gen).tolist()
        offsets = [pos, pos + 2, pos + 3]  # the sessions cross boundaries at different steps
        feeds = tuple(
            Feed(f"s{slot}", slot, bytes([toks[slot]]), offsets[slot], False) for slot in range(n)
        )
        runner.execute(StepPlan((), feeds, (), ()))
        for slot in range(n):
            age = age_bucket(
                (offsets[slot] // cfg.segment_len - written).clamp(min=0), cfg.age_buckets
            ).unsqueeze(0)
            m = mems[slot]
            with torch.no_grad():
                want = model.step(
                    torch.tensor([toks[slot]]),
                    refs[slot],
                    memory=MemorySlots(m.slots, m.level, age, m.mask),
                )
            assert torch.allclose(runner.logits[slot], want[0], atol=1e-5), (pos, slot)
