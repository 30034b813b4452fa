"""SessionMemory: the consolidation policy's invariants, reads, and the byte format."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memory.config import MemoryConfig
from memory.store import MemoryFormatError, SequenceError, SessionMemory
from model import ByteLM, ModelConfig
from model.memread import NAMESPACE_LEVEL, age_bucket
from tests.memory.util import cheap_compress

D, M = 8, 4  # small width for the property tests; m = 4 slots per compression


def mean_compress(hidden: torch.Tensor, level: int) -> torch.Tensor:
    """(1, L, D) -> (1, M, D) for any L divisible by M."""
    B, L, Dh = hidden.shape
    return hidden.reshape(B, M, L // M, Dh).mean(2) + 0.001 * level


def feed(mem: SessionMemory, n: int, seg_len: int = 64, first: int = 0) -> SessionMemory:
    for i in range(first, first + n):
        slots = torch.randn(M, mem.dim)
        mem = mem.apply_segment(i, slots, (i * seg_len, (i + 1) * seg_len), mean_compress)
    return mem


def check_invariants(mem: SessionMemory, n: int, seg_len: int) -> None:
    caps = [lvl.capacity for lvl in mem.levels]
    assert mem.slot_count <= sum(caps)
    for lvl in mem.levels:
        assert lvl.count <= lvl.capacity and lvl.count % M == 0
    spans = mem.spans()  # oldest bytes first: top level ... level 1
    assert [lv for lv, _, _ in spans] == sorted((lv for lv, _, _ in spans), reverse=True)
    if n:
        assert spans[0][1] == 0 and spans[-1][2] == n * seg_len  # covers every byte given
    for (_, _, end), (_, start, _) in itertools.pairwise(spans):
        assert end == start  # contiguous, no overlap, ordered
    assert mem.version == n and mem.last_seq == n - 1
    assert sum(lv["bytes_covered"] for lv in mem.level_summaries()) == n * seg_len


@settings(max_examples=40, deadline=None)
@given(
    caps=st.lists(st.integers(2, 6), min_size=1, max_size=4),
    group=st.integers(2, 3),
    n=st.integers(0, 120),
    seg_len=st.integers(1, 300),
)
def test_policy_bounded_ordered_covering(caps: list[int], group: int, n: int, seg_len: int) -> None:
    G = group * M
    capacities = tuple(max(c * M, G) for c in caps)
    mem = SessionMemory.empty(D, M, capacities, G)
    versions = [mem.version]
    for i in range(n):
        mem = feed(mem, 1, seg_len, first=i)
        versions.append(mem.version)
        assert mem.slot_count <= sum(capacities)
    assert versions == sorted(set(versions))  # strictly increasing
    check_invariants(mem, n, seg_len)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 80), dtype_scale=st.floats(1e-30, 1e30))
def test_serialise_round_trip_bit_exact(n: int, dtype_scale: float) -> None:
    mem = SessionMemory.empty(D, M, (16, 16, 24), 8)
    for i in range(n):
        slots = torch.randn(M, D) * dtype_scale
        slots[0, 0] = float("nan") if i % 7 == 3 else -0.0
        mem = mem.apply_segment(i, slots, (i * 10, i * 10 + 10), mean_compress)
    back = SessionMemory.from_bytes(mem.to_bytes())
    assert back.same_as(mem)
    assert back.to_bytes() == mem.to_bytes()
    assert back.nbytes() == mem.nbytes() and back.summary() == mem.summary()


def test_versions_are_immutable() -> None:
    mem = feed(SessionMemory.empty(D, M, (8, 8), 8), 3)
    before = mem.to_bytes()
    newer = feed(mem, 5, first=3)
    assert mem.to_bytes() == before and mem.version == 3 and newer.version == 8


def test_out_of_order_and_bad_input_raise_clear_errors() -> None:
    mem = feed(SessionMemory.empty(D, M, (8, 8), 8), 2)
    with pytest.raises(SequenceError, match="expected 2"):
        mem.apply_segment(3, torch.zeros(M, D), (128, 192), mean_compress)
    with pytest.raises(SequenceError, match="expected 2"):
        mem.apply_segment(1, torch.zeros(M, D), (128, 192), mean_compress)
    with pytest.raises(ValueError, match="shape"):
        mem.apply_segment(2, torch.zeros(M + 1, D), (128, 192), mean_compress)
    with pytest.raises(ValueError, match="span"):
        mem.apply_segment(2, torch.zeros(M, D), (100, 192), mean_compress)  # overlaps byte 127
    with pytest.raises(ValueError, match="merge_group"):
        SessionMemory.empty(D, M, (8, 8), 6)
    with pytest.raises(ValueError, match="capacity"):
        SessionMemory.empty(D, M, (8, 6), 8)
    with pytest.raises(ValueError, match="levels"):
        SessionMemory.for_model(ModelConfig.named("tiny"), MemoryConfig(level_capacities=(16,) * 5))
    with pytest.raises(MemoryFormatError):
        SessionMemory.from_bytes(b"\x00" * 40)


def test_skip_advances_seq_without_slots() -> None:
    mem = feed(SessionMemory.empty(D, M, (8, 8), 8), 2)
    skipped = mem.skip(2)
    assert (skipped.version, skipped.last_seq, skipped.skipped) == (3, 2, 1)
    assert skipped.slot_count == mem.slot_count
    nxt = skipped.apply_segment(3, torch.zeros(M, D), (192, 256), mean_compress)
    assert nxt.last_seq == 3 and SessionMemory.from_bytes(nxt.to_bytes()).skipped == 1
    with pytest.raises(SequenceError):
        nxt.skip(7)


def test_top_level_merges_into_itself_at_the_oldest_place() -> None:
    calls: list[int] = []

    def compress(hidden: torch.Tensor, level: int) -> torch.Tensor:
        calls.append(level)
        return mean_compress(hidden, level)

    mem = SessionMemory.empty(D, M, (8, 8), 8)
    for i in range(12):
        mem = mem.apply_segment(i, torch.randn(M, D), (i, i + 1), compress)
    assert set(calls) == {2}  # level 1 -> 2 merges, and the top (2) into itself
    assert calls.count(2) >= 6
    check_invariants(mem, 12, 1)


def test_to_slots_order_padding_levels_ages() -> None:
    mem = feed(SessionMemory.empty(D, M, (8, 8, 8), 8), 9)  # levels: 1 full-ish, 2, 3
    counts = [lvl.count for lvl in mem.levels]
    total = sum(counts)
    ms = mem.to_slots(40, current_segment=9)
    assert ms.slots.shape == (1, 40, D) and ms.mask.shape == (1, 40)
    assert int(ms.mask.sum()) == total and not ms.mask[0, total:].any()
    expected_levels = [li for li, c in enumerate(counts, start=1) for _ in range(c)]
    assert ms.level[0, :total].tolist() == expected_levels
    newest = mem.levels[0].rows
    assert torch.equal(ms.slots[0, 0], newest.slots[-1])  # newest slot first
    ages = 9 - mem.written(40)[:total]
    assert torch.equal(ms.age[0, :total], age_bucket(ages, 16))
    small = mem.to_slots(5, current_segment=9)  # truncation keeps the newest, finest slots
    assert small.mask.all() and small.level[0].tolist() == expected_levels[:5]
    assert torch.equal(small.slots[0], ms.slots[0, :5])


def test_namespace_reads_as_its_own_level() -> None:
    session = feed(SessionMemory.empty(D, M, (8, 8), 8), 2)
    namespace = feed(SessionMemory.empty(D, M, (8, 8), 8), 6)
    ms = session.to_slots(64, current_segment=2, namespace=namespace)
    n_s, n_ns = session.slot_count, namespace.slot_count
    assert int(ms.mask.sum()) == n_s + n_ns
    assert (ms.level[0, n_s : n_s + n_ns] == NAMESPACE_LEVEL).all()
    assert (ms.level[0, :n_s] >= 1).all()


def test_memory_bound_and_footprint_constant_once_full() -> None:
    mem = SessionMemory.empty(D, M, (16, 16, 16), 8)
    sizes = []
    for i in range(300):
        mem = mem.apply_segment(i, torch.randn(M, D), (i * 8, i * 8 + 8), mean_compress)
        sizes.append(mem.nbytes())
        assert mem.slot_count <= 48
    per_level = 16 * (D * 4 + 3 * 8)  # a level's buffer: slots and three int64 fields
    assert sizes[0] == per_level  # only level 1 is written at first
    assert sorted(set(sizes)) == [per_level, 2 * per_level, 3 * per_level]  # levels as reached
    assert len(set(sizes[100:])) == 1  # every level allocated: a constant footprint
    if mem.levels[0].count + M > 16:  # make room in level 1 so the next segment stays there
        mem = mem.apply_segment(300, torch.randn(M, D), (2400, 2408), mean_compress)
    after = mem.apply_segment(mem.last_seq + 1, torch.randn(M, D), (2408, 2416), mean_compress)
    assert after.levels[0].count == mem.levels[0].count + M
    assert after.levels[1] is mem.levels[1] and after.levels[2] is mem.levels[2]  # shared


def test_with_the_tiny_model_compressor() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig.named("tiny")
    model = ByteLM(cfg).eval()
    mem = SessionMemory.for_model(cfg, MemoryConfig(level_capacities=(16, 16)))
    S = cfg.segment_len
    with torch.no_grad():
        for i in range(10):
            slots = model.compress(torch.randn(1, S, cfg.d_model), 1)[0]
            mem = mem.apply_segment(i, slots, (i * S, (i + 1) * S), model.compress)
        out = model(
            torch.randint(0, 256, (1, 8)), mem.to_slots(32, 10, age_buckets=cfg.age_buckets)
        )
    assert out.shape == (1, 8, cfg.vocab) and torch.isfinite(out).all()
    check_invariants(mem, 10, S)
    assert cheap_compress(torch.randn(1, S, cfg.d_model), 1).shape == (
        1,
        cfg.mem_slots,
        cfg.d_model,
    )
