"""The runner computes a slot's memory keys/values ahead of the byte that reads them (after the
step before a segment boundary, and when a version is installed): they equal what a refresh at
the reading step computes, and the decode path itself then has nothing left to compute."""

from __future__ import annotations

import pytest
import torch

from engine import EngineConfig
from engine.runner import Runner
from engine.scheduler import Feed, StepPlan
from model import ByteLM, MemorySlots, ModelConfig


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
def test_keys_values_computed_ahead_equal_a_refresh_at_the_step(device: str) -> None:
    """On a GPU the decode is a graph replay and the keys/values are queued behind it."""
    torch.manual_seed(7)
    cfg = ModelConfig.named("tiny").replace(segment_len=4)
    model = ByteLM(cfg).eval()
    M, n = 5, 3
    runner = Runner(model, EngineConfig(max_slots=4, memory_capacity=M, device=device))
    gen = torch.Generator().manual_seed(3)
    written = torch.tensor([0, 1, 1, 2, 3])
    for slot in range(n):
        runner.install_memory(slot, _memory(M, cfg.d_model, gen), written)
    for step in range(15):
        if step in (5, 9):  # new versions between steps, one of them on a boundary step
            runner.install_memory(step % n, _memory(M, cfg.d_model, gen), written)
        offsets = [step, step + 1, step + 3]  # the slots cross boundaries at different steps
        toks = torch.randint(0, 256, (n,), generator=gen).tolist()
        feeds = tuple(
            Feed(f"s{slot}", slot, bytes([toks[slot]]), offsets[slot], True) for slot in range(n)
        )
        runner.execute(StepPlan((), feeds, (), ()))
        # everything this step read was ready before it: by the installs or the step before
        assert runner.refreshed == (n if step == 0 else 0), step
        for slot in range(n):
            assert runner.next_at[slot] == offsets[slot] + 1
            ahead = _kv(runner, slot)
            runner.kv_segment[slot] = -1  # as if stale: recompute at the reading step's offset
            assert runner._refresh_kv([(slot, offsets[slot] + 1)]) == 1
            for got, want in zip(ahead, _kv(runner, slot), strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_prefill_leaves_the_next_decode_nothing_to_compute() -> None:
    torch.manual_seed(8)
    cfg = ModelConfig.named("tiny").replace(segment_len=4)
    model = ByteLM(cfg).eval()
    runner = Runner(model, EngineConfig(max_slots=2, memory_capacity=5))
    gen = torch.Generator().manual_seed(4)
    runner.install_memory(0, _memory(5, cfg.d_model, gen), torch.tensor([0, 0, 1, 1, 2]))
    runner.execute(StepPlan((), (), (Feed("s", 0, b"hello", 0, True),), ()))
    assert runner.next_at[0] == 5 and runner.kv_segment[0] == 1
    runner.execute(StepPlan((), (Feed("s", 0, b"x", 5, True),), (), ()))
    assert runner.refreshed == 0
    runner.reset_slot(0)  # a new owner: where it reads next is not known until it is fed
    assert runner.next_at[0] == -1 and runner.kv_segment[0] == -1
