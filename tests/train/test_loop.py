"""The training loop's parts without a bus: the packer knows whose bytes went into a batch, the
curriculum changes shapes and segments, gradient checkpointing changes no number, a loop restored
from its state continues exactly as the one that was not stopped, PAD targets carry no loss."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model import ByteLM
from model.codec import EOS, PAD
from model.distributed import Dist, shard
from model.train import (
    Packer,
    TrainConfig,
    TrainLoop,
    compile_blocks,
    curriculum_batches,
    enable_grad_checkpointing,
    pack,
    parse_curriculum,
    sequence_loss,
    stage_at,
    train,
)
from tests.train.conftest import TEXT


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.binary(min_size=0, max_size=40), min_size=1, max_size=30),
    st.integers(1, 4),
    st.integers(1, 16),
)
def test_packer_finishes_an_owner_with_its_last_byte(
    docs: list[bytes], rows: int, cols: int
) -> None:
    packer: Packer[int] = Packer()
    for i, d in enumerate(docs):
        packer.add(d, i)
    flat = torch.cat([torch.tensor([*d, EOS]) for d in docs])
    taken, finished = [], []
    while packer.pending >= rows * cols:
        batch, done = packer.take(rows, cols)
        taken.append(batch.flatten())
        finished.append(done)
    ends = torch.tensor([len(d) + 1 for d in docs]).cumsum(0).tolist()
    pos = 0
    for batch, done in zip(taken, finished, strict=True):
        pos += batch.numel()
        assert done == [i for i, e in enumerate(ends) if pos - batch.numel() < e <= pos]
    assert torch.equal(torch.cat(taken) if taken else flat[:0], flat[:pos])
    tail, done = packer.take_padded(rows, cols)
    assert done == [i for i, e in enumerate(ends) if e > pos]
    assert torch.equal(tail.flatten()[: flat.numel() - pos], flat[pos:])
    assert (tail.flatten()[flat.numel() - pos :] == PAD).all()


def test_chunks_continue_without_eos_and_pack_is_unchanged() -> None:
    packer: Packer[str] = Packer()
    packer.add(b"abc", "a0", eos=False)
    packer.add(b"de", "a1")
    batch, done = packer.take(1, 6)
    assert batch.tolist() == [[*b"abcde", EOS]] and done == ["a0", "a1"]
    docs = [b"hello", b"world!", b"xy"] * 10
    assert [b.tolist() for b in pack(iter(docs), 2, 7)] == [
        b.tolist() for b in curriculum_batches(iter(docs), TrainConfig(batch_size=2, seq_len=7))
    ]


def test_curriculum_stages() -> None:
    cur = parse_curriculum("0:64x1, 0.5:128x2,0.75:256x4")
    assert cur == ((0.0, 64, 1), (0.5, 128, 2), (0.75, 256, 4))
    cfg = TrainConfig(steps=100, batch_size=8, seq_len=64, curriculum=cur, grad_accum=2)
    stages = [stage_at(i, cfg) for i in (0, 49, 50, 99)]
    assert [(s.seq_len, s.segments, s.batch_size) for s in stages] == [
        (64, 1, 8), (64, 1, 8), (128, 2, 4), (256, 4, 2)
    ]  # fmt: skip
    docs = [TEXT.read_bytes()] * 4
    shapes = [tuple(b.shape) for b in curriculum_batches(iter(docs), cfg)][:204]
    assert shapes[:100] == [(8, 65)] * 100 and shapes[100:150] == [(4, 129)] * 50
    assert shapes[150:200] == [(2, 257)] * 50
    with pytest.raises(ValueError):
        parse_curriculum("0.5:64")
    with pytest.raises(ValueError):
        TrainConfig(curriculum=((0.5, 64, 1), (0.2, 128, 2)))


def test_grad_checkpointing_changes_no_number(micro_model: ByteLM) -> None:
    batch = torch.randint(0, 256, (2, 97))
    twin = copy.deepcopy(micro_model)
    undo = enable_grad_checkpointing(twin)
    for m in (micro_model, twin):
        m.train()
        sequence_loss(m, batch, segments=3, lag=1).backward()
    for (name, a), b in zip(micro_model.named_parameters(), twin.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)
    undo()
    assert "forward" not in vars(twin.blocks[0])
    with torch.no_grad():
        torch.testing.assert_close(twin(batch), micro_model(batch), rtol=0, atol=0)


# dynamo's own: a UserWarning while it inspects tensors, and a DeprecationWarning when it traces
# the delta rule's autograd.Function (it instantiates the class itself)
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_compiled_blocks_change_no_number(micro_model: ByteLM) -> None:
    """Regional compilation (the trainer's default on a GPU) traces every mixing block, forward
    and backward, and computes the same loss and gradients; undo restores the eager blocks.
    aot_eager keeps the test fast: it runs dynamo and AOTAutograd, the parts that could break."""
    batch = torch.randint(0, 256, (2, 97))
    twin = copy.deepcopy(micro_model)
    undo = compile_blocks(twin, backend="aot_eager")
    assert all(b._compiled_call_impl is not None for b in twin.blocks if hasattr(b, "mixer"))
    losses = []
    for m in (micro_model, twin):
        m.train()
        loss = sequence_loss(m, batch, segments=3, lag=1)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(micro_model.named_parameters(), twin.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
    undo()
    assert all(b._compiled_call_impl is None for b in twin.blocks)
    loop = TrainLoop(copy.deepcopy(micro_model), TrainConfig(compile="auto"))
    assert loop._uncompile is None  # auto compiles on a GPU only
    with pytest.raises(ValueError, match="compile"):
        TrainConfig(compile="everything")


def test_pad_targets_carry_no_loss(micro_model: ByteLM) -> None:
    batch = torch.randint(0, 256, (1, 33))
    padded = torch.cat([batch, torch.full((1, 10), PAD)], 1)
    a = sequence_loss(micro_model, batch, 1, 0)
    b = sequence_loss(micro_model, padded, 1, 0)
    torch.testing.assert_close(a, b)  # the model is causal: padding after changes nothing before
    assert sequence_loss(micro_model, torch.full((1, 9), PAD), 1, 0).item() == 0.0


def test_a_restored_loop_continues_exactly(micro_model: ByteLM) -> None:
    cfg = TrainConfig(steps=20, batch_size=2, seq_len=64, segments=2, warmup=2, grad_accum=2)
    batches = list(pack(iter([TEXT.read_bytes()[:6000]]), 2, 64))[:16]
    loop = TrainLoop(micro_model, cfg)
    for i in range(4):
        loop.run_step(batches[2 * i : 2 * i + 2])
    state, lr4 = copy.deepcopy(loop.state_dict()), loop.lr()
    weights = copy.deepcopy(micro_model.state_dict())
    for i in range(4, 8):
        loop.run_step(batches[2 * i : 2 * i + 2])

    restored = ByteLM(micro_model.config)
    restored.load_state_dict(weights)
    again = TrainLoop(restored, cfg)
    again.load_state_dict(state)
    assert (again.step, again.lr()) == (4, lr4)
    for i in range(4, 8):
        again.run_step(batches[2 * i : 2 * i + 2])
    for (name, a), b in zip(
        micro_model.state_dict().items(), restored.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert again.bytes == loop.bytes == 8 * 2 * 2 * 64


def test_train_logs_throughput_and_no_mfu_on_the_cpu(micro_model: ByteLM) -> None:
    cfg = TrainConfig(
        steps=6, batch_size=2, seq_len=32, warmup=1, log_every=2, grad_checkpoint=True
    )
    logs = train(micro_model, pack(iter([TEXT.read_bytes()[:4000]] * 2), 2, 32), cfg)
    assert [e.step for e in logs] == [0, 2, 4, 5]
    assert all(e.bytes_per_s > 0 and e.mfu == 0.0 for e in logs)
    assert logs[-1].bytes == 6 * 2 * 32
    assert "forward" not in vars(micro_model.blocks[0])  # checkpointing undone at the end
    loop = TrainLoop(micro_model, cfg)
    loop.bf16 = True  # as on a GPU: 6 N bytes/s over the peak
    n = micro_model.num_parameters() - micro_model.embed.weight.numel()
    assert loop.mfu(1e6) == pytest.approx(6 * n * 1e6 / cfg.peak_flops)


def test_single_process_world() -> None:
    d = Dist.from_env({})
    assert (d.rank, d.world, d.active, d.is_main) == (0, 1, False, True)
    assert d.sum([1.0, 2.0]) == [1.0, 2.0]
    two = Dist.from_env({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, device="cpu")
    assert (two.rank, two.world, two.backend) == (1, 2, "gloo")
    assert list(shard(range(10), 1, 3)) == [1, 4, 7]
