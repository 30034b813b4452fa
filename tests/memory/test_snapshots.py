"""Snapshots: bit-exact round trips through the object store, refusal of another model config."""

from __future__ import annotations

import pytest
import torch

from memory.bus import Bus
from memory.config import MemoryConfig
from memory.snapshots import (
    IncompatibleSnapshot,
    SnapshotError,
    decode_snapshot,
    delete_snapshot,
    encode_snapshot,
    load_snapshot,
    model_fingerprint,
    save_snapshot,
    snapshot_pointer,
)
from memory.store import SessionMemory
from model import ByteLM, ModelConfig
from tests.memory.util import TINY, cheap_compress, job
from tests.nats_server import NatsServer


def session_state(model: ByteLM, row: int) -> dict[str, torch.Tensor]:
    """One row of a state pool after some bytes: views into larger tensors, as the engine has."""
    pool = model.allocate_state(4)
    model.prefill(torch.randint(0, 256, (4, 40)), pool)
    return {k: v[row] for k, v in pool.items()}


def some_memory(n: int = 6) -> SessionMemory:
    mem = SessionMemory.for_model(TINY, MemoryConfig(level_capacities=(16, 16), merge_group=8))
    for seq in range(n):
        j = job("snap", seq)
        slots = cheap_compress(j.tensor().unsqueeze(0), 1)[0]
        mem = mem.apply_segment(seq, slots, j.span, cheap_compress)
    return mem


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        assert a[k].contiguous().view(torch.uint8).equal(b[k].contiguous().view(torch.uint8)), k


async def test_snapshot_round_trip_bit_exact(nats_server: NatsServer, tiny_model: ByteLM) -> None:
    state = session_state(tiny_model, 2)
    state["odd.bf16"] = torch.randn(3, 5).bfloat16()
    state["odd.counter"] = torch.tensor([7, -1, 2**40])
    memory = some_memory()
    bus = await Bus.connect(nats_server.url)
    try:
        ptr = await save_snapshot(bus, "sess-1", state, memory, TINY, meta={"fed": 40, "turn": 3})
        assert ptr.memory_version == memory.version and ptr.fingerprint == model_fingerprint(TINY)
        snap = await load_snapshot(bus, "sess-1", ModelConfig.named("tiny"))
        assert snap is not None
        assert_same_state(snap.state, state)
        assert snap.memory is not None and snap.memory.same_as(memory)
        assert snap.meta == {"fed": 40, "turn": 3} and snap.session == "sess-1"
        # restored into a fresh pool row, the model continues exactly as from the original
        pool = tiny_model.allocate_state(1)
        for k in pool:
            pool[k][0].copy_(snap.state[k])
        original = tiny_model.allocate_state(1)
        for k in original:
            original[k][0].copy_(state[k])
        x = torch.tensor([65])
        assert torch.equal(tiny_model.step(x, pool), tiny_model.step(x, original))
        assert await load_snapshot(bus, "nobody", TINY) is None
    finally:
        await bus.close()


async def test_snapshot_of_another_config_is_refused(
    nats_server: NatsServer, tiny_model: ByteLM
) -> None:
    bus = await Bus.connect(nats_server.url)
    try:
        await save_snapshot(bus, "s", session_state(tiny_model, 0), None, TINY)
        other = TINY.replace(filter_order=16)
        with pytest.raises(
            IncompatibleSnapshot, match=r"filter_order 8 \(snapshot\) vs 16 \(model\)"
        ):
            await load_snapshot(bus, "s", other)
        renamed = TINY.replace(name="tiny-copy")  # the name is not a shape
        snap = await load_snapshot(bus, "s", renamed)
        assert snap is not None and snap.memory is None
    finally:
        await bus.close()


async def test_saving_again_replaces_the_object_and_delete_removes_it(
    nats_server: NatsServer, tiny_model: ByteLM
) -> None:
    bus = await Bus.connect(nats_server.url)
    try:
        first = await save_snapshot(bus, "s", session_state(tiny_model, 0), None, TINY)
        second = await save_snapshot(bus, "s", session_state(tiny_model, 1), some_memory(2), TINY)
        assert first.object != second.object
        names = {o.name for o in await bus.snapshots.list(ignore_deletes=True)}
        assert names == {second.object}
        assert await snapshot_pointer(bus, "s") == second
        assert await delete_snapshot(bus, "s") and await snapshot_pointer(bus, "s") is None
        assert not await delete_snapshot(bus, "s")
    finally:
        await bus.close()


def test_corrupt_snapshot_bytes_raise_snapshot_error(tiny_model: ByteLM) -> None:
    data = encode_snapshot("s", session_state(tiny_model, 0), some_memory(1), TINY)
    assert decode_snapshot(data, TINY).session == "s"
    with pytest.raises(SnapshotError):
        decode_snapshot(b"\x10\x00\x00\x00\x00\x00\x00\x00{}", TINY)
    with pytest.raises(SnapshotError):
        decode_snapshot(data[: len(data) // 2], TINY)
