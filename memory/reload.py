"""Model checkpoints on the bus: their layout in the `checkpoints` object store, the pointer to
the newest one, the `model.updated` notice, and the follower that fetches each announced
checkpoint into a local directory and hands it to a callback (the engine's `load_weights`).

A checkpoint named N is a set of objects: `N/model.safetensors` and `N/config.json` (together the
model/checkpoint.py directory format, loadable by `ByteLM.load` and `Engine.load_weights`), and
for a trainer's checkpoints `N/trainer.pt` (optimizer state and position). The `sessions` KV key
`ckpt.latest` holds the newest checkpoint's notice plus the names still kept.

reload.py owns that layout and the follower. It never trains (memory/trainer.py writes
checkpoints through it) and never swaps weights itself (the callback does).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import anyio
import msgspec
import torch
from anyio.abc import TaskStatus
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError, ObjectNotFoundError

from memory.bus import MODEL_UPDATED, Bus
from memory.snapshots import model_fingerprint
from model.checkpoint import CONFIG, WEIGHTS, save_checkpoint
from model.lm import ByteLM

log = logging.getLogger("bwr.reload")

LATEST_KEY = "ckpt.latest"  # sessions KV: CheckpointPointer of the newest checkpoint
TRAINER_STATE = "trainer.pt"  # the trainer's own file beside the model's
MODEL_FILES = (WEIGHTS, CONFIG)  # what a follower fetches


class ModelUpdated(msgspec.Struct, frozen=True):
    """Core notice on model.updated (JSON): a checkpoint is complete in the store."""

    object: str  # checkpoint name: its files are <object>/model.safetensors, <object>/config.json
    step: int  # optimizer steps behind these weights
    version: int  # weights version: grows with every checkpoint a trainer publishes
    fingerprint: str  # model_fingerprint of its config (shapes): followers skip other shapes
    created: float = 0.0  # unix seconds
    nbytes: int = 0  # bytes of its model files


class CheckpointPointer(msgspec.Struct, frozen=True):
    """KV value at ckpt.latest: the newest checkpoint and the older names still stored."""

    latest: ModelUpdated
    history: tuple[str, ...] = ()


_enc = msgspec.json.Encoder()
_notice_dec = msgspec.json.Decoder(ModelUpdated)
_pointer_dec = msgspec.json.Decoder(CheckpointPointer)


def encode_notice(notice: ModelUpdated) -> bytes:
    return _enc.encode(notice)


def decode_notice(data: bytes) -> ModelUpdated:
    return _notice_dec.decode(data)


def checkpoint_name(step: int) -> str:
    """A unique name for a trainer checkpoint at `step`, sorting by step."""
    return f"train-{step:09d}-{secrets.token_hex(3)}"


def model_files(
    model: ByteLM, *, dtype: torch.dtype = torch.float32, extra: dict[str, object] | None = None
) -> dict[str, bytes]:
    """The bytes of model.safetensors and config.json, exactly as save_checkpoint writes them."""
    with tempfile.TemporaryDirectory(prefix="bwr-ckpt-") as d:
        save_checkpoint(model, d, extra, dtype)
        return {name: (Path(d) / name).read_bytes() for name in MODEL_FILES}


# ----- the store -----


async def put_checkpoint(bus: Bus, name: str, files: dict[str, bytes]) -> int:
    """Store a checkpoint's files (model files last is not required: the pointer, written after,
    is what makes a checkpoint visible). -> bytes stored."""
    for fname, data in files.items():
        await bus.checkpoints.put(f"{name}/{fname}", data)
    return sum(len(d) for d in files.values())


async def delete_checkpoint(bus: Bus, name: str, files: Sequence[str]) -> None:
    for fname in files:
        with contextlib.suppress(ObjectNotFoundError):
            await bus.checkpoints.delete(f"{name}/{fname}")


async def latest_pointer(bus: Bus) -> tuple[CheckpointPointer | None, int]:
    """-> (the pointer or None, its KV revision (0 when absent))."""
    try:
        entry = await bus.sessions.get(LATEST_KEY)
    except KeyNotFoundError:
        return None, 0
    assert entry.value is not None and entry.revision is not None
    return _pointer_dec.decode(entry.value), entry.revision


async def latest_checkpoint(bus: Bus) -> ModelUpdated | None:
    ptr, _ = await latest_pointer(bus)
    return None if ptr is None else ptr.latest


async def announce(bus: Bus, notice: ModelUpdated, history: Sequence[str] = ()) -> None:
    """Point ckpt.latest at the checkpoint (its files must be stored), then say so on
    model.updated (a core subject: a follower that misses it catches up from the pointer)."""
    ptr = CheckpointPointer(notice, tuple(history))
    await bus.sessions.put(LATEST_KEY, _enc.encode(ptr))
    await bus.nc.publish(MODEL_UPDATED, encode_notice(notice))


async def fetch_checkpoint(
    bus: Bus, name: str, into: str | Path, files: Sequence[str] = MODEL_FILES
) -> Path:
    """Fetch a checkpoint's files into the directory `into` (made whole, then renamed into
    place: a reader never sees half of one). An existing complete directory is reused."""
    final = Path(into)
    if all((final / f).is_file() for f in files):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        for fname in files:
            result = await bus.checkpoints.get(f"{name}/{fname}")
            data = bytes(result.data or b"")
            await anyio.to_thread.run_sync((tmp / fname).write_bytes, data)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ----- the follower -----

OnUpdate = Callable[[str], Awaitable[object]]


async def follow_model_updates(
    bus: Bus,
    on_update: OnUpdate,
    *,
    data_dir: str | Path = ".data",
    fingerprint: str | None = None,
    catch_up: bool = False,
    keep: int = 2,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Until cancelled: for each model.updated notice, fetch the checkpoint into
    data_dir/checkpoints/<name> and await on_update(path). Notices that arrive while one is being
    handled collapse into the newest (one slot, never a queue). fingerprint: skip checkpoints of
    other shapes (model_fingerprint of the running model's config). catch_up: start with the
    checkpoint ckpt.latest names. keep: local checkpoint directories kept (older ones removed).
    A failed fetch or callback is logged; the next notice tries again."""
    root = Path(data_dir) / "checkpoints"
    slot: list[ModelUpdated] = []  # at most one: the newest notice not handled yet
    wake = anyio.Event()
    last = ""  # the checkpoint handed to on_update last

    def offer(notice: ModelUpdated) -> None:
        nonlocal wake
        if slot and slot[0].version > notice.version:
            return
        slot[:] = [notice]
        wake.set()

    async def on_msg(msg: Msg) -> None:
        try:
            offer(decode_notice(msg.data))
        except msgspec.DecodeError as e:
            log.warning("model.updated: not a notice (%s)", e)

    sub = await bus.nc.subscribe(MODEL_UPDATED, cb=on_msg)
    try:
        if catch_up:
            latest = await latest_checkpoint(bus)
            if latest is not None:
                offer(latest)
        task_status.started()
        while True:
            await wake.wait()
            wake = anyio.Event()
            while slot:
                notice = slot.pop()
                if notice.object == last:
                    continue
                if fingerprint is not None and notice.fingerprint != fingerprint:
                    log.warning(
                        "checkpoint %s has config %s, the model here is %s: not loaded",
                        notice.object,
                        notice.fingerprint,
                        fingerprint,
                    )
                    continue
                try:
                    path = await fetch_checkpoint(bus, notice.object, root / notice.object)
                    await on_update(str(path))
                except Exception:
                    log.exception("checkpoint %s: fetch or load failed", notice.object)
                    continue
                last = notice.object
                log.info("checkpoint %s (step %d) loaded", notice.object, notice.step)
                _prune(root, keep)
    finally:
        with anyio.CancelScope(shield=True):
            if not bus.nc.is_closed:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()


def _prune(root: Path, keep: int) -> None:
    """Remove all but the `keep` newest checkpoint directories the follower wrote."""
    dirs = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.stat().st_mtime,
    )
    for old in dirs[: max(0, len(dirs) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def new_notice(name: str, model: ByteLM, step: int, version: int, nbytes: int) -> ModelUpdated:
    return ModelUpdated(
        object=name,
        step=step,
        version=version,
        fingerprint=model_fingerprint(model.config),
        created=time.time(),
        nbytes=nbytes,
    )
