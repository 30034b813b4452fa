"""Training through the hierarchy: run_segments with a Hierarchy reads, at every segment, what a
session served by the memory workers reads (memory/store.py's policy, merges and the top level's
self-merge included), state drop cuts the recurrent state only where it is drawn, and state
passing starts a row from the state the previous batch ended that row in, as a session that had
read both would be."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from gateway.cli import build_parser, text_train_config
from memory.store import SessionMemory
from model import ByteLM, State
from model.memread import MemorySlots, age_bucket
from model.segments import Hierarchy, run_segments
from model.train import TrainConfig, TrainLoop, sequence_loss_from

CAPS, GROUP = (8, 8, 8), 4  # micro's m is 2: a level holds 4 segments, merges 2 at a time


def served(
    model: ByteLM, tokens: torch.Tensor, lag: int, state: State | None = None
) -> tuple[torch.Tensor, State, SessionMemory]:
    """One row (1, T) the way the engine and the workers run it: SessionMemory versions built
    with the model's compressor, read with to_slots (every slot, ages from the segment read);
    from `state` (None: zeros) -> the logits, the final state and the final memory."""
    cfg = model.config
    S = cfg.segment_len
    versions = [SessionMemory.empty(cfg.d_model, cfg.mem_slots, CAPS, GROUP)]
    logits = []
    for i, seg in enumerate(tokens.split(S, dim=1)):
        mem = versions[max(0, i - lag)]
        memory = (
            mem.to_slots(mem.slot_count, i, age_buckets=cfg.age_buckets) if mem.slot_count else None
        )
        out = model.run(seg, state, memory, want_state=True)
        state = out.state
        logits.append(out.logits)
        if seg.shape[1] == S:
            slots = model.compress(out.capture, 1)[0]
            versions.append(
                versions[-1].apply_segment(
                    i, slots, (i * S, (i + 1) * S), lambda h, level: model.compress(h, level)
                )
            )
    assert state is not None
    return torch.cat(logits, dim=1), state, versions[-1]


@pytest.mark.parametrize("lag", [0, 1])
def test_training_reads_what_serving_reads(micro_model: ByteLM, lag: int) -> None:
    S = micro_model.config.segment_len
    tokens = torch.randint(0, 256, (2, 30 * S + 7), generator=torch.Generator().manual_seed(lag))
    with torch.no_grad():
        got = run_segments(micro_model, tokens, lag=lag, hierarchy=Hierarchy(CAPS, GROUP))
        flat = run_segments(micro_model, tokens, lag=lag)
        for b in range(2):
            want, _, memory = served(micro_model, tokens[b : b + 1], lag)
            top = memory.levels[-1]
            assert top.count == top.capacity  # the top level has merged into itself
            torch.testing.assert_close(got[b : b + 1], want, rtol=1e-5, atol=1e-5)
    late = slice(10 * S, None)  # once merges began, the hierarchy reads other slots than one level
    assert (got[:, late] - flat[:, late]).abs().max() > 1e-3


def test_state_drop_zeroes_only_the_drawn_rows(micro_model: ByteLM) -> None:
    S = micro_model.config.segment_len
    tokens = torch.randint(0, 256, (2, 2 * S), generator=torch.Generator().manual_seed(5))
    drop = torch.tensor([[True, False]])  # row 0 loses its state before segment 1
    with torch.no_grad():
        got = run_segments(micro_model, tokens, drop=drop)
        kept = run_segments(micro_model, tokens)
        first = micro_model.run(tokens[:1, :S], want_state=True)
        slots = micro_model.compress(first.capture, 1)
        m = slots.shape[1]
        memory = MemorySlots(
            slots=slots,
            level=torch.ones(1, m, dtype=torch.long),
            age=age_bucket(torch.ones(1, m, dtype=torch.long), micro_model.config.age_buckets),
            mask=torch.ones(1, m, dtype=torch.bool),
        )
        fresh = micro_model.run(tokens[:1, S:], None, memory).logits  # zero state, same memory
    with torch.no_grad():  # a trailing partial segment past the boundaries drawn: never dropped
        ragged = torch.cat([tokens, tokens[:, :5]], 1)
        torch.testing.assert_close(
            run_segments(micro_model, ragged, drop=drop)[:, : 2 * S], got, rtol=0, atol=0
        )
    torch.testing.assert_close(got[1], kept[1], rtol=0, atol=0)
    torch.testing.assert_close(got[0, :S], kept[0, :S], rtol=0, atol=0)
    torch.testing.assert_close(got[:1, S:], fresh, rtol=1e-5, atol=1e-5)
    assert (got[0, S:] - kept[0, S:]).abs().max() > 1e-3


def test_train_loop_draws_drops_from_its_seed(micro_model: ByteLM) -> None:
    S = micro_model.config.segment_len
    cfg = TrainConfig(
        seq_len=4 * S, segments=4, memory_levels=CAPS, merge_group=GROUP, state_drop=0.5, warmup=1
    )
    batch = torch.randint(0, 256, (3, 4 * S + 1), generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(2):
        loop = TrainLoop(copy.deepcopy(micro_model), cfg)
        losses.append([loop.run_step([batch]) for _ in range(3)])
        loop.close()
    assert losses[0] == losses[1] and all(torch.isfinite(torch.tensor(losses[0])))
    a, b = TrainLoop(copy.deepcopy(micro_model), cfg), TrainLoop(copy.deepcopy(micro_model), cfg)
    drops = a._drops(4, 64), b._drops(4, 64)
    assert drops[0] is not None and drops[1] is not None and torch.equal(drops[0], drops[1])
    assert 0.3 < drops[0].float().mean().item() < 0.7
    assert TrainLoop(copy.deepcopy(micro_model), TrainConfig(segments=4))._drops(4, 8) is None


@pytest.mark.parametrize("lag", [0, 1])
def test_a_passed_state_continues_the_rows(micro_model: ByteLM, lag: int) -> None:
    """run_segments from a given state reads and returns what a session started in that state
    reads (its memory empty), and its final state is the one the session ends in."""
    S = micro_model.config.segment_len
    gen = torch.Generator().manual_seed(7 + lag)
    before = torch.randint(0, 256, (2, 3 * S), generator=gen)
    tokens = torch.randint(0, 256, (2, 6 * S + 3), generator=gen)
    with torch.no_grad():
        _, start = run_segments(micro_model, before, want_state=True)
        got, final = run_segments(
            micro_model, tokens, lag=lag, hierarchy=Hierarchy(CAPS, GROUP), state=start,
            want_state=True,
        )  # fmt: skip
        fresh = run_segments(micro_model, tokens, lag=lag, hierarchy=Hierarchy(CAPS, GROUP))
        for b in range(2):
            row = {k: v[b : b + 1] for k, v in start.items()}
            want, want_final, _ = served(micro_model, tokens[b : b + 1], lag, row)
            torch.testing.assert_close(got[b : b + 1], want, rtol=1e-5, atol=1e-5)
            for k, v in want_final.items():
                torch.testing.assert_close(final[k][b : b + 1], v, rtol=1e-5, atol=1e-5)
    assert (got - fresh).abs().max() > 1e-3  # the state changed what the rows saw


def test_train_loop_passes_final_states_on(micro_model: ByteLM) -> None:
    """state_pass 1: each step's rows start where the previous step's ended (detached), and the
    step's loss is the loss from that state; state_pass 0: from zeros, nothing carried; a change
    of rows starts from zeros."""
    S = micro_model.config.segment_len
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 256, (2, 2 * S + 1), generator=gen) for _ in range(2)]
    cfg = TrainConfig(seq_len=2 * S, segments=2, warmup=1, state_pass=1.0)
    loop = TrainLoop(copy.deepcopy(micro_model), cfg)
    loop.run_step([batches[0]])
    assert loop.carry is not None and all(not v.requires_grad for v in loop.carry.values())
    carried = {k: v.clone() for k, v in loop.carry.items()}
    model = copy.deepcopy(loop.model).train()
    lag = copy.deepcopy(loop.rng).randint(0, 1)  # the lag the step will draw
    with torch.no_grad():
        want = sequence_loss_from(model, batches[1], 2, lag, None, None, None, carried)[0]
        zeros = sequence_loss_from(model, batches[1], 2, lag, None, None, None, None)[0]
    got = loop.run_step([batches[1]])
    assert abs(got - want.item()) < 1e-5 and abs(got - zeros.item()) > 1e-4
    assert loop._passed(3) is None  # three rows: nothing carried fits them
    off = TrainLoop(copy.deepcopy(micro_model), TrainConfig(seq_len=2 * S, segments=2))
    off.run_step([batches[0]])
    assert off.carry is None and off._passed(2) is None
    draws = TrainLoop(copy.deepcopy(micro_model), replace(cfg, state_pass=0.5))
    draws.carry = {"x": torch.ones(400, 3)}
    passed = draws._passed(400)
    assert passed is not None and 0.35 < passed["x"][:, 0].mean().item() < 0.65
    with pytest.raises(ValueError, match="state_pass"):
        TrainConfig(state_pass=1.5)


def test_bad_hierarchies_and_drops_are_refused(micro_model: ByteLM) -> None:
    for levels, group in (((8, 8, 5), 4), ((8,), 3), ((8, 8, 8, 8, 8), 4), ((2, 2), 2)):
        with pytest.raises(ValueError, match=r"capacit|levels"):
            TrainLoop(micro_model, TrainConfig(memory_levels=levels, merge_group=group))
    with pytest.raises(ValueError, match="state_drop"):
        TrainConfig(state_drop=1.0)


def test_cli_flags_reach_the_config() -> None:
    args = build_parser().parse_args(
        ["train", "--memory-levels", "8,8,8", "--merge-group", "4", "--state-drop", "0.25",
         "--state-pass", "0.75"]
    )  # fmt: skip
    cfg = text_train_config(args)
    assert cfg.hierarchy == Hierarchy(CAPS, GROUP) and cfg.state_drop == 0.25
    assert cfg.state_pass == 0.75
    assert text_train_config(build_parser().parse_args(["train"])).hierarchy is None
