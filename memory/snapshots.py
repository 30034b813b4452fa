"""Session snapshots: a session's recurrent state rows plus its memory version, saved to the
`snapshots` object store with a pointer in the `sessions` KV, and loaded back bit-exactly.

A snapshot is one safetensors blob: the state tensors under `state.<name>` (any dtype, kept as
they are), the memory version's bytes as a uint8 tensor `memory`, and in the metadata the
format, the session, the time, the caller's metadata and the fingerprint of the model config
that wrote it. Loading with a config of other shapes raises IncompatibleSnapshot before a byte
of state is used.

snapshots.py owns that format and its place in the store. It does not decide when to snapshot
(the engine's caller does, at turn boundaries) and never touches the device beyond copying to
the host.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import torch
from nats.js.errors import KeyNotFoundError, ObjectNotFoundError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from memory.bus import Bus, check_token, snapshot_key
from memory.store import SessionMemory, st_metadata
from model.config import FORMAT_VERSION, ModelConfig

FORMAT = "bwr-snapshot/1"


class SnapshotError(ValueError):
    """A snapshot that is missing its object or is not one this code reads."""


class IncompatibleSnapshot(SnapshotError):
    """A snapshot written by a model config of other shapes: its state cannot be loaded."""


class SnapshotPointer(msgspec.Struct, frozen=True):
    """KV value (sessions bucket, key snap.<session>): the session's latest snapshot."""

    object: str
    fingerprint: str
    nbytes: int
    created: float  # unix seconds
    memory_version: int = -1  # -1: no memory in the snapshot
    memory_last_seq: int = -1
    context_bytes: int = -1  # bytes the session had read (from the caller's meta; -1: unknown)


_ptr_enc = msgspec.json.Encoder()
_ptr_dec = msgspec.json.Decoder(SnapshotPointer)


@dataclass(frozen=True)
class Snapshot:
    session: str
    state: dict[str, Tensor]  # recurrent state rows by name, on the host, as saved
    memory: SessionMemory | None
    fingerprint: str
    created: float
    meta: dict[str, Any] = field(default_factory=dict)  # the caller's JSON metadata


def model_fingerprint(cfg: ModelConfig) -> str:
    """Hash of everything that shapes the state (the config without its name, the format)."""
    d = cfg.to_dict()
    d.pop("name", None)
    blob = json.dumps({"format_version": FORMAT_VERSION, "config": d}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def encode_snapshot(
    session: str,
    state: dict[str, Tensor],
    memory: SessionMemory | None,
    model_config: ModelConfig,
    meta: dict[str, Any] | None = None,
    created: float | None = None,
) -> bytes:
    # clone: a row of a larger pool shares its storage, which safetensors refuses
    tensors = {f"state.{k}": v.detach().cpu().contiguous().clone() for k, v in state.items()}
    if memory is not None:
        raw = bytearray(memory.to_bytes())
        tensors["memory"] = torch.frombuffer(raw, dtype=torch.uint8)
    head = dict(
        format=FORMAT,
        session=session,
        fingerprint=model_fingerprint(model_config),
        config={k: v for k, v in model_config.to_dict().items() if k != "name"},
        created=time.time() if created is None else created,
        meta=meta or {},
    )
    return st_save(tensors, metadata={"snapshot": json.dumps(head)})


def decode_snapshot(data: bytes, model_config: ModelConfig) -> Snapshot:
    """Bytes -> Snapshot; IncompatibleSnapshot if written for a config of other shapes."""
    try:
        head = json.loads(st_metadata(data)["snapshot"])
        fmt = head.get("format")
    except Exception as e:
        raise SnapshotError(f"not a snapshot ({type(e).__name__}: {e})") from None
    if fmt != FORMAT:
        raise SnapshotError(f"snapshot format {fmt!r}, this code reads {FORMAT}")
    _check_compatible(head["session"], head["fingerprint"], model_config, head.get("config", {}))
    try:
        tensors = st_load(data)
        memory = None
        if "memory" in tensors:
            memory = SessionMemory.from_bytes(tensors.pop("memory").numpy().tobytes())
    except Exception as e:
        raise SnapshotError(f"snapshot of {head['session']}: corrupt ({e})") from None
    state = {k.removeprefix("state."): v for k, v in tensors.items()}
    return Snapshot(
        head["session"], state, memory, head["fingerprint"], head["created"], head["meta"]
    )


def _check_compatible(
    session: str, fingerprint: str, cfg: ModelConfig, written: dict[str, Any]
) -> None:
    want = model_fingerprint(cfg)
    if fingerprint == want:
        return
    mine = cfg.to_dict()
    keys = (set(written) | set(mine)) - {"name"}
    diff = sorted(k for k in keys if written.get(k) != mine.get(k))
    detail = "; differing fields: " + ", ".join(
        f"{k} {written.get(k)!r} (snapshot) vs {mine.get(k)!r} (model)" for k in diff
    )
    raise IncompatibleSnapshot(
        f"snapshot of session {session} was written by model config {fingerprint},"
        f" this model is {want}{detail}"
    )


# ----- the store -----


async def save_snapshot(
    bus: Bus,
    session: str,
    state: dict[str, Tensor],
    memory: SessionMemory | None,
    model_config: ModelConfig,
    meta: dict[str, Any] | None = None,
) -> SnapshotPointer:
    """Write a snapshot object, then point the session at it, then drop the one before."""
    check_token(session)
    created = time.time()
    data = encode_snapshot(session, state, memory, model_config, meta, created)
    name = f"{session}/{time.time_ns()}-{secrets.token_hex(4)}"
    await bus.snapshots.put(name, data)
    ptr = SnapshotPointer(
        name,
        model_fingerprint(model_config),
        len(data),
        created,
        -1 if memory is None else memory.version,
        -1 if memory is None else memory.last_seq,
        int((meta or {}).get("context_bytes", -1)),
    )
    old = await snapshot_pointer(bus, session)
    await bus.sessions.put(snapshot_key(session), _ptr_enc.encode(ptr))
    if old is not None and old.object != name:
        with contextlib.suppress(ObjectNotFoundError):  # already gone: fine
            await bus.snapshots.delete(old.object)
    return ptr


async def snapshot_pointer(bus: Bus, session: str) -> SnapshotPointer | None:
    try:
        entry = await bus.sessions.get(snapshot_key(session))
    except KeyNotFoundError:
        return None
    return _ptr_dec.decode(entry.value or b"")


async def load_snapshot(bus: Bus, session: str, model_config: ModelConfig) -> Snapshot | None:
    """The session's latest snapshot, None if it has none; IncompatibleSnapshot (naming the
    fields that differ) if it was written for another model config."""
    ptr = await snapshot_pointer(bus, session)
    if ptr is None:
        return None
    try:
        result = await bus.snapshots.get(ptr.object)
    except ObjectNotFoundError:
        raise SnapshotError(f"session {session}: snapshot object {ptr.object} is missing") from None
    return decode_snapshot(bytes(result.data or b""), model_config)


async def delete_snapshot(bus: Bus, session: str) -> bool:
    ptr = await snapshot_pointer(bus, session)
    if ptr is None:
        return False
    await bus.sessions.delete(snapshot_key(session))
    with contextlib.suppress(ObjectNotFoundError):
        await bus.snapshots.delete(ptr.object)
    return True
