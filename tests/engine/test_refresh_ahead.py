"""The runner computes a slot's memory keys/values once per version, at install: crossing a
segment boundary (where every slot's age changes) recomputes nothing, and the step's reads still
equal direct reads of the memory with each byte's ages (the age terms enter inside the step)."""

from __future__ import annotations

import pytest
import torch

from engine import EngineConfig
from engine.runner import Runner
from engine.scheduler import Feed, StepPlan
from model import ByteLM, MemorySlots, ModelConfig, age_bucket


def _memory(M: int, D: int, gen: torch.Generator) -> MemorySlots:
    return MemorySlots(
        torch.randn(1, M, D, generator=gen),
        torch.randint(1, 4, (1, M), generator=gen),
        torch.zeros(1, M, dtype=torch.long),
        torch.rand(1, M, generator=gen) < 0.8,
    )


def _kv(runner: Runner, slot: int) -> list[torch.Tensor]:
    return [t[slot].clone() for kv in runner.mem_kv.values() for t in kv]


GPU = pytest.param(
    "cuda",
    marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ],
)


@pytest.mark.parametrize("device", ["cpu", GPU])
def test_segment_boundaries_recompute_nothing_and_reads_stay_exact(device: str) -> None:
    """On a GPU the decode is a graph replay: the ages are computed inside it."""
    torch.manual_seed(7)
    cfg = ModelConfig.named("tiny").replace(segment_len=4)
    model = ByteLM(cfg).eval().to(device)
    M, n = 5, 3
    runner = Runner(model, EngineConfig(max_slots=4, memory_capacity=M, device=device))
    gen = torch.Generator().manual_seed(3)
    written = torch.tensor([0, 1, 1, 2, 3])
    mems = [_memory(M, cfg.d_model, gen) for _ in range(n)]
    refs = [model.allocate_state(1, device=device) for _ in range(n)]
    for slot in range(n):
        runner.install_memory(slot, mems[slot], written)
    for step in range(15):
        installed = None
        if step in (5, 9):  # new versions between steps, one of them on a boundary step
            installed = step % n
            mems[installed] = _memory(M, cfg.d_model, gen)
            runner.install_memory(installed, mems[installed], written)
        before = [_kv(runner, slot) for slot in range(n)]
        offsets = [step, step + 1, step + 3]  # the slots cross boundaries at different steps
        toks = torch.randint(0, 256, (n,), generator=gen).tolist()
        feeds = tuple(
            Feed(f"s{slot}", slot, bytes([toks[slot]]), offsets[slot], True) for slot in range(n)
        )
        runner.execute(StepPlan((), feeds, (), ()))
        for slot in range(n):
            # the step wrote no keys/values: they are the install's, whatever the ages
            for got, want in zip(_kv(runner, slot), before[slot], strict=True):
                assert torch.equal(got, want), (step, slot)
            age = age_bucket(
                (offsets[slot] // cfg.segment_len - written).clamp(min=0), cfg.age_buckets
            ).unsqueeze(0)
            m = mems[slot]
            direct = MemorySlots(*(t.to(device) for t in (m.slots, m.level, age, m.mask)))
            with torch.no_grad():
                want = model.step(
                    torch.tensor([toks[slot]], device=device), refs[slot], memory=direct
                )
            torch.testing.assert_close(runner.logits[slot], want[0], rtol=1e-4, atol=1e-4)


def test_slots_without_a_version_read_an_empty_memory() -> None:
    """A slot never given a version, and one reset for a new session, read only the null slot
    (as a direct read of no memory does) until their first install."""
    torch.manual_seed(8)
    cfg = ModelConfig.named("tiny").replace(segment_len=4)
    model = ByteLM(cfg).eval()
    runner = Runner(model, EngineConfig(max_slots=2, memory_capacity=5))
    gen = torch.Generator().manual_seed(4)
    runner.install_memory(0, _memory(5, cfg.d_model, gen), torch.tensor([0, 0, 1, 1, 2]))
    runner.reset_slot(0)
    feeds = (Feed("a", 0, b"x", 0, True), Feed("b", 1, b"x", 0, True))
    runner.execute(StepPlan((), feeds, (), ()))
    with torch.no_grad():
        want = model.step(torch.tensor([ord("x")]), model.allocate_state(1), memory=None)
    for slot in (0, 1):
        torch.testing.assert_close(runner.logits[slot], want[0], rtol=1e-5, atol=1e-5)


def test_bfloat16_decode_caches_keys_values_in_bfloat16() -> None:
    """Beside bfloat16 weights the cache halves what each step gathers; the reads stay within
    bfloat16 rounding of the float32 cache's."""
    torch.manual_seed(9)
    cfg = ModelConfig.named("tiny").replace(segment_len=4)
    model = ByteLM(cfg).eval()
    gen = torch.Generator().manual_seed(5)
    mem = _memory(5, cfg.d_model, gen)
    written = torch.tensor([0, 0, 1, 1, 2])
    logits = {}
    for dtype in ("float32", "bfloat16"):
        runner = Runner(model, EngineConfig(max_slots=2, memory_capacity=5, decode_dtype=dtype))
        assert all(K.dtype == getattr(torch, dtype) for K, _, _ in runner.mem_kv.values())
        runner.install_memory(0, mem, written)
        for pos, tok in enumerate(b"memory"):
            runner.execute(StepPlan((), (Feed("s", 0, bytes([tok]), pos, False),), (), ()))
        logits[dtype] = runner.logits[0].clone()
    torch.testing.assert_close(logits["bfloat16"], logits["float32"], rtol=0.05, atol=0.05)
    assert not torch.equal(logits["bfloat16"], logits["float32"])  # the cache was bfloat16
