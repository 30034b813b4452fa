"""The ingest worker against a real nats-server: documents become a namespace memory that stays
bounded and that a session reads as its read-only level; a redelivered batch applies once; the
batched prefill gives the slots each document gives alone."""

from __future__ import annotations

from pathlib import Path

import anyio
import torch
from nats.aio.msg import Msg

from memory.config import MemoryConfig
from memory.ingest import ingest_paths
from memory.namespaces import (
    IngestConfig,
    IngestWorker,
    namespace_info,
    namespace_memory,
    read_info,
    segment_slots,
)
from memory.service import MemoryService, model_compressor
from model import ByteLM
from model.memread import NAMESPACE_LEVEL
from tests.ingest.conftest import write_corpus
from tests.memory.util import wait_until
from tests.nats_server import NatsServer

FAST = IngestConfig(fetch_timeout_s=0.2, ack_wait_s=1.0, fetch_batch=8)


async def test_namespace_memory_is_bounded_and_readable(
    tmp_path: Path, nats_server: NatsServer, micro_model: ByteLM, mem_config: MemoryConfig
) -> None:
    docs = write_corpus(tmp_path / "corpus")
    await ingest_paths(nats_server.url, [str(tmp_path / "corpus")], "books", None)
    svc = await MemoryService.connect(
        nats_server.url, micro_model.config, model_compressor(micro_model), mem_config
    )
    async with svc, anyio.create_task_group() as tg:
        worker = IngestWorker(svc, micro_model, FAST)
        await tg.start(worker.run)

        async def all_in() -> bool:
            return (await namespace_info(svc.bus, "books"))["chunks"] == len(docs)

        await wait_until(all_in, 40, "every document ingested")
        tg.cancel_scope.cancel()

    async with await MemoryService.connect(
        nats_server.url, micro_model.config, None, mem_config
    ) as svc:
        info = await namespace_info(svc.bus, "books")
        S = micro_model.config.segment_len
        assert info["documents"] == len(docs) and info["bytes"] == sum(map(len, docs.values()))
        full = sum(len(b) // S for b in docs.values())
        assert info["segments"] >= full > 3 * mem_config.max_slots // micro_model.config.mem_slots
        memory = await namespace_memory(svc, "books")
        assert memory is not None and memory.version == info["memory_version"] == info["segments"]
        # bounded: every level within its capacity though many more segments went in
        assert memory.slot_count <= mem_config.max_slots
        assert [lv["slots"] for lv in info["levels"]] == [lv.count for lv in memory.levels]
        assert memory.levels[-1].count > 0  # merges reached the top level
        assert 0 < memory.newest_end <= info["bytes"]  # spans follow the namespace's bytes

        # readable: a session with memory of its own reads the namespace as level 0 after it
        session = svc.empty
        capacity = 64
        slots = session.to_slots(capacity, current_segment=0, namespace=memory)
        n = memory.slot_count
        assert int(slots.mask.sum()) == n
        assert (slots.level[0, :n] == NAMESPACE_LEVEL).all()
        assert torch.isfinite(slots.slots[0, :n]).all() and slots.slots[0, :n].abs().sum() > 0
        tokens = torch.tensor([list(b"What does the namespace know?")])
        with torch.no_grad():
            with_ns = micro_model(tokens, slots)
            without = micro_model(tokens)
        assert torch.isfinite(with_ns).all() and not torch.allclose(with_ns, without)
        assert await namespace_memory(svc, "unknown") is None
        assert (await namespace_info(svc.bus, "unknown"))["documents"] == 0


class CrashBeforeAck(IngestWorker):
    """Commits, then 'dies' before acking: JetStream redelivers after ack_wait."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.dropped = 0

    async def _ack(self, msg: Msg) -> None:
        if self.dropped < 1000 and msg.metadata.num_delivered == 1:
            self.dropped += 1
            return
        await super()._ack(msg)


async def test_a_redelivered_batch_applies_once(
    tmp_path: Path, nats_server: NatsServer, micro_model: ByteLM, mem_config: MemoryConfig
) -> None:
    docs = write_corpus(tmp_path / "corpus", n=4)
    await ingest_paths(nats_server.url, [str(tmp_path / "corpus")], "books", None)
    svc = await MemoryService.connect(
        nats_server.url, micro_model.config, model_compressor(micro_model), mem_config
    )
    async with svc, anyio.create_task_group() as tg:
        worker = CrashBeforeAck(svc, micro_model, FAST)
        await tg.start(worker.run)

        async def redelivered() -> bool:
            return worker.duplicates >= len(docs)

        await wait_until(redelivered, 30, "every message redelivered and recognised")
        ci = await svc.bus.js.consumer_info("DOCS", "ingest")
        assert ci.num_pending == 0
        tg.cancel_scope.cancel()
    assert worker.applied == worker.dropped == len(docs)
    async with await MemoryService.connect(
        nats_server.url, micro_model.config, None, mem_config
    ) as svc:
        info, _ = await read_info(svc.bus, "books")
        assert info.chunks == len(docs) and info.documents == len(docs)
        memory = await namespace_memory(svc, "books")
        assert memory is not None and memory.version == info.segments


def test_batched_prefill_gives_each_documents_own_slots(micro_model: ByteLM) -> None:
    S = micro_model.config.segment_len
    g = torch.Generator().manual_seed(1)
    lengths = [5, S, S + 3, 3 * S + 20, 7 * S, 2 * S + S // 2, 40 * S + 9]
    bodies = [bytes(torch.randint(32, 127, (n,), generator=g).tolist()) for n in lengths]
    cfg = IngestConfig(batch_bytes=16 * S, piece_segments=3)
    together = segment_slots(micro_model, bodies, cfg)
    for body, segs in zip(bodies, together, strict=True):
        alone = segment_slots(micro_model, [body], cfg)[0]
        tail = len(body) % S
        assert len(segs) == len(body) // S + (tail >= S // 4)
        assert [(a, b) for _, a, b in segs] == [(a, b) for _, a, b in alone]
        assert all(b - a == S for _, a, b in segs[: len(body) // S])
        for (x, _, _), (y, _, _) in zip(segs, alone, strict=True):
            assert x.shape == (micro_model.config.mem_slots, micro_model.config.d_model)
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    # a full segment's slots are what compressing that segment's captured states gives
    with torch.no_grad():
        run = micro_model.run(torch.tensor([list(bodies[4])]), None, None, want_state=True)
        ref = micro_model.compress(run.capture[:, S : 2 * S], 1)[0]
    torch.testing.assert_close(together[4][1][0], ref, rtol=1e-4, atol=1e-5)
