"""Training through memory: a long sequence cut into segments, each closed segment compressed into
slots that later segments read.

This is the explicit compression routine the model itself never runs. It mirrors what the engine
and the memory workers do at serving time: the recurrent state flows across segment boundaries,
segment i's captured hidden states become m level-1 slots, and those slots become readable
after a lag of zero or one segment (consolidation is asynchronous at serving time, so the model
learns not to depend on the newest segment being in memory yet).

Shapes: B batch, T bytes, S segment length, D width, m slots per segment.
"""

from __future__ import annotations

import torch
from torch import Tensor

from model.lm import ByteLM, State
from model.memread import MemorySlots, age_bucket


def run_segments(
    model: ByteLM,
    tokens: Tensor,
    *,
    segment_len: int | None = None,
    lag: int = 0,
    max_slots: int | None = None,
) -> Tensor:
    """tokens (B, T) -> logits (B, T, V), reading memory compressed from earlier segments.

    lag: segments that pass before a closed segment's slots become readable (0 or 1).
    max_slots: keep at most this many newest slots readable (None: all).
    """
    cfg = model.config
    S = segment_len or cfg.segment_len
    B = tokens.shape[0]
    state: State | None = None
    # (segment index, its slots (B, m, D)). A slot's age is counted as at serving time: the
    # segment being read minus the segment the slot was written from.
    written: list[tuple[int, Tensor]] = []
    logits = []
    for i, seg in enumerate(tokens.split(S, dim=1)):
        visible = [(j, w) for j, w in written if j <= i - 1 - lag]
        if max_slots is not None:
            visible = visible[-max(1, max_slots // cfg.mem_slots) :]
        memory = None
        if visible:
            slots = torch.cat([w for _, w in visible], dim=1)  # (B, M, D)
            ages = torch.tensor(
                [i - j for j, _ in visible for _ in range(cfg.mem_slots)], device=tokens.device
            )
            ages = ages.expand(B, -1)
            memory = MemorySlots(
                slots=slots,
                level=torch.ones_like(ages),
                age=age_bucket(ages, cfg.age_buckets),
                mask=torch.ones_like(ages, dtype=torch.bool),
            )
        out = model.run(seg, state, memory, want_state=True)
        state = out.state
        logits.append(out.logits)
        if seg.shape[1] == S:
            written.append((i, model.compress(out.capture, 1)))
    return torch.cat(logits, dim=1)
