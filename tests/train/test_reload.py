"""Hot reload: a checkpoint stored in the `checkpoints` object store and announced on
model.updated reaches the follower's callback as a loadable directory holding exactly those
weights; with a real Engine, `engine.load_weights` on it makes the engine generate what the new
weights generate."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import torch

from engine import Engine, EngineConfig
from engine.types import Delta, Done, SamplingParams
from memory.bus import Bus
from memory.config import MemoryConfig
from memory.reload import (
    ModelUpdated,
    announce,
    checkpoint_name,
    follow_model_updates,
    model_files,
    new_notice,
    put_checkpoint,
)
from memory.snapshots import model_fingerprint
from model import ByteLM
from tests.ingest.conftest import MICRO
from tests.nats_server import NatsServer


def seeded(seed: int) -> ByteLM:
    torch.manual_seed(seed)
    return ByteLM(MICRO).eval()


async def publish(bus: Bus, model: ByteLM, step: int, version: int) -> ModelUpdated:
    name = checkpoint_name(step)
    files = model_files(model)
    await put_checkpoint(bus, name, files)
    notice = new_notice(name, model, step, version, sum(map(len, files.values())))
    await announce(bus, notice)
    return notice


async def generate(engine: Engine, prompt: str) -> bytes:
    session = engine.open()
    session.submit(prompt, SamplingParams(max_bytes=24, temperature=0.0))
    out = b""
    async for ev in session.events():
        if isinstance(ev, Delta):
            out += ev.data
        elif isinstance(ev, Done):
            break
    await session.close()
    return out


async def follow(
    bus: Bus, tmp_path: Path, on_update: Callable[[str], Awaitable[object]], tg: anyio.abc.TaskGroup
) -> None:
    await tg.start(
        lambda task_status: follow_model_updates(
            bus,
            on_update,
            data_dir=tmp_path / "data",
            fingerprint=model_fingerprint(MICRO),
            keep=1,
            task_status=task_status,
        )
    )


async def test_the_follower_gets_the_announced_weights(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    bus = await Bus.connect(nats_server.url, MemoryConfig())
    paths: list[str] = []

    async def on_update(path: str) -> None:
        paths.append(path)

    try:
        async with anyio.create_task_group() as tg:
            await follow(bus, tmp_path, on_update, tg)
            other = ByteLM(MICRO.replace(d_model=64)).eval()  # other shapes: not handed on
            await publish(bus, other, step=1, version=1)
            new = seeded(1)
            notice = await publish(bus, new, step=7, version=2)
            with anyio.fail_after(10):
                while not paths:
                    await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
    finally:
        await bus.close()
    assert paths == [str(tmp_path / "data" / "checkpoints" / notice.object)]
    loaded = ByteLM.load(paths[0])
    for (k, a), b in zip(new.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert sorted(p.name for p in (tmp_path / "data" / "checkpoints").iterdir()) == [notice.object]


async def test_an_engine_reloads_and_generates_with_the_new_weights(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    old, new = seeded(0), seeded(1)
    async with Engine(seeded(1), EngineConfig(device="cpu")) as reference:
        expected = await generate(reference, "The river ")
    bus = await Bus.connect(nats_server.url, MemoryConfig())
    try:
        async with Engine(old, EngineConfig(device="cpu")) as engine:
            before = await generate(engine, "The river ")
            version = engine.metrics.weights_version
            async with anyio.create_task_group() as tg:
                await follow(bus, tmp_path, engine.load_weights, tg)
                await publish(bus, new, step=3, version=1)
                with anyio.fail_after(10):
                    while engine.metrics.weights_version == version:
                        await anyio.sleep(0.02)
                tg.cancel_scope.cancel()
            after = await generate(engine, "The river ")
    finally:
        await bus.close()
    assert len(before) == len(after) == len(expected) == 24
    assert after == expected != before
