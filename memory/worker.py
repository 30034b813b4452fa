"""Consolidation workers: apply each session's closed segments to its memory, exactly once and in
order, from the MEMORY work queue, with the session's KV key as its lock.

The protocol of one delivery (the lock is optimistic: a compare-and-set on the KV revision):
read the pointer (version, last_seq, object) of the session; a job whose seq is at most last_seq
is a redelivery: ack it; one past last_seq + 1 waits for its predecessor: nak with a delay;
otherwise load that version, compute the next one in a thread (the compressor may be slow; the
event loop keeps serving, and the job is kept alive with in-progress acks), store it as a new
object, move the pointer with the revision read (on conflict someone else moved it: decide
again), announce memory.updated.<session>, ack. A worker killed anywhere leaves the job unacked;
JetStream redelivers it after ack_wait and the seq check makes the replay harmless.

worker.py owns one worker's pull loop and that protocol. It does not define messages (jobs.py),
names (bus.py), the policy (store.py) or the service the workers run in (service.py).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from typing import TYPE_CHECKING, Any

import anyio
import nats.errors
from anyio.abc import TaskStatus
from nats.aio.msg import Msg
from nats.js.errors import KeyWrongLastSequenceError, ObjectNotFoundError

from memory.bus import memory_key, session_of, updated_subject
from memory.jobs import (
    ConsolidateJob,
    JobFailed,
    JobFormatError,
    JobLifecycle,
    JobState,
    MemoryPointer,
    MemoryUpdated,
    decode_job,
    encode_json,
)
from memory.store import SessionMemory

if TYPE_CHECKING:
    from memory.bus import Bus
    from memory.service import MemoryService

log = logging.getLogger("bwr.memory")


# Errors of the bus itself (server away, reply lost): retried, never counted against a job.
TRANSIENT = (nats.errors.Error, TimeoutError, ConnectionError)


class Worker:
    """One pull loop on the shared durable consumer; any number may run, in any processes."""

    def __init__(self, service: MemoryService, name: str) -> None:
        self.service = service
        self.bus = service.bus
        self.config = service.config
        self.name = name

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        sub = await self.bus.js.pull_subscribe_bind(
            durable=cfg.consumer, stream=cfg.memory_stream, pending_msgs_limit=16
        )
        task_status.started()
        try:
            while not self.bus.nc.is_closed:
                try:
                    msgs = await sub.fetch(1, timeout=cfg.fetch_timeout_s)
                except nats.errors.TimeoutError:
                    continue
                except TRANSIENT as e:  # server away: the client reconnects on its own
                    log.info("%s: fetch: %s", self.name, type(e).__name__)
                    await anyio.sleep(cfg.reconnect_wait_s)
                    continue
                for msg in msgs:
                    try:
                        await self.handle(msg)
                    except Exception:  # a worker outlives any one job; the job comes back
                        log.exception("%s: unexpected error on %s", self.name, msg.subject)
        finally:
            with anyio.CancelScope(shield=True):
                if not self.bus.nc.is_closed:
                    await _quietly(sub.unsubscribe())

    async def handle(self, msg: Msg) -> None:
        """One delivery. Bus errors: nak, it comes back. Other errors: nak until the job has failed
        max_redeliveries times in this service, then skip its seq (and say so on events.>)."""
        try:
            job = decode_job(msg.data)
            if job.session != session_of(msg.subject):
                raise JobFormatError(f"job for {job.session!r} on subject {msg.subject}")
        except JobFormatError as e:
            log.error("%s: dropping a malformed job on %s: %s", self.name, msg.subject, e)
            await _quietly(msg.term())
            return
        stats = self.service.stats
        try:
            await self._process(msg, job, JobLifecycle(job))
            return
        except TRANSIENT as e:
            stats.errors += 1
            log.info(
                "%s: job %s/%s: %s; it comes back",
                self.name,
                job.session,
                job.seq,
                type(e).__name__,
            )
            await _quietly(msg.nak(delay=self.config.order_nak_delay_s))
            return
        except Exception as e:
            stats.errors += 1
            n = self.service._failed(job)
            if n < self.config.max_redeliveries:
                log.warning(
                    "%s: job %s/%s failed (%d of %d): %r",
                    self.name,
                    job.session,
                    job.seq,
                    n,
                    self.config.max_redeliveries,
                    e,
                )
                await _quietly(msg.nak(delay=self.config.order_nak_delay_s))
                return
            log.error(
                "%s: job %s/%s failed %d times; skipping its seq: %r",
                self.name,
                job.session,
                job.seq,
                n,
                e,
            )
            event = JobFailed(job.session, job.seq, n, repr(e))
        life = JobLifecycle(job)
        life.to(JobState.FAILED)
        try:
            await self._process(msg, job, life, skip=True)
        except TRANSIENT:
            await _quietly(msg.nak(delay=self.config.order_nak_delay_s))
            return
        await _quietly(self.bus.publish_event("memory_job_failed", encode_json(event)))

    async def _process(
        self, msg: Msg, job: ConsolidateJob, life: JobLifecycle, *, skip: bool = False
    ) -> None:
        svc, session = self.service, job.session
        while True:
            ptr, revision = await svc.pointer(session)
            last = -1 if ptr is None else ptr.last_seq
            if job.seq <= last:  # a redelivery (or the skip raced a success): already applied
                if not skip:
                    life.to(JobState.DUPLICATE)
                svc.stats.duplicates += 1
                if ptr is not None and job.seq == last:  # its notice may be lost: say it again
                    await self._announce(session, ptr)
                await self._ack(msg)
                life.to(JobState.ACKED)
                return
            if job.seq > last + 1:
                life.to(JobState.WAITING)
                svc.stats.waits += 1
                await msg.nak(delay=self._wait_delay(msg))
                return
            current = await svc.load(session, ptr)
            if skip:
                new = current.skip(job.seq)
            else:
                new = await self._compute(msg, current, job)
            name = object_name(session, new.version)
            await self.bus.memory.put(name, new.to_bytes())
            if not skip:
                life.to(JobState.APPLIED)
            new_ptr = next_pointer(new, name, ptr, self.config.keep_versions)
            if not await self._commit(session, new_ptr, ptr is None, revision):
                svc.stats.conflicts += 1
                await _quietly(self.bus.memory.delete(name))
                if not skip:
                    life.to(JobState.TAKEN)
                continue
            if not skip:
                life.to(JobState.COMMITTED)
                svc.stats.applied += 1
            else:
                svc.stats.failed += 1
            svc._cache_put(session, name, new)
            await _quietly(self._announce(session, new_ptr))
            await self._ack(msg)
            life.to(JobState.ACKED)
            if ptr is not None:
                await _quietly(collect(self.bus, ptr, new_ptr))
            return

    def _wait_delay(self, msg: Msg) -> float:
        """Backoff for a job waiting on its predecessor: doubles per delivery, capped."""
        cfg = self.config
        tries = max(1, msg.metadata.num_delivered or 1)
        return float(min(cfg.order_nak_delay_s * 2 ** min(tries - 1, 16), cfg.max_order_delay_s))

    async def _compute(
        self, msg: Msg, current: SessionMemory, job: ConsolidateJob
    ) -> SessionMemory:
        """Apply the job in a worker thread, telling JetStream we are alive meanwhile."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._keep_alive, msg)
            new = await anyio.to_thread.run_sync(self.service.apply, current, job)
            tg.cancel_scope.cancel()
        return new

    async def _keep_alive(self, msg: Msg) -> None:
        while True:
            await anyio.sleep(self.config.ack_wait_s / 3)
            await _quietly(msg.in_progress())

    async def _commit(self, session: str, ptr: MemoryPointer, create: bool, revision: int) -> bool:
        """Compare-and-set the session's pointer -> False when another worker moved it first."""
        kv = self.bus.sessions
        try:
            if create:
                await kv.create(memory_key(session), encode_json(ptr))
            else:
                await kv.update(memory_key(session), encode_json(ptr), last=revision)
        except KeyWrongLastSequenceError:
            return False
        return True

    async def _announce(self, session: str, ptr: MemoryPointer) -> None:
        notice = MemoryUpdated(session, ptr.version, ptr.last_seq, ptr.object)
        await self.bus.nc.publish(updated_subject(session), encode_json(notice))

    async def _ack(self, msg: Msg) -> None:
        """Ack a job (a seam: tests replace it to crash between commit and ack)."""
        await msg.ack()


def object_name(session: str, version: int) -> str:
    return f"{session}/{version}-{secrets.token_hex(4)}"  # unique: a losing writer never overwrites


def next_pointer(
    memory: SessionMemory, name: str, old: MemoryPointer | None, keep: int
) -> MemoryPointer:
    """The pointer to a new version; the keep - 1 newest older versions stay listed (and stored)."""
    kept = (*old.history, old.object)[-(keep - 1) :] if old is not None and keep > 1 else ()
    return MemoryPointer(
        memory.version, memory.last_seq, name, memory.slot_count, memory.nbytes(), kept
    )


async def collect(bus: Bus, old: MemoryPointer, new: MemoryPointer) -> None:
    """Delete the versions that fell out of the kept window (keep_versions) when old -> new."""
    for name in (*old.history, old.object):
        if name not in new.history and name != new.object:
            with contextlib.suppress(ObjectNotFoundError):
                await bus.memory.delete(name)


async def _quietly(aw: Any) -> None:
    """Best effort on the bus: a lost ack, notice or delete is repaired by redelivery or ignored."""
    try:
        await aw
    except (*TRANSIENT, ObjectNotFoundError) as e:
        log.debug("best effort failed: %s", type(e).__name__)
