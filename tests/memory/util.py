"""Helpers of the memory tests: deterministic segments, a cheap compressor, a sequential
reference, and polling with a deadline."""

from __future__ import annotations

import time
import zlib
from collections.abc import Awaitable, Callable

import anyio
import torch
from torch import Tensor

from memory.jobs import ConsolidateJob
from memory.service import MemoryService
from memory.store import SessionMemory
from model import ModelConfig

TINY = ModelConfig.named("tiny")


def cheap_compress(hidden: Tensor, level: int) -> Tensor:
    """(1, L, D) -> (1, m, D): means of m contiguous runs, tagged with the level. Deterministic and
    order-sensitive, so a segment applied twice or out of order changes the result."""
    B, L, D = hidden.shape
    m = TINY.mem_slots
    return hidden.reshape(B, m, L // m, D).mean(2) * 0.5 + level


def slow(
    compress: Callable[[Tensor, int], Tensor], seconds: float
) -> Callable[[Tensor, int], Tensor]:
    def run(hidden: Tensor, level: int) -> Tensor:
        time.sleep(seconds)
        return compress(hidden, level)

    return run


def segment_hidden(session: str, seq: int) -> Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(f"{session}:{seq}".encode()))
    return torch.randn(TINY.segment_len, TINY.d_model, generator=g)  # (S, D)


def job(session: str, seq: int) -> ConsolidateJob:
    S = TINY.segment_len
    return ConsolidateJob.from_tensor(
        session, seq, seq, (seq * S, (seq + 1) * S), segment_hidden(session, seq)
    )


def reference(svc: MemoryService, session: str, n: int) -> SessionMemory:
    """The memory after segments 0..n-1 applied once each, in order, in this process."""
    mem = svc.empty
    for seq in range(n):
        mem = svc.apply(mem, job(session, seq))
    return mem


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    try:
        with anyio.fail_after(timeout):
            while not await check():
                await anyio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


async def all_applied(svc: MemoryService, sessions: list[str], n: int) -> bool:
    for s in sessions:
        ptr, _ = await svc.pointer(s)
        if ptr is None or ptr.last_seq < n - 1:
            return False
    return await svc.pending_jobs() == 0
