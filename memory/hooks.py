"""EngineMemory: the engine's MemoryHooks, served by a MemoryService over NATS.

hooks.py moves data between the engine and the bus and nothing else: closed segments out (their
hidden states copied to the host on a side CUDA stream, so the decode stream never waits), new
memory versions in (fetched when `memory.updated.<session>` announces them, handed to the engine
to install between steps). It never compresses (workers do) and never touches a step.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass

import anyio
import torch
from anyio.abc import TaskStatus
from nats.aio.msg import Msg
from torch import Tensor

from engine import MemoryUpdate
from memory.bus import session_of
from memory.jobs import decode_updated
from memory.service import MemoryService
from memory.store import SessionMemory

log = logging.getLogger("bwr.memory")


@dataclass
class _Segment:
    session: str
    index: int
    start: int
    hidden: Tensor  # (S, D) float16 on the host (being filled when `ready` is set)
    ready: torch.cuda.Event | None


class EngineMemory:
    def __init__(self, service: MemoryService, capacity: int, max_pending: int = 4096) -> None:
        self.service = service
        self.capacity = capacity  # slots a session reads (the engine's memory_capacity)
        self.segment_len = service.model_config.segment_len
        self.max_pending = max_pending
        self._out: deque[_Segment] = deque()  # closed segments waiting to be published
        self._wake = asyncio.Event()
        self._ready: list[MemoryUpdate] = []
        self._installed: dict[str, int] = {}  # session -> version handed to the engine
        self._latest: dict[str, SessionMemory] = {}  # session -> its version handed last
        self._namespaces: dict[str, SessionMemory] = {}  # session -> namespace memory it reads
        self._live: set[str] = set()
        self._stream: torch.cuda.Stream | None = None
        self.submitted = 0
        self.peak_pending = 0

    # ----- the engine's side (event loop, between steps) -----

    def segment_closed(self, session: str, index: int, start: int, hidden: Tensor) -> None:
        self._live.add(session)
        if hidden.is_cuda:
            if self._stream is None:
                self._stream = torch.cuda.Stream(hidden.device)  # type: ignore[no-untyped-call]
            self._stream.wait_stream(torch.cuda.current_stream(hidden.device))
            with torch.cuda.stream(self._stream):
                host = torch.empty(hidden.shape, dtype=torch.float16, pin_memory=True)
                host.copy_(hidden.to(torch.float16), non_blocking=True)
                hidden.record_stream(self._stream)
                ready: torch.cuda.Event | None = torch.cuda.Event()  # type: ignore[no-untyped-call]
                assert ready is not None
                ready.record(self._stream)
        else:
            host, ready = hidden.to(torch.float16), None
        self._out.append(_Segment(session, index, start, host, ready))
        self.peak_pending = max(self.peak_pending, len(self._out))
        if len(self._out) > self.max_pending:
            log.warning(
                "memory: %d segments waiting to be published (bus slow or away)", len(self._out)
            )
        self._wake.set()

    def take_updates(self) -> list[MemoryUpdate]:
        out, self._ready = self._ready, []
        return out

    def forget(self, session: str) -> None:
        """The session closed: stop fetching its versions (its jobs still complete)."""
        self._live.discard(session)
        self._installed.pop(session, None)
        self._latest.pop(session, None)
        self._namespaces.pop(session, None)

    def update_for(self, session: str, memory: SessionMemory, context_bytes: int) -> MemoryUpdate:
        """A version as the engine installs it (padded to capacity; ages come from `written`).
        A session opened with a namespace reads that namespace's slots after its own, as the
        read-only level NAMESPACE_LEVEL; their `written` lies in the future, so their age is 0."""
        current = context_bytes // self.segment_len
        ns = self._namespaces.get(session)
        written = memory.written(self.capacity)
        if ns is not None:
            written[min(memory.slot_count, self.capacity) :] = 1 << 40
        self._latest[session] = memory
        levels = memory.level_summaries()
        if ns is not None:  # the namespace shows as level 0 (NAMESPACE_LEVEL)
            covered = sum(lv["bytes_covered"] for lv in ns.level_summaries())
            namespace_level = {"level": 0, "slots": ns.slot_count, "capacity": ns.slot_count}
            levels = [{**namespace_level, "bytes_covered": covered}, *levels]
        return MemoryUpdate(
            session=session,
            version=memory.version,
            memory=memory.to_slots(self.capacity, current, namespace=ns),
            written=written,
            levels=levels,
        )

    def set_namespace(self, session: str, namespace: SessionMemory, context_bytes: int) -> None:
        """The session reads `namespace` from now on (its own memory stays as it was)."""
        self._live.add(session)
        self._namespaces[session] = namespace
        own = self._latest.get(session) or self.service.empty
        self._ready.append(self.update_for(session, own, context_bytes))

    def install(self, session: str, memory: SessionMemory, context_bytes: int) -> None:
        """Hand a version to the engine now (a session resumed with its memory)."""
        self._live.add(session)
        self._installed[session] = memory.version
        self._ready.append(self.update_for(session, memory, context_bytes))

    # ----- background tasks -----

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Publish closed segments and follow memory.updated.* until cancelled."""
        sub = await self.service.bus.nc.subscribe("memory.updated.*", cb=self._on_updated)
        task_status.started()
        try:
            while True:
                if not self._out:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                seg = self._out[0]
                if seg.ready is not None:
                    await anyio.to_thread.run_sync(seg.ready.synchronize)
                await self.service.submit_segment(
                    seg.session,
                    seg.index,
                    seg.index,
                    (seg.start, seg.start + self.segment_len),
                    seg.hidden,
                )
                self._out.popleft()  # only once JetStream has it: nothing is lost on a retry
                self.submitted += 1
        finally:
            with anyio.CancelScope(shield=True):
                await sub.unsubscribe()

    async def _on_updated(self, msg: Msg) -> None:
        session = session_of(msg.subject)
        if session not in self._live:
            return
        try:
            notice = decode_updated(msg.data)
            if notice.version <= self._installed.get(session, -1):
                return
            memory = await self.service.latest(session)
        except Exception:  # a bad notice or a bus hiccup: the next notice catches up
            log.exception("memory: could not fetch %s's new version", session)
            return
        if (
            memory is None
            or memory.version <= self._installed.get(session, -1)
            or session not in self._live
        ):
            return
        self._installed[session] = memory.version
        covered = max((end for _, _, end in memory.spans()), default=0)
        self._ready.append(self.update_for(session, memory, covered))

    @property
    def pending(self) -> int:
        return len(self._out)
