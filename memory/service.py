"""MemoryService: the memory system as the rest of the project sees it. It owns a bus connection,
submits consolidation jobs, runs consolidation workers in a task group, reads sessions' current
memory versions (through a bounded cache), and is the `bwr worker` process entry point.

service.py never decides the order of jobs or takes the lock (worker.py does) and never changes
a memory itself (store.py does); it never parses flags.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import torch
from anyio.abc import TaskStatus
from nats.js.errors import KeyNotFoundError, ObjectNotFoundError
from torch import Tensor

from memory.bus import Bus, consolidate_subject, memory_key, session_of
from memory.config import MemoryConfig
from memory.jobs import ConsolidateJob, MemoryPointer, decode_pointer, encode_job, encode_json
from memory.store import CompressFn, SessionMemory
from memory.worker import TRANSIENT, Worker, collect, next_pointer, object_name
from model import ByteLM, ModelConfig

log = logging.getLogger("bwr.memory")


class JobTooLarge(ValueError):
    """A job over the server's max payload (raise the server's max_payload or shorten segments)."""


def model_compressor(model: ByteLM) -> CompressFn:
    """The model's compressor as the store wants it: CPU float32 in and out, no autograd."""
    device = next(model.parameters()).device
    # On a GPU, compression runs on a stream of its own: decode's graphs never queue behind it.
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None  # type: ignore[no-untyped-call]

    def compress(hidden: Tensor, level: int) -> Tensor:
        with torch.no_grad():  # no_grad is per thread: set here, where the worker thread runs it
            if stream is None:
                return model.compress(hidden.to(device), level).float().cpu()  # (1, m, D)
            with torch.cuda.stream(stream):
                out = model.compress(hidden.to(device, non_blocking=True), level).float().cpu()
            return out

    return compress


@dataclass
class WorkerStats:
    applied: int = 0  # versions committed by this service's workers
    duplicates: int = 0  # redeliveries of jobs already applied
    waits: int = 0  # naks for a missing predecessor
    conflicts: int = 0  # compare-and-sets lost to another worker
    failed: int = 0  # jobs given up (skipped)
    errors: int = 0  # deliveries that raised (retried)


class MemoryService:
    """A NATS connection, the consolidation workers, and the read side of session memories."""

    def __init__(
        self, bus: Bus, model_config: ModelConfig, compress: CompressFn | None = None
    ) -> None:
        self.bus = bus
        self.config: MemoryConfig = bus.config
        self.model_config = model_config
        self.compress = compress
        self.empty = SessionMemory.for_model(model_config, self.config)  # checks the levels
        self.stats = WorkerStats()
        # session -> (object name, that version); bounded by config.cache_sessions
        self._cache: OrderedDict[str, tuple[str, SessionMemory]] = OrderedDict()
        # (session, seq) -> failed deliveries here; bounded
        self._failures: OrderedDict[tuple[str, int], int] = OrderedDict()

    @classmethod
    async def connect(
        cls,
        url: str,
        model_config: ModelConfig,
        compress: CompressFn | None = None,
        config: MemoryConfig | None = None,
    ) -> MemoryService:
        return cls(await Bus.connect(url, config), model_config, compress)

    async def close(self) -> None:
        await self.bus.close()

    async def __aenter__(self) -> MemoryService:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        with anyio.CancelScope(shield=True):
            await self.close()

    # ----- the write side -----

    async def submit_segment(
        self, session: str, seq: int, segment_index: int, span: tuple[int, int], hidden: Tensor
    ) -> None:
        """Queue a closed segment's hidden states (S, D) for consolidation (stored as float16)."""
        await self.submit(ConsolidateJob.from_tensor(session, seq, segment_index, span, hidden))

    async def submit(self, job: ConsolidateJob) -> None:
        """Publish a job; retried while the server is away (Nats-Msg-Id makes a retry harmless)."""
        data = encode_job(job)
        if len(data) > self.bus.nc.max_payload:
            raise JobTooLarge(
                f"job {job.session}/{job.seq}: {len(data)} bytes,"
                f" server max_payload {self.bus.nc.max_payload}"
            )
        headers = {"Nats-Msg-Id": f"{job.session}:{job.seq}"}
        with anyio.fail_after(self.config.submit_timeout_s):
            while True:
                try:
                    await self.bus.js.publish(
                        consolidate_subject(job.session),
                        data,
                        headers=headers,
                        stream=self.config.memory_stream,
                    )
                    return
                except TRANSIENT as e:
                    log.info("submit %s/%s: %s; retrying", job.session, job.seq, type(e).__name__)
                    await anyio.sleep(self.config.reconnect_wait_s)

    async def run_workers(
        self, n: int | None = None, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run n workers (default config.workers) until cancelled; started once all are pulling."""
        if self.compress is None:
            raise RuntimeError("this MemoryService has no compressor: give one to run workers")
        async with anyio.create_task_group() as tg:
            for i in range(self.config.workers if n is None else n):
                await tg.start(Worker(self, f"w{i}").run)
            task_status.started()

    async def install(self, session: str, memory: SessionMemory) -> MemoryPointer:
        """Make `memory` the session's current version (resume from a snapshot): unconditional."""
        name = object_name(session, memory.version)
        await self.bus.memory.put(name, memory.to_bytes())
        old, _ = await self.pointer(session)
        ptr = next_pointer(memory, name, old, self.config.keep_versions)
        await self.bus.sessions.put(memory_key(session), encode_json(ptr))
        self._cache_put(session, name, memory)
        if old is not None:
            await collect(self.bus, old, ptr)
        return ptr

    # ----- the read side -----

    async def pointer(self, session: str) -> tuple[MemoryPointer | None, int]:
        """-> (the session's pointer or None, its KV revision (0 when absent))."""
        try:
            entry = await self.bus.sessions.get(memory_key(session))
        except KeyNotFoundError:
            return None, 0
        assert entry.value is not None and entry.revision is not None
        return decode_pointer(entry.value), entry.revision

    async def load(self, session: str, ptr: MemoryPointer | None) -> SessionMemory:
        """The version a pointer names (the empty memory for None), from the cache or the store."""
        if ptr is None:
            return self.empty
        hit = self._cache.get(session)
        if hit is not None and hit[0] == ptr.object:
            self._cache.move_to_end(session)
            return hit[1]
        result = await self.bus.memory.get(ptr.object)
        memory = SessionMemory.from_bytes(bytes(result.data or b""))
        self._cache_put(session, ptr.object, memory)
        return memory

    async def latest(self, session: str) -> SessionMemory | None:
        """The session's current memory version, or None if it has none yet."""
        for _ in range(3):  # a version can be collected between reading the pointer and its object
            ptr, _rev = await self.pointer(session)
            if ptr is None:
                return None
            try:
                return await self.load(session, ptr)
            except ObjectNotFoundError:
                continue
        raise RuntimeError(f"session {session}: memory pointer keeps naming collected versions")

    async def pending_jobs(self) -> int:
        """Jobs queued or taken and not yet acked (work-queue messages still in the stream)."""
        info = await self.bus.js.stream_info(self.config.memory_stream)
        return int(info.state.messages)

    async def pending_by_session(self) -> dict[str, int]:
        info = await self.bus.js.stream_info(self.config.memory_stream, subjects_filter=">")
        return {session_of(s): int(n) for s, n in (info.state.subjects or {}).items()}

    async def inspect(self, session: str) -> dict[str, Any]:
        """Pointer, levels and pending jobs of one session, for the HTTP API and the dashboard."""
        memory = await self.latest(session)
        pending = (await self.pending_by_session()).get(session, 0)
        base = (memory or self.empty).summary()
        # memory_bytes: the name the gateway's session view adds to the state bytes
        return dict(session=session, pending_jobs=pending, memory_bytes=base["nbytes"], **base)

    # ----- shared by the workers -----

    def _cache_put(self, session: str, name: str, memory: SessionMemory) -> None:
        self._cache[session] = (name, memory)
        self._cache.move_to_end(session)
        while len(self._cache) > self.config.cache_sessions:
            self._cache.popitem(last=False)

    def _failed(self, job: ConsolidateJob) -> int:
        """Count a failed delivery of job -> failures so far (bounded table, oldest forgotten)."""
        key = (job.session, job.seq)
        n = self._failures.pop(key, 0) + 1
        self._failures[key] = n
        while len(self._failures) > 4 * self.config.cache_sessions:
            self._failures.popitem(last=False)
        return n

    def apply(self, memory: SessionMemory, job: ConsolidateJob) -> SessionMemory:
        """The next version: compress the segment, run the policy (blocking: call in a thread)."""
        assert self.compress is not None
        with torch.no_grad():
            slots = self.compress(job.tensor().unsqueeze(0), 1)[0]  # (S, D) -> (m, D)
            return memory.apply_segment(
                job.seq, slots, job.span, self.compress, segment=job.segment
            )


# ----- the worker process -----


def run_worker_process(
    nats_url: str,
    model: str | Path | ModelConfig,
    *,
    config: MemoryConfig | None = None,
    workers: int | None = None,
    device: str = "cpu",
    data_dir: str | Path = ".data/worker",
) -> None:
    """`bwr worker`: consolidation workers for a checkpoint (directory) or, for development, a
    ModelConfig with seeded random weights; runs until SIGINT or SIGTERM. It follows
    model.updated like the engine does (starting from the checkpoint ckpt.latest names, if any),
    so its compressor always runs the weights the engine serves; fetched checkpoints go under
    data_dir/checkpoints."""
    anyio.run(_worker_main, nats_url, model, config or MemoryConfig(), workers, device, data_dir)


class _Reloadable:
    """A model's compressor whose weights can be replaced between two compressions (a lock: a
    segment is never compressed by half old, half new weights)."""

    def __init__(self, net: ByteLM) -> None:
        self.net = net
        self.lock = threading.Lock()
        self._compress = model_compressor(net)
        self.version = 0

    def compress(self, hidden: Tensor, level: int) -> Tensor:
        with self.lock:
            return self._compress(hidden, level)

    async def load(self, path: str) -> None:
        from model.checkpoint import load_weights

        device = next(self.net.parameters()).device
        tensors = await anyio.to_thread.run_sync(load_weights, path, self.net.config, device)

        def swap() -> None:
            with self.lock, torch.no_grad():
                self.net.load_state_dict(tensors, strict=not self.net.config.tie_embeddings)

        await anyio.to_thread.run_sync(swap)
        self.version += 1
        log.info("worker: compressing with %s (reload %d)", Path(path).name, self.version)


async def _worker_main(
    url: str,
    model: str | Path | ModelConfig,
    config: MemoryConfig,
    workers: int | None,
    device: str,
    data_dir: str | Path,
) -> None:
    from memory.reload import follow_model_updates
    from memory.snapshots import model_fingerprint

    if isinstance(model, ModelConfig):
        log.warning("worker: model %s with random weights (no checkpoint given)", model.name)
        torch.manual_seed(0)
        net = ByteLM(model).to(device).eval()
    else:
        net = ByteLM.load(str(model), device).eval()
    n = config.workers if workers is None else workers
    weights = _Reloadable(net)
    svc = await MemoryService.connect(url, net.config, weights.compress, config)
    async with svc, anyio.create_task_group() as tg:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            await tg.start(
                partial(
                    follow_model_updates,
                    svc.bus,
                    weights.load,
                    data_dir=data_dir,
                    fingerprint=model_fingerprint(net.config),
                    catch_up=True,
                )
            )
            await tg.start(svc.run_workers, n)
            log.info("worker: %d consolidation workers on %s", n, url)
            async for _ in signals:  # stop intake: cancel the pulls; unacked jobs come back
                tg.cancel_scope.cancel()
                break
