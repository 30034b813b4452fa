"""EngineMemory against a real nats-server: a live engine session's closed segments are
published, consolidated by workers, and the new versions come back into the engine between
steps (the model then reads them)."""

from __future__ import annotations

import anyio
import torch

from engine import Done, Engine, EngineConfig, MemoryNotice, SamplingParams
from memory.config import MemoryConfig
from memory.hooks import EngineMemory
from memory.service import MemoryService, model_compressor
from model import ByteLM
from tests.nats_server import NatsServer


async def test_engine_segments_round_trip_through_the_bus(
    nats_server: NatsServer, mem_config: MemoryConfig, tiny_model: ByteLM
) -> None:
    cfg = tiny_model.config
    svc = await MemoryService.connect(
        nats_server.url, cfg, model_compressor(tiny_model), mem_config
    )
    hooks = EngineMemory(svc, capacity=mem_config.max_slots)
    engine = Engine(
        tiny_model, EngineConfig(max_slots=2, memory_capacity=mem_config.max_slots), hooks
    )
    segments = 5
    async with svc, anyio.create_task_group() as tg:
        await tg.start(svc.run_workers, 2)
        await tg.start(hooks.run)
        await engine.start()
        s = engine.open()
        data = bytes(range(32, 127)) * (segments * cfg.segment_len // 95 + 1)
        s.submit(data[: segments * cfg.segment_len + 3])
        versions: list[int] = []
        with anyio.fail_after(60):
            while not versions or versions[-1] < segments:
                for ev in await s.next_batch(timeout=0.5):
                    if isinstance(ev, MemoryNotice):
                        versions.append(ev.version)
        assert versions == sorted(versions) and versions[-1] == segments
        assert hooks.submitted == segments
        mem = await svc.latest(s.id)
        assert mem is not None and mem.last_seq == segments - 1
        # The engine reads what it installed: the slots in its pool equal the stored version's.
        slot = engine.scheduler.seqs[s.id].slot
        want = mem.to_slots(mem_config.max_slots, segments)
        pool = engine.runner.memory
        assert pool is not None
        assert torch.equal(pool.mask[slot], want.mask[0])
        assert torch.allclose(pool.slots[slot][want.mask[0]], want.slots[0][want.mask[0]])
        # ...and a turn still generates with memory in the step.
        s.submit(b"!", SamplingParams(max_bytes=4, seed=1))
        with anyio.fail_after(30):
            done = None
            while done is None:
                done = next((e for e in await s.next_batch(0.5) if isinstance(e, Done)), None)
        assert done.usage.output_bytes == 4
        await engine.shutdown()
        tg.cancel_scope.cancel()


async def test_a_namespace_is_read_after_the_sessions_own_slots(
    nats_server: NatsServer, mem_config: MemoryConfig, tiny_model: ByteLM
) -> None:
    """set_namespace hands the engine the session's slots followed by the namespace's, at level
    0 (NAMESPACE_LEVEL), aged 0; the engine installs them and the read changes the logits."""
    from memory.store import SessionMemory

    cfg = tiny_model.config
    svc = await MemoryService.connect(
        nats_server.url, cfg, model_compressor(tiny_model), mem_config
    )
    async with svc:
        hooks = EngineMemory(svc, capacity=2 * mem_config.max_slots)
        ns = SessionMemory.for_model(cfg, mem_config)
        compress = model_compressor(tiny_model)
        for i in range(6):  # a namespace of six segments
            hidden = torch.randn(1, cfg.segment_len, cfg.d_model)
            ns = ns.apply_segment(
                i,
                compress(hidden, 1)[0],
                (i * cfg.segment_len, (i + 1) * cfg.segment_len),
                compress,
            )
        engine = Engine(
            tiny_model, EngineConfig(max_slots=2, memory_capacity=2 * mem_config.max_slots), hooks
        )
        await engine.start()
        s = engine.open()
        plain = engine.open()
        for x in (s, plain):
            x.submit(b"what the books say: ", SamplingParams(max_bytes=1, seed=3, temperature=0))
        hooks.set_namespace(s.id, ns, 0)
        (update,) = hooks.take_updates()
        n = ns.slot_count
        assert update.levels[0] == {
            "level": 0,
            "slots": n,
            "capacity": n,
            "bytes_covered": 6 * cfg.segment_len,
        }
        assert int(update.memory.mask.sum()) == n
        assert torch.all(update.memory.level[0, :n] == 0)
        assert torch.all(update.written[:n] >= 1 << 40)  # never older than the present: age 0
        hooks._ready.append(update)  # let the engine install it between steps
        with anyio.fail_after(30):
            for x in (s, plain):
                while not any(isinstance(e, Done) for e in await x.next_batch(0.5)):
                    pass
        a = engine.runner.logits[engine.scheduler.seqs[s.id].slot]
        b = engine.runner.logits[engine.scheduler.seqs[plain.id].slot]
        assert not torch.allclose(a, b)  # same bytes, different memory: the namespace is read
        await engine.shutdown()
