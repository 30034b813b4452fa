"""What a slot holds across steps: closed segments out to memory, memory versions in (read by
the model, announced to the caller), and snapshots that restore bit-exactly."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from engine import Engine, FinishReason, MemoryNotice, MemoryUpdate, SamplingParams
from model import ByteLM, MemorySlots, age_bucket
from model.lm import ReadBlock
from tests.engine.reference import CONFIG, Reader, RefSession, engine_config, reference, until

pytestmark = pytest.mark.usefixtures("pipelined")

# ----- memory -----


class FakeMemory:
    """MemoryHooks that records closed segments and serves the updates it is given."""

    def __init__(self) -> None:
        self.segments: list[tuple[str, int, int, Tensor]] = []
        self.ready: list[MemoryUpdate] = []
        self.forgotten: list[str] = []

    def segment_closed(self, session: str, index: int, start: int, hidden: Tensor) -> None:
        self.segments.append((session, index, start, hidden.clone()))

    def take_updates(self) -> list[MemoryUpdate]:
        out, self.ready = self.ready, []
        return out

    def forget(self, session: str) -> None:
        self.forgotten.append(session)


async def test_segments_close_with_the_models_hidden_states(model: ByteLM) -> None:
    S = CONFIG.segment_len
    hooks = FakeMemory()
    prompt = bytes(range(60, 100))  # 40 bytes: prefill chunks of 12 straddle segment ends
    p = SamplingParams(max_bytes=30, temperature=0.0)
    async with Engine(model, engine_config(memory_capacity=4, prefill_chunk=12), hooks) as engine:
        s = engine.open()
        s.submit(prompt, p)
        out, _ = await Reader(s).turn()
        await until(
            lambda: (
                s.context_bytes == len(prompt) + len(out)
                and not engine.scheduler.seqs[s.id].pending
            )
        )
        await until(lambda: len(hooks.segments) == (len(prompt) + len(out)) // S)
        sid = s.id
        assert engine.metrics.segments_closed == len(hooks.segments)
        assert hooks.forgotten == []
        await s.close()
        assert hooks.forgotten == [sid]  # a closed session is forgotten by the memory system
    fed = torch.tensor([list(prompt + out)])
    with torch.no_grad():
        capture = model.run(fed).capture[0]  # (T, D)
    assert [(sess, i, start) for sess, i, start, _ in hooks.segments] == [
        (sid, i, i * S) for i in range(len(hooks.segments))
    ]
    for _, _, start, hidden in hooks.segments:
        assert hidden.shape == (S, CONFIG.d_model)
        assert torch.allclose(hidden, capture[start : start + S], atol=1e-4), start


async def test_installed_memory_is_read_and_announced(model: ByteLM) -> None:
    for block in model.blocks:
        if isinstance(block, ReadBlock):
            block.read.gate.bias.data.fill_(4.0)  # open the read's gate: memory moves the logits
    M, D = 4, CONFIG.d_model
    gen = torch.Generator().manual_seed(7)
    mem = MemorySlots(
        slots=torch.randn(1, M, D, generator=gen) * 3,
        level=torch.tensor([[1, 1, 2, 1]]),
        age=torch.zeros(1, M, dtype=torch.long),
        mask=torch.tensor([[True, True, True, False]]),
    )
    written = torch.zeros(M, dtype=torch.long)
    seen = MemorySlots(
        mem.slots, mem.level, age_bucket(torch.zeros(1, M), CONFIG.age_buckets), mem.mask
    )
    prompt = b"memory"  # prompt and output stay in segment 0: every age is 0
    p = SamplingParams(max_bytes=8, temperature=0.0)
    with_mem, without = RefSession(model, seen), RefSession(model)
    with_mem.feed(prompt)
    without.feed(prompt)
    assert with_mem.logits is not None and without.logits is not None
    assert (with_mem.logits - without.logits).abs().max() > 1e-2, "the fixture's memory must matter"
    want, _ = with_mem.generate(p)

    hooks = FakeMemory()
    cfg = engine_config(memory_capacity=M, threaded_steps=False)
    async with Engine(model, cfg, hooks) as engine:
        s = engine.open()
        r = Reader(s)
        hooks.ready.append(MemoryUpdate(s.id, 3, mem, written, levels=[{"level": 1, "slots": 3}]))
        await until(lambda: engine.memory_versions.get(s.id) == 3)
        s.submit(prompt, p)
        out, done = await r.turn()
        assert r.notices == [MemoryNotice(3, [{"level": 1, "slots": 3}])]
        assert out == want and done.reason is FinishReason.LENGTH
        await until(lambda: not engine.scheduler.seqs[s.id].pending)  # the last byte is read back
        slot = engine.scheduler.seqs[s.id].slot
        logits = engine.runner.logits[slot]
        assert torch.allclose(logits, with_mem.logits[0], atol=1e-4)
        without.feed(want)
        assert (logits - without.logits[0]).abs().max() > 1e-2


# ----- snapshots -----


async def test_snapshot_restores_bit_exactly(model: ByteLM) -> None:
    p = SamplingParams(max_bytes=10, temperature=0.9, seed=21)
    async with Engine(model, engine_config(max_slots=2)) as engine:
        a = engine.open()
        a.submit(b"remember this", SamplingParams(max_bytes=6, temperature=0.0))
        first, _ = await Reader(a).turn()
        snap = await engine.snapshot(a.id)
        await a.close()
        b = engine.open(restore=snap)
        b.submit(b" then", p)
        out, _ = await Reader(b).turn()
    ref = RefSession(model)
    ref.feed(b"remember this")
    assert ref.generate(SamplingParams(max_bytes=6, temperature=0.0))[0] == first
    ref.feed(b" then")
    assert out == ref.generate(p)[0]


async def test_snapshot_of_a_new_session_on_a_used_slot_is_clean(model: ByteLM) -> None:
    """A session opened on a slot another session used, snapshotted before its first step: the
    snapshot holds a zeroed state, not what the slot's last owner left there."""
    p = SamplingParams(max_bytes=8, temperature=0.0)
    async with Engine(model, engine_config(max_slots=1)) as engine:
        a = engine.open()
        a.submit(b"dirty the slot", p)
        await Reader(a).turn()
        await a.close()
        b = engine.open()
        b.submit(b"resume me")
        snap = await engine.snapshot(b.id)
        await b.close()
        c = engine.open(restore=snap)
        c.submit(b"", p)
        out, _ = await Reader(c).turn()
    assert out == reference(model, b"resume me", p)[0]
