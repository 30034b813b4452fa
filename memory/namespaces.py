"""Namespace memories: the ingest worker that prefills documents from the DOCS stream into their
namespace's memory, and the reads a session (and `GET /v1/namespaces/{ns}`) makes of it.

A namespace's memory is a SessionMemory like a session's (same compressor, same levels, same
bound), stored in the `memory` object store as `ns.<namespace>/<version>-<nonce>`. Its KV entry
`nsinfo.<namespace>` (sessions bucket) holds, in one value moved by one compare-and-set, the
pointer to the current version, the counters (documents, chunks, bytes, segments), a summary of
the levels, and the stream sequences applied but perhaps not yet acked.

The worker. A durable pull consumer `ingest` on DOCS; each fetched batch: drop the redeliveries
(their stream sequence is in `applied`: committed, ack lost), prefill the rest through the model
in one batched pass (rows of similar length, padded; memory reads off), compress every segment of
segment_len bytes (and a long enough last partial one, masked) into m slots, apply them in stream
order to the namespace's memory, store the version, compare-and-set nsinfo, then ack. Killed
before the compare-and-set, the batch comes back and is applied once; after it and before the
acks, the redelivery finds its sequences applied. `applied` is pruned to the sequences above the
consumer's ack floor, so it stays as small as the messages in flight. Each chunk of a document is
prefilled from a zero state (a chunk is most of a max_payload: the cut costs nothing a segment
of memory would see).

namespaces.py owns the namespace memory's place on the bus and the worker. The document format
is ingest.py's; the memory policy is store.py's; it never serves sessions (the engine reads the
slots through the gateway's hooks).
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
import nats.errors
import torch
from anyio.abc import TaskStatus
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, ObjectNotFoundError
from torch import Tensor

from memory.bus import Bus, check_token, session_of
from memory.config import MemoryConfig
from memory.ingest import parse_doc
from memory.jobs import MemoryPointer
from memory.service import MemoryService, model_compressor
from memory.store import SessionMemory
from memory.worker import TRANSIENT, collect, next_pointer
from model.codec import PAD, encode
from model.lm import ByteLM

log = logging.getLogger("bwr.ingest")

NSINFO_KEY = "nsinfo"  # sessions KV: nsinfo.<namespace> -> NamespaceInfo


class NamespaceInfo(msgspec.Struct):
    """KV value at nsinfo.<namespace>."""

    namespace: str
    documents: int = 0  # documents whose first chunk was applied
    chunks: int = 0  # messages applied
    bytes: int = 0  # body bytes applied (also the byte offset of the next segment's span)
    segments: int = 0  # segments compressed into the memory
    memory: MemoryPointer | None = None  # current memory version
    levels: list[dict[str, int]] = msgspec.field(default_factory=list)  # its level summaries
    applied: tuple[int, ...] = ()  # stream seqs applied, above the consumer's ack floor
    updated: float = 0.0  # unix seconds of the last commit


_enc = msgspec.json.Encoder()
_info_dec = msgspec.json.Decoder(NamespaceInfo)


def info_key(namespace: str) -> str:
    return f"{NSINFO_KEY}.{check_token(namespace, 'namespace')}"


def cache_key(namespace: str) -> str:
    """The MemoryService cache key of a namespace memory (a dot: never a session id)."""
    return f"ns.{namespace}"


@dataclass(frozen=True)
class IngestConfig:
    consumer: str = "ingest"  # durable pull consumer on DOCS
    ack_wait_s: float = 60.0  # a taken batch not acked within this comes back (kept alive)
    max_ack_pending: int = 256  # messages taken and not acked, across all ingest workers
    fetch_batch: int = 32  # most messages one batch takes
    fetch_timeout_s: float = 1.0  # longest one pull waits
    batch_bytes: int = 1 << 18  # bytes (rows x padded length) one model pass prefills
    piece_segments: int = 8  # segments per model call (bounds the hidden states held)
    min_tail: int = 0  # bytes a last partial segment needs to be compressed (0: S // 4)


# ----- the model side: documents -> slots -----


Segment = tuple[Tensor, int, int]  # slots (m, D) on the host, start, end (offsets in the body)


@torch.no_grad()
def segment_slots(model: ByteLM, bodies: list[bytes], cfg: IngestConfig) -> list[list[Segment]]:
    """Each body cut into segments of S bytes, prefilled from a zero state in batches of rows of
    similar length (right-padded: the model is causal, padding never reaches a real byte), each
    segment compressed into m slots for level 1 as a session's closed segment would be."""
    S = model.config.segment_len
    min_tail = cfg.min_tail or max(1, S // 4)
    device = model.embed.weight.device
    out: list[list[Segment]] = [[] for _ in bodies]
    order = sorted(range(len(bodies)), key=lambda i: len(bodies[i]))
    groups: list[list[int]] = [[]]
    first = 0  # padded length of the current group's shortest row
    for i in order:
        padded = -(-max(1, len(bodies[i])) // S) * S
        g = groups[-1]
        # a row joins while the group stays within batch_bytes and pads no row by over a quarter
        if g and ((len(g) + 1) * padded > cfg.batch_bytes or padded > first + max(S, first // 4)):
            groups.append([])
        if not groups[-1]:
            first = padded
        groups[-1].append(i)
    for group in filter(None, groups):
        T = -(-max(1, len(bodies[group[-1]])) // S) * S  # the longest row, padded to segments
        tokens = torch.full((len(group), T), PAD, dtype=torch.long)
        for row, i in enumerate(group):
            tokens[row, : len(bodies[i])] = encode(bodies[i])
        tokens = tokens.to(device)
        state = None
        for p0 in range(0, T, cfg.piece_segments * S):
            piece = tokens[:, p0 : p0 + cfg.piece_segments * S]
            run = model.run(piece, state, None, want_state=True)
            state = run.state
            hidden = run.capture.reshape(len(group), -1, S, run.capture.shape[-1])  # (B, k, S, D)
            full: list[tuple[int, int, Tensor]] = []
            tails: list[tuple[int, int, int, Tensor]] = []
            for row, i in enumerate(group):
                for j in range(hidden.shape[1]):
                    start = p0 + j * S
                    valid = min(S, len(bodies[i]) - start)
                    if valid == S:
                        full.append((i, start, hidden[row, j]))
                    elif valid >= min_tail:
                        tails.append((i, start, valid, hidden[row, j]))
            if full:
                slots = model.compress(torch.stack([h for _, _, h in full]), 1)  # (n, m, D)
                for (i, start, _), s in zip(full, slots.float().cpu(), strict=True):
                    out[i].append((s, start, start + S))
            if tails:
                mask = torch.zeros(len(tails), S, dtype=torch.bool, device=device)
                for k, (_, _, valid, _) in enumerate(tails):
                    mask[k, :valid] = True
                slots = model.compress(torch.stack([h for *_, h in tails]), 1, mask)
                for (i, start, valid, _), s in zip(tails, slots.float().cpu(), strict=True):
                    out[i].append((s, start, start + valid))
    return out


# ----- the worker -----


@dataclass
class _Item:
    msg: Msg
    namespace: str
    seq: int  # stream sequence
    first: bool  # chunk 0 of its document


class IngestWorker:
    """One pull loop of the `ingest` consumer; any number may run, in any processes."""

    def __init__(self, service: MemoryService, model: ByteLM, config: IngestConfig | None = None):
        self.service, self.model = service, model
        self.bus: Bus = service.bus
        self.config = config or IngestConfig()
        self.compress = model_compressor(model)
        self.applied = self.duplicates = self.conflicts = 0  # messages, for tests and logs

    async def ensure_consumer(self) -> None:
        cfg = self.config
        await self.bus.docs_consumer(cfg.consumer, cfg.ack_wait_s, cfg.max_ack_pending)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Pull, prefill, commit, ack until cancelled; started once pulling."""
        await self.ensure_consumer()
        sub = await self.bus.js.pull_subscribe_bind(
            durable=self.config.consumer,
            stream=self.bus.config.docs_stream,
            pending_msgs_limit=4 * self.config.fetch_batch,
        )
        task_status.started()
        try:
            while not self.bus.nc.is_closed:
                try:
                    msgs = await sub.fetch(self.config.fetch_batch, self.config.fetch_timeout_s)
                except nats.errors.TimeoutError:
                    continue
                except TRANSIENT as e:
                    log.info("ingest: fetch: %s", type(e).__name__)
                    await anyio.sleep(self.bus.config.reconnect_wait_s)
                    continue
                if not msgs:  # a status reply instead of messages: look again shortly
                    await anyio.sleep(min(0.05, self.config.fetch_timeout_s))
                    continue
                try:
                    await self.handle(msgs)
                except TRANSIENT as e:  # unacked: they come back
                    log.info("ingest: batch: %s; it comes back", type(e).__name__)
                    for m in msgs:
                        await _quietly(m.nak(delay=self.bus.config.reconnect_wait_s))
        finally:
            with anyio.CancelScope(shield=True):
                if not self.bus.nc.is_closed:
                    await _quietly(sub.unsubscribe())

    async def handle(self, msgs: list[Msg]) -> None:
        """One fetched batch: drop redeliveries, prefill the rest, commit per namespace, ack."""
        items: dict[str, list[_Item]] = {}
        for msg in msgs:
            ns = session_of(msg.subject)
            try:
                check_token(ns, "namespace")
            except ValueError:
                log.error("ingest: dropping a message on %s: not docs.ingest.<ns>", msg.subject)
                await _quietly(msg.term())
                continue
            meta = parse_doc(msg.headers, msg.data)
            item = _Item(msg, ns, msg.metadata.sequence.stream, meta.chunk == 0)
            items.setdefault(ns, []).append(item)
        floor = await self._ack_floor()
        todo: list[tuple[str, NamespaceInfo, int, list[_Item]]] = []
        for ns, its in items.items():
            info, revision = await read_info(self.bus, ns)
            applied = set(info.applied)
            for it in its:
                if it.seq in applied or it.seq <= floor:
                    self.duplicates += 1
                    await _quietly(it.msg.ack())
            fresh = [it for it in its if it.seq not in applied and it.seq > floor]
            if fresh:
                todo.append((ns, info, revision, fresh))
        if not todo:
            return
        bodies = [it.msg.data for *_, fresh in todo for it in fresh]
        all_msgs = [it.msg for *_, fresh in todo for it in fresh]
        segments = await self._in_thread(all_msgs, segment_slots, self.model, bodies, self.config)
        k = 0
        for ns, info, revision, fresh in todo:
            await self._commit(ns, info, revision, fresh, segments[k : k + len(fresh)], floor)
            k += len(fresh)

    async def _commit(
        self,
        ns: str,
        info: NamespaceInfo,
        revision: int,
        fresh: list[_Item],
        segments: list[list[Segment]],
        floor: int,
    ) -> None:
        memory = await self._load(ns, info)
        new = await self._in_thread(
            [it.msg for it in fresh], self._apply, memory, info.bytes, fresh, segments
        )
        ptr = info.memory
        if new.version != memory.version:
            name = f"{cache_key(ns)}/{new.version}-{secrets.token_hex(4)}"
            await self.bus.memory.put(name, new.to_bytes())
            ptr = next_pointer(new, name, info.memory, self.service.config.keep_versions)
        nbytes = sum(len(it.msg.data) for it in fresh)
        updated = NamespaceInfo(
            namespace=ns,
            documents=info.documents + sum(it.first for it in fresh),
            chunks=info.chunks + len(fresh),
            bytes=info.bytes + nbytes,
            segments=info.segments + sum(len(s) for s in segments),
            memory=ptr,
            levels=new.level_summaries(),
            applied=tuple(s for s in info.applied if s > floor) + tuple(it.seq for it in fresh),
            updated=time.time(),
        )
        try:
            if revision == 0:
                await self.bus.sessions.create(info_key(ns), _enc.encode(updated))
            else:
                await self.bus.sessions.update(info_key(ns), _enc.encode(updated), last=revision)
        except KeyWrongLastSequenceError:  # another worker moved it: ours come back and retry
            self.conflicts += 1
            if ptr is not None and ptr is not info.memory:
                await _quietly(self.bus.memory.delete(ptr.object))
            for it in fresh:
                await _quietly(it.msg.nak(delay=self.bus.config.reconnect_wait_s))
            return
        if ptr is not None and ptr is not info.memory:
            self.service._cache_put(cache_key(ns), ptr.object, new)
            if info.memory is not None:
                await _quietly(collect(self.bus, info.memory, ptr))
        for it in fresh:
            await self._ack(it.msg)
        self.applied += len(fresh)
        event = {"namespace": ns, "documents": updated.documents, "bytes": updated.bytes}
        await _quietly(self.bus.publish_event("namespace", _enc.encode(event)))

    def _apply(
        self, memory: SessionMemory, base: int, fresh: list[_Item], segments: list[list[Segment]]
    ) -> SessionMemory:
        """The segments in stream order onto the memory; spans in the namespace's byte stream."""
        with torch.no_grad():
            for it, segs in zip(fresh, segments, strict=True):
                for slots, start, end in segs:
                    memory = memory.apply_segment(
                        memory.last_seq + 1, slots, (base + start, base + end), self.compress
                    )
                base += len(it.msg.data)
        return memory

    async def _load(self, ns: str, info: NamespaceInfo) -> SessionMemory:
        if info.memory is None:
            return self.service.empty
        return await self.service.load(cache_key(ns), info.memory)

    async def _ack(self, msg: Msg) -> None:
        """Ack a committed message (a seam: tests drop it to crash between commit and ack)."""
        await _quietly(msg.ack())

    async def _ack_floor(self) -> int:
        """Every message at or below this stream sequence is acked: it never comes back."""
        ci = await self.bus.js.consumer_info(self.bus.config.docs_stream, self.config.consumer)
        return 0 if ci.ack_floor is None else int(ci.ack_floor.stream_seq)

    async def _in_thread(self, msgs: list[Msg], fn: Any, *args: Any) -> Any:
        """fn(*args) in a worker thread, telling JetStream the messages are being worked on."""
        async with anyio.create_task_group() as tg:

            async def keep_alive() -> None:
                while True:
                    await anyio.sleep(self.config.ack_wait_s / 3)
                    for m in msgs:
                        await _quietly(m.in_progress())

            tg.start_soon(keep_alive)
            result = await anyio.to_thread.run_sync(fn, *args)
            tg.cancel_scope.cancel()
        return result


async def serve_ingest(
    url: str,
    model: ByteLM,
    *,
    config: IngestConfig | None = None,
    memory_config: MemoryConfig | None = None,
    workers: int = 1,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Connect and run `workers` ingest workers for `model` (in eval mode) until cancelled: what
    `bwr up` runs beside the engine, or a `bwr worker --ingest` process."""
    model.eval()
    service = await MemoryService.connect(url, model.config, model_compressor(model), memory_config)
    async with service, anyio.create_task_group() as tg:
        for _ in range(workers):
            await tg.start(IngestWorker(service, model, config).run)
        task_status.started()


# ----- reads -----


async def read_info(bus: Bus, namespace: str) -> tuple[NamespaceInfo, int]:
    """-> (the namespace's info (empty when it has none), its KV revision (0 when absent))."""
    try:
        entry = await bus.sessions.get(info_key(namespace))
    except KeyNotFoundError:
        return NamespaceInfo(namespace), 0
    assert entry.value is not None and entry.revision is not None
    return _info_dec.decode(entry.value), entry.revision


async def namespace_info(bus: Bus, namespace: str) -> dict[str, Any]:
    """What `GET /v1/namespaces/{ns}` shows: documents, chunks, bytes, segments, the memory's
    version, slots and levels (an unknown namespace reads as empty)."""
    info, _ = await read_info(bus, namespace)
    ptr = info.memory
    return dict(
        namespace=namespace,
        documents=info.documents,
        chunks=info.chunks,
        bytes=info.bytes,
        segments=info.segments,
        memory_version=0 if ptr is None else ptr.version,
        slots=0 if ptr is None else ptr.slots,
        memory_bytes=0 if ptr is None else ptr.nbytes,
        levels=info.levels,
        updated=info.updated,
    )


async def namespace_memory(service: MemoryService, namespace: str) -> SessionMemory | None:
    """The namespace's current memory version (None if nothing was ingested into it): pass it as
    `namespace=` to SessionMemory.to_slots to read it as the read-only level NAMESPACE_LEVEL."""
    for _ in range(3):  # a version can be collected between reading the pointer and its object
        info, _rev = await read_info(service.bus, namespace)
        if info.memory is None:
            return None
        try:
            return await service.load(cache_key(namespace), info.memory)
        except ObjectNotFoundError:
            continue
    raise RuntimeError(f"namespace {namespace}: its pointer keeps naming collected versions")


async def _quietly(aw: Any) -> None:
    try:
        await aw
    except (*TRANSIENT, ObjectNotFoundError) as e:
        log.debug("best effort failed: %s", type(e).__name__)
