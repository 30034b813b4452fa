"""Training through memory: a long sequence cut into segments, each closed segment compressed into
slots that later segments read.

This is the explicit compression routine the model itself never runs. It mirrors what the engine
and the memory workers do at serving time: the recurrent state flows across segment boundaries,
segment i's captured hidden states become m level-1 slots, and those slots become readable
after a lag of zero or one segment (consolidation is asynchronous at serving time, so the model
learns not to depend on the newest segment being in memory yet).

With a `Hierarchy` the slots go through the serving-time consolidation policy of
memory/store.py, batched and differentiable: a level about to overflow compresses its oldest
`merge_group` slots into m slots of the next level (the top level keeps them, in its oldest
place), so the compressor learns the merges the workers run, not only the first compression.
Without one, every slot stays at level 1 (one unbounded level).

`drop` zeroes the recurrent state of chosen rows at segment boundaries: what those rows knew
before the boundary then reaches later segments only through memory, so the read is trained to
carry what the state cannot (at serving time, bytes further back than the state's reach).

`state` starts rows from a given recurrent state instead of zeros, and `want_state` returns the
state after the last byte: the trainer passes one batch's final states on as the next batch's
initial ones (`TrainConfig.state_pass`), so a model trained on short rows meets the states that
long sessions reach.

Shapes: B batch, T bytes, S segment length, D width, m slots per segment, G merge group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, overload

import torch
from torch import Tensor

from model.lm import ByteLM, State
from model.memread import MemorySlots, age_bucket


@dataclass(frozen=True)
class Hierarchy:
    """The level capacities (slots, level 1 first) and merge group of memory/config.py's
    MemoryConfig, for training. merge_group 0 means 4 * m, as there."""

    capacities: tuple[int, ...]
    merge_group: int = 0

    def group(self, mem_slots: int) -> int:
        return self.merge_group or 4 * mem_slots

    def check(self, mem_slots: int, mem_levels: int) -> None:
        m, G = mem_slots, self.group(mem_slots)
        if not self.capacities or len(self.capacities) > mem_levels:
            raise ValueError(f"{len(self.capacities)} levels: want 1 to {mem_levels}")
        if G % m or 2 * m > G or any(c % m or c < G for c in self.capacities):
            raise ValueError(
                f"capacities {self.capacities}, merge group {G}: each a multiple of m={m},"
                f" the group at least 2m and every capacity at least the group"
            )


# One version of a batch's memory: per level (level 1 first) its slots (B, n, D), oldest first,
# and the segment index each slot was written from (for ages).
Levels = tuple[tuple[Tensor, tuple[int, ...]], ...]


def _push(
    model: ByteLM, levels: list[tuple[Tensor, tuple[int, ...]]], i: int, slots: Tensor,
    segs: tuple[int, ...], caps: tuple[int, ...], G: int,
) -> None:  # fmt: skip
    """memory/store.py's SessionMemory._push for a batch, with autograd."""
    top = len(levels) - 1
    have, tags = levels[i]
    if have.shape[1] + slots.shape[1] > caps[i]:
        old, old_tags = have[:, :G], tags[:G]
        have, tags = have[:, G:], tags[G:]
        target = min(i + 2, top + 1)  # levels are numbered from 1; the top merges into itself
        merged = model.compress(old, target)  # (B, m, D)
        merged_tags = (max(old_tags),) * merged.shape[1]
        if i < top:
            levels[i] = (have, tags)
            _push(model, levels, i + 1, merged, merged_tags, caps, G)
            have, tags = levels[i]
        else:
            have, tags = _cat(merged, have), merged_tags + tags
    levels[i] = (_cat(have, slots), tags + segs)


def _cat(a: Tensor, b: Tensor) -> Tensor:
    """a then b along the slots (an empty level takes b as it is: its dtype, under autocast)."""
    return torch.cat([a, b], 1) if a.shape[1] and b.shape[1] else a if a.shape[1] else b


def _read(levels: Levels, current: int, buckets: int, max_slots: int | None) -> MemorySlots | None:
    """What a read at segment `current` sees, in the engine's order: level 1 first, newest first
    within a level (so a cut keeps the newest, finest slots)."""
    slots, level, ages = [], [], []
    for li, (s, tags) in enumerate(levels, start=1):
        if s.shape[1]:
            slots.append(s.flip(1))
            level += [li] * s.shape[1]
            ages += [current - t for t in reversed(tags)]
    if not slots:
        return None
    x = torch.cat(slots, 1)
    n = x.shape[1] if max_slots is None else min(max_slots, x.shape[1])
    B, dev = x.shape[0], x.device
    age = torch.tensor(ages[:n], device=dev).expand(B, -1)
    return MemorySlots(
        slots=x[:, :n],
        level=torch.tensor(level[:n], device=dev).expand(B, -1),
        age=age_bucket(age, buckets),
        mask=torch.ones(B, n, dtype=torch.bool, device=dev),
    )


def zero_rows(state: State, keep: Tensor) -> State:
    """Zero the rows of every state tensor where keep (B,) is False (zeros: a fresh state)."""
    return {k: v * keep.view(-1, *([1] * (v.dim() - 1))).to(v.dtype) for k, v in state.items()}


@overload
def run_segments(
    model: ByteLM,
    tokens: Tensor,
    *,
    segment_len: int | None = ...,
    lag: int = ...,
    max_slots: int | None = ...,
    hierarchy: Hierarchy | None = ...,
    drop: Tensor | None = ...,
    state: State | None = ...,
    want_state: Literal[False] = ...,
) -> Tensor: ...
@overload
def run_segments(
    model: ByteLM,
    tokens: Tensor,
    *,
    segment_len: int | None = ...,
    lag: int = ...,
    max_slots: int | None = ...,
    hierarchy: Hierarchy | None = ...,
    drop: Tensor | None = ...,
    state: State | None = ...,
    want_state: Literal[True],
) -> tuple[Tensor, State]: ...
def run_segments(
    model: ByteLM,
    tokens: Tensor,
    *,
    segment_len: int | None = None,
    lag: int = 0,
    max_slots: int | None = None,
    hierarchy: Hierarchy | None = None,
    drop: Tensor | None = None,
    state: State | None = None,
    want_state: bool = False,
) -> Tensor | tuple[Tensor, State]:
    """tokens (B, T) -> logits (B, T, V), reading memory compressed from earlier segments.

    lag: segments that pass before a closed segment's slots become readable (0 or 1).
    max_slots: keep at most this many slots readable, the newest and finest (None: all).
    hierarchy: consolidate as the memory workers do (None: one unbounded level).
    drop: (n, B) bool: row b's recurrent state is zeroed before segment i + 1 where drop[i, b]
    (None, or a boundary past the n given: never).
    state: the recurrent state the rows start from (None: zeros); want_state: return
    (logits, the state after the last byte).
    """
    cfg = model.config
    S = segment_len or cfg.segment_len
    if hierarchy is not None:
        hierarchy.check(cfg.mem_slots, cfg.mem_levels)
        caps, G = hierarchy.capacities, hierarchy.group(cfg.mem_slots)
    else:
        caps, G = (1 << 62,), 0
    empty = tokens.new_zeros(tokens.shape[0], 0, cfg.d_model, dtype=torch.float32)
    # The memory once i and once i - 1 segments are applied (segment i reads one of them, by the
    # lag). A slot's age is counted as at serving time: the segment being read minus the segment
    # the slot was written from.
    now: Levels = tuple((empty, ()) for _ in caps)
    before = now
    logits = []
    for i, seg in enumerate(tokens.split(S, dim=1)):
        if drop is not None and state is not None and 0 < i <= drop.shape[0]:
            state = zero_rows(state, ~drop[i - 1])
        memory = _read(before if lag else now, i, cfg.age_buckets, max_slots)
        out = model.run(seg, state, memory, want_state=True)
        state = out.state
        logits.append(out.logits)
        if seg.shape[1] == S:
            work = list(now)
            slots = model.compress(out.capture, 1)
            _push(model, work, 0, slots, (i,) * slots.shape[1], caps, G)
            before, now = now, tuple(work)
    out_logits = torch.cat(logits, dim=1)
    if want_state:
        assert state is not None  # a run gives its state back whenever one was asked for
        return out_logits, state
    return out_logits
