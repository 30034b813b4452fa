"""persistence.py: what `bwr up` keeps on the bus. Consolidation of session memories (the
MemoryService, its workers and the engine's memory hooks, all in this process by default), session
snapshots at turn boundaries and on shutdown, resume of a session after a restart, and reads of
namespaces.

It wires memory/ into the gateway and owns no protocol: sessions.py calls `restore`, ws.py and
app.py call `turn_done` and `save_all`, http.py reads `inspect` and `namespace`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
from functools import partial
from typing import Any

import anyio
from anyio.abc import TaskStatus

from engine import Engine, SessionSnapshot, UnknownSession
from memory.config import MemoryConfig
from memory.hooks import EngineMemory
from memory.namespaces import namespace_info, namespace_memory, serve_ingest
from memory.reload import follow_model_updates
from memory.service import MemoryService, model_compressor
from memory.snapshots import (
    IncompatibleSnapshot,
    SnapshotError,
    load_snapshot,
    model_fingerprint,
    save_snapshot,
)
from model import ByteLM

log = logging.getLogger("bwr.persistence")


class SnapshotRefused(UnknownSession):
    """A snapshot that exists but cannot be used (written for another model config)."""

    code = "incompatible_snapshot"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class MemoryPlugin:
    def __init__(
        self,
        nats_url: str,
        model: ByteLM,
        config: MemoryConfig | None = None,
        workers: int = 2,
        data_dir: str = ".data",
        ingest: bool = True,
    ) -> None:
        self.url = nats_url
        self.data_dir = data_dir  # fetched checkpoints land in data_dir/checkpoints
        self.ingest = ingest  # run the DOCS ingest worker in this process
        self.model = model
        self.config = config or MemoryConfig()
        self.workers = workers
        # Memory slots a session reads (the engine pool's width): its own levels, then as many
        # again for a namespace it was opened with.
        self.capacity = 2 * self.config.max_slots
        self.service: MemoryService | None = None
        self.hooks: EngineMemory | None = None
        self.engine: Engine | None = None
        self._dirty: dict[str, dict[str, Any]] = {}  # session -> metadata of a snapshot to write
        self._wake = asyncio.Event()
        self._background: list[asyncio.Future[None]] = []
        self.saved = 0

    async def connect(self) -> EngineMemory:
        self.service = await MemoryService.connect(
            self.url, self.model.config, model_compressor(self.model), self.config
        )
        self.hooks = EngineMemory(self.service, self.capacity)
        return self.hooks

    async def run(
        self, engine: Engine, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Consolidation workers, the hooks' publisher, the ingest worker, the follower of
        model.updated (hot reload between steps) and the snapshot writer, until cancelled."""
        assert self.service is not None and self.hooks is not None
        self.engine = engine
        async with anyio.create_task_group() as tg:
            await tg.start(self.service.run_workers, self.workers)
            await tg.start(self.hooks.run)
            if self.ingest:
                await tg.start(
                    partial(serve_ingest, self.url, self.model, memory_config=self.config)
                )
            follow = partial(
                follow_model_updates,
                self.service.bus,
                engine.load_weights,
                data_dir=self.data_dir,
                fingerprint=model_fingerprint(self.model.config),
            )
            await tg.start(follow)
            tg.start_soon(self._writer)
            task_status.started()

    async def close(self) -> None:
        if self.service is not None:
            with anyio.CancelScope(shield=True):
                await self.service.close()

    # ----- snapshots -----

    def turn_done(self, session: str, meta: dict[str, Any]) -> None:
        """A turn ended: snapshot the session soon (the latest request per session wins)."""
        self._dirty[session] = meta
        self._wake.set()

    async def _writer(self) -> None:
        while True:
            if not self._dirty:
                self._wake.clear()
                await self._wake.wait()
                continue
            session, meta = next(iter(self._dirty.items()))
            del self._dirty[session]
            try:
                await self.save(session, meta)
            except UnknownSession:
                pass  # closed meanwhile: nothing to keep
            except Exception:  # the bus is away: the next turn's snapshot catches up
                log.exception("snapshot of %s failed", session)

    async def save(self, session: str, meta: dict[str, Any]) -> None:
        assert self.engine is not None and self.service is not None
        snap = await self.engine.snapshot(session)
        memory = await self.service.latest(session) if snap.memory_version >= 0 else None
        state = dict(snap.state)
        state["_logits"] = snap.logits
        meta = dict(
            meta,
            seed=snap.seed,
            counter=snap.counter,
            context_bytes=snap.context_bytes,
            pending=base64.b64encode(snap.pending).decode(),
            memory_version=snap.memory_version,
        )
        await save_snapshot(self.service.bus, session, state, memory, self.model.config, meta)
        self.saved += 1

    async def save_all(self, sessions: dict[str, dict[str, Any]]) -> None:
        """Shutdown: snapshot every live session now."""
        for session, meta in sessions.items():
            try:
                await self.save(session, meta)
            except Exception:
                log.exception("snapshot of %s at shutdown failed", session)

    async def restore(
        self, session: str, token: str
    ) -> tuple[SessionSnapshot, dict[str, Any]] | None:
        """The session's last snapshot if the token matches -> what engine.open(restore=) takes
        and the metadata saved with it; None if there is none (or the token is wrong)."""
        assert self.service is not None
        try:
            snap = await load_snapshot(self.service.bus, session, self.model.config)
        except IncompatibleSnapshot as e:
            raise SnapshotRefused(str(e)) from None
        except SnapshotError as e:
            log.warning("snapshot of %s unreadable: %s", session, e)
            return None
        if snap is None:
            return None
        meta = snap.meta
        if not hmac.compare_digest(str(meta.get("token_hash", "")), token_hash(token)):
            return None
        state = dict(snap.state)
        logits = state.pop("_logits")
        restored = SessionSnapshot(
            session=session,
            state=state,
            logits=logits,
            seed=int(meta["seed"]),
            counter=int(meta["counter"]),
            context_bytes=int(meta["context_bytes"]),
            pending=base64.b64decode(meta["pending"]),
            memory_version=snap.memory.version if snap.memory is not None else -1,
        )
        if snap.memory is not None and self.hooks is not None:
            self.hooks.install(session, snap.memory, restored.context_bytes)
        return restored, meta

    def open_namespace(self, session: str, namespace: str, context_bytes: int = 0) -> None:
        """A session opened with a namespace: read that namespace's memory (fetched in the
        background; the engine installs it between steps)."""
        assert self.hooks is not None
        hooks = self.hooks

        async def fetch() -> None:
            try:
                memory = await self.namespace_memory(namespace)
            except Exception:
                log.exception("namespace %s: memory unreadable", namespace)
                return
            if memory is not None:
                hooks.set_namespace(session, memory, context_bytes)

        self._background.append(asyncio.ensure_future(fetch()))
        self._background = [t for t in self._background if not t.done()]

    # ----- reads -----

    async def inspect(self, session: str) -> dict[str, Any]:
        assert self.service is not None
        return await self.service.inspect(session)

    async def namespace(self, name: str) -> dict[str, Any]:
        assert self.service is not None
        return await namespace_info(self.service.bus, name)

    async def namespace_memory(self, name: str) -> Any:
        assert self.service is not None
        return await namespace_memory(self.service, name)
