"""What the engine tests hold a session to, and how they read one.

`RefSession` is the same model driven directly, byte by byte (`model.prefill`, `model.step`) and
sampled with `engine.sampling.sample` on the same seed and counter: the bytes the engine owes a
caller. `Reader` reads a session's events turn by turn.
"""

from __future__ import annotations

import asyncio
from collections import deque

import torch
from torch import Tensor

from engine import Delta, Done, EngineConfig, FinishReason, MemoryNotice, SamplingParams, Session
from engine.sampling import sample
from engine.types import Event
from model import ByteLM, MemorySlots, ModelConfig

TIMEOUT = 30.0  # seconds one turn may take on a loaded CPU

CONFIG = ModelConfig(
    d_model=32,
    layout="HDR",
    mlp_mult=2.0,
    filter_order=4,
    filter_features=8,
    filter_hidden=16,
    delta_heads=2,
    delta_chunk=8,
    read_heads=2,
    read_topk=4,
    segment_len=16,
    mem_slots=2,
    mem_levels=2,
    age_buckets=6,
    compress_heads=2,
    prefill_chunk=64,
)


def make_model(seed: int = 0, config: ModelConfig = CONFIG) -> ByteLM:
    torch.manual_seed(seed)
    return ByteLM(config).eval()


PIPELINE: list[bool | None] = [None]  # set by the `pipelined` fixture (conftest.py)


def engine_config(**changes: object) -> EngineConfig:
    base: dict[str, object] = dict(
        max_slots=4, prefill_budget=24, prefill_chunk=16, idle_wait_s=0.01, pipeline=PIPELINE[0]
    )
    base.update(changes)
    return EngineConfig(**base)  # type: ignore[arg-type]


# ----- the reference -----


class RefSession:
    """One session computed directly: what the engine owes a caller, byte for byte."""

    def __init__(self, model: ByteLM, memory: MemorySlots | None = None) -> None:
        self.model = model
        self.state = model.allocate_state(1)
        self.memory = memory
        self.logits: Tensor | None = None
        self.counter = 0
        self.fed = bytearray()

    def feed(self, data: bytes) -> None:
        if not data:
            return
        tokens = torch.tensor([list(data)])
        if len(data) == 1:
            out = self.model.step(tokens[:, 0], self.state, memory=self.memory)
        else:
            out = self.model.prefill(tokens, self.state, memory=self.memory)
        assert isinstance(out, Tensor)
        self.logits = out
        self.fed += data

    def generate(self, p: SamplingParams) -> tuple[bytes, FinishReason]:
        if p.seed is not None:
            self.counter = 0  # an explicit seed restarts the counter
        out = bytearray()
        while True:
            assert self.logits is not None
            logits = self.logits.clone()
            if p.ignore_eos:
                logits[:, 257] = float("-inf")  # what ignore_eos means, written out
            byte = int(
                sample(
                    logits,
                    torch.tensor([p.temperature]),
                    torch.tensor([p.top_k]),
                    torch.tensor([p.top_p]),
                    torch.tensor([(p.seed or 0) & 0xFFFFFFFF]),
                    torch.tensor([self.counter]),
                ).item()
            )
            self.counter += 1
            if byte >= 256:
                return bytes(out), FinishReason.EOS
            out.append(byte)
            self.feed(bytes([byte]))  # the engine reads every sampled byte back, the last one too
            hit = next((s for s in p.stop if out.endswith(s)), None)
            if hit is not None:
                return bytes(out[: len(out) - len(hit)]), FinishReason.STOP
            if len(out) >= p.max_bytes:
                return bytes(out), FinishReason.LENGTH


def reference(
    model: ByteLM, prompt: bytes, p: SamplingParams, memory: MemorySlots | None = None
) -> tuple[bytes, FinishReason]:
    ref = RefSession(model, memory)
    ref.feed(prompt)
    return ref.generate(p)


# ----- reading a session -----


class Reader:
    """Reads a session's events turn by turn (events after a Done wait for the next turn)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.pending: deque[Event] = deque()
        self.notices: list[MemoryNotice] = []

    async def turn(self, timeout: float = TIMEOUT) -> tuple[bytes, Done]:
        data = bytearray()
        while True:
            while self.pending:
                ev = self.pending.popleft()
                if isinstance(ev, Delta):
                    data += ev.data
                elif isinstance(ev, Done):
                    return bytes(data), ev
                else:
                    self.notices.append(ev)
            batch = await asyncio.wait_for(self.session.next_batch(), timeout)
            assert batch or not self.session.collector.closed, "session closed without a Done"
            self.pending.extend(batch)

    async def first_delta(self, timeout: float = TIMEOUT) -> bytes:
        while True:
            batch = await asyncio.wait_for(self.session.next_batch(), timeout)
            self.pending.extend(batch)
            got = b"".join(e.data for e in batch if isinstance(e, Delta))
            if got:
                return got


async def until(cond: object, timeout: float = TIMEOUT) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.005)
