"""Consolidation over a real nats-server: exactly once and in order per session, with many
sessions, slow workers, crashing workers, several services at once and a server restart."""

from __future__ import annotations

import contextlib
import random
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import nats
import pytest
import torch

from memory.bus import updated_subject
from memory.config import MemoryConfig
from memory.jobs import ConsolidateJob, JobFailed, decode_updated, encode_job
from memory.service import JobTooLarge, MemoryService, model_compressor
from memory.snapshots import load_snapshot, save_snapshot
from memory.store import SessionMemory
from memory.worker import Worker
from model import ByteLM
from tests.memory.util import TINY, all_applied, cheap_compress, job, reference, slow, wait_until
from tests.nats_server import NatsServer


async def test_segments_applied_once_in_order_with_the_tiny_model(
    nats_server: NatsServer, mem_config: MemoryConfig, tiny_model: ByteLM
) -> None:
    sessions, n = ["alpha", "beta", "gamma"], 10
    compress = model_compressor(tiny_model)
    async with await MemoryService.connect(nats_server.url, TINY, compress, mem_config) as svc:
        notices: list[tuple[str, int]] = []

        async def on_notice(msg: nats.aio.msg.Msg) -> None:
            note = decode_updated(msg.data)
            notices.append((note.session, note.version))

        sub = await svc.bus.nc.subscribe("memory.updated.>", cb=on_notice)
        async with anyio.create_task_group() as tg:
            await tg.start(svc.run_workers, 2)
            for seq in range(n):
                for s in sessions:
                    await svc.submit(job(s, seq))
            await wait_until(lambda: all_applied(svc, sessions, n), 30, "every segment applied")
            tg.cancel_scope.cancel()
        await svc.bus.nc.flush()
        await sub.unsubscribe()
        for s in sessions:
            got = await svc.latest(s)
            assert got is not None and got.same_as(reference(svc, s, n))
            assert (s, n) in notices  # memory.updated.<s> announced the last version
        assert svc.stats.applied == len(sessions) * n
        info = await svc.inspect("alpha")
        assert info["last_seq"] == n - 1 and info["pending_jobs"] == 0
        assert (
            info["slots"] <= mem_config.max_slots and info["bytes_covered"] == n * TINY.segment_len
        )


async def test_many_sessions_slow_workers_two_services_shuffled_submits(
    nats_server: NatsServer, mem_config: MemoryConfig
) -> None:
    """Jobs of a session arrive out of order and four slow workers in two services (two
    connections, as two processes would) race for them: each segment is applied once, in order."""
    sessions, n = [f"s{i}" for i in range(8)], 12
    compress = slow(cheap_compress, 0.002)
    rng = random.Random(7)
    a = await MemoryService.connect(nats_server.url, TINY, compress, mem_config)
    b = await MemoryService.connect(nats_server.url, TINY, compress, mem_config)
    async with a, b, anyio.create_task_group() as tg:
        await tg.start(a.run_workers, 2)
        await tg.start(b.run_workers, 2)
        order = [(s, seq) for s in sessions for seq in range(n)]
        rng.shuffle(order)  # successors often come before their predecessors
        for s, seq in order:
            await a.submit(job(s, seq))
        await wait_until(lambda: all_applied(a, sessions, n), 60, "every segment applied")
        tg.cancel_scope.cancel()
    for s in sessions:
        got = await _latest(nats_server, s, mem_config)
        assert got.same_as(reference(a, s, n)), s
    stats = [a.stats, b.stats]
    assert sum(x.applied for x in stats) == len(sessions) * n  # no version committed twice
    assert sum(x.waits for x in stats) > 0  # the ordering path was exercised
    assert a.stats.applied > 0 and b.stats.applied > 0


async def _latest(server: NatsServer, session: str, cfg: MemoryConfig) -> SessionMemory:
    async with await MemoryService.connect(server.url, TINY, None, cfg) as svc:
        got = await svc.latest(session)
    assert got is not None
    return got


async def test_worker_cancelled_mid_job_the_job_comes_back_and_is_applied_once(
    nats_server: NatsServer, mem_config: MemoryConfig
) -> None:
    entered, release = threading.Event(), threading.Event()
    first = [True]

    def blocking(hidden, level):  # type: ignore[no-untyped-def]
        if first[0]:
            first[0] = False
            entered.set()
            release.wait(10)
        return cheap_compress(hidden, level)

    n = 4
    async with await MemoryService.connect(nats_server.url, TINY, blocking, mem_config) as svc:
        for seq in range(n):
            await svc.submit(job("crash", seq))
        async with anyio.create_task_group() as doomed:
            await doomed.start(svc.run_workers, 1)
            while not entered.is_set():
                await anyio.sleep(0.01)
            doomed.cancel_scope.cancel()  # the worker dies holding seq 0, unacked
            release.set()
        assert (await svc.pointer("crash"))[0] is None  # nothing was committed
        t0 = anyio.current_time()
        async with anyio.create_task_group() as tg:
            await tg.start(svc.run_workers, 2)
            await wait_until(lambda: all_applied(svc, ["crash"], n), 30, "redelivery")
            tg.cancel_scope.cancel()
        assert anyio.current_time() - t0 >= mem_config.ack_wait_s * 0.8  # came back after ack_wait
        got = await svc.latest("crash")
        assert got is not None and got.same_as(reference(svc, "crash", n))
        assert svc.stats.applied == n


class Crash(BaseException):
    """Stands for the process dying: not an Exception, so nothing in the worker catches it."""


class CrashBeforeAck(Worker):
    async def _ack(self, msg) -> None:  # type: ignore[no-untyped-def]
        raise Crash


async def test_worker_dies_between_commit_and_ack_the_redelivery_is_a_duplicate(
    nats_server: NatsServer, mem_config: MemoryConfig
) -> None:
    async with await MemoryService.connect(
        nats_server.url, TINY, cheap_compress, mem_config
    ) as svc:
        await svc.submit(job("late", 0))
        with pytest.raises(BaseExceptionGroup) as caught:
            async with anyio.create_task_group() as tg:
                await tg.start(CrashBeforeAck(svc, "doomed").run)
        assert caught.group_contains(Crash)
        ptr, _ = await svc.pointer("late")
        assert ptr is not None and ptr.last_seq == 0  # committed, never acked
        await svc.submit(job("late", 1))
        async with anyio.create_task_group() as tg:
            await tg.start(svc.run_workers, 1)
            await wait_until(lambda: all_applied(svc, ["late"], 2), 30, "redelivery and next job")
            tg.cancel_scope.cancel()
        assert svc.stats.duplicates >= 1 and svc.stats.applied == 2  # 0 once, then 1
        got = await svc.latest("late")
        assert got is not None and got.same_as(reference(svc, "late", 2))


async def test_nats_restart_mid_stream_loses_no_job_and_no_snapshot(
    nats_server: NatsServer, mem_config: MemoryConfig, tiny_model: ByteLM
) -> None:
    sessions, n = ["r0", "r1", "r2"], 12
    compress = slow(cheap_compress, 0.02)
    state = {k: v[0] for k, v in tiny_model.allocate_state(1).items()}
    async with await MemoryService.connect(nats_server.url, TINY, compress, mem_config) as svc:
        async with anyio.create_task_group() as tg:
            await tg.start(svc.run_workers, 2)
            for seq in range(n // 2):
                for s in sessions:
                    await svc.submit(job(s, seq))
            snap_memory = reference(svc, "r0", 2)
            await save_snapshot(svc.bus, "r0", state, snap_memory, TINY)
            assert await svc.pending_jobs() > 0  # the restart hits queued and in-flight jobs
            await anyio.to_thread.run_sync(nats_server.restart, 0.3)
            for seq in range(n // 2, n):
                for s in sessions:
                    await svc.submit(job(s, seq))  # retried until the client has reconnected
            await wait_until(
                lambda: all_applied(svc, sessions, n), 60, "every segment after restart"
            )
            tg.cancel_scope.cancel()
        for s in sessions:
            got = await svc.latest(s)
            assert got is not None and got.same_as(reference(svc, s, n)), s
        snap = await load_snapshot(svc.bus, "r0", TINY)
        assert snap is not None and snap.memory is not None and snap.memory.same_as(snap_memory)
        assert all(torch.equal(snap.state[k], v) for k, v in state.items())


async def test_failing_job_is_skipped_after_max_redeliveries(
    nats_server: NatsServer, mem_config: MemoryConfig
) -> None:
    def picky(hidden, level):  # type: ignore[no-untyped-def]
        if hidden.shape[1] == TINY.segment_len and float(hidden[0, 0, 0]) == 123.0:
            raise RuntimeError("this segment always fails")
        return cheap_compress(hidden, level)

    async with await MemoryService.connect(nats_server.url, TINY, picky, mem_config) as svc:
        events: list[JobFailed] = []

        async def on_event(msg: nats.aio.msg.Msg) -> None:
            import msgspec

            events.append(msgspec.json.decode(msg.data, type=JobFailed))

        sub = await svc.bus.nc.subscribe("events.memory_job_failed", cb=on_event)
        await svc.bus.nc.publish(
            "memory.consolidate.junk", b"not a job"
        )  # core publish: not in the stream
        await svc.bus.js.publish("memory.consolidate.junk", b"not a job either")
        poison = job("p", 1)
        hidden = poison.tensor()
        hidden[0, 0] = 123.0
        await svc.submit(job("p", 0))
        await svc.submit(ConsolidateJob.from_tensor("p", 1, 1, poison.span, hidden))
        await svc.submit(job("p", 2))
        async with anyio.create_task_group() as tg:
            await tg.start(svc.run_workers, 2)
            await wait_until(lambda: all_applied(svc, ["p"], 3), 30, "the skip")
            tg.cancel_scope.cancel()
        await svc.bus.nc.flush()
        await sub.unsubscribe()
        got = await svc.latest("p")
        assert got is not None and got.last_seq == 2 and got.skipped == 1
        assert got.slot_count == 2 * TINY.mem_slots  # segments 0 and 2 only
        assert [(e.session, e.seq) for e in events] == [("p", 1)]
        assert svc.stats.failed == 1 and await svc.pending_jobs() == 0  # the junk was dropped too


async def test_submit_refuses_a_job_over_max_payload(
    nats_server: NatsServer, mem_config: MemoryConfig
) -> None:
    async with await MemoryService.connect(nats_server.url, TINY, None, mem_config) as svc:
        big = ConsolidateJob.from_tensor("big", 0, 0, (0, 8192), torch.zeros(8192, 96))
        assert len(encode_job(big)) > svc.bus.nc.max_payload
        with pytest.raises(JobTooLarge, match="max_payload"):
            await svc.submit(big)
        with pytest.raises(RuntimeError, match="no compressor"):
            await svc.run_workers(1)
        with pytest.raises(ValueError, match="session id"):
            await svc.submit_segment("bad.id", 0, 0, (0, 128), torch.zeros(128, 96))
        assert updated_subject("ok") == "memory.updated.ok"


async def test_install_and_version_collection(
    nats_server: NatsServer, mem_config: MemoryConfig
) -> None:
    async with await MemoryService.connect(
        nats_server.url, TINY, cheap_compress, mem_config
    ) as svc:
        restored = reference(svc, "res", 3)
        await svc.install("res", restored)
        await svc.submit(job("res", 3))
        await svc.submit(job("res", 4))
        async with anyio.create_task_group() as tg:
            await tg.start(svc.run_workers, 1)
            await wait_until(lambda: all_applied(svc, ["res"], 5), 30, "jobs after install")
            tg.cancel_scope.cancel()
        got = await svc.latest("res")
        assert got is not None and got.same_as(reference(svc, "res", 5))
        ptr, _ = await svc.pointer("res")
        assert ptr is not None and len(ptr.history) == mem_config.keep_versions - 1
        names = {o.name for o in await svc.bus.memory.list(ignore_deletes=True)}
        assert names == {ptr.object, *ptr.history}  # older versions were deleted
        again = await svc.install("res", got)  # an install collects the same way
        names = {o.name for o in await svc.bus.memory.list(ignore_deletes=True)}
        assert names == {again.object, ptr.object} and again.history == (ptr.object,)


WORKER_PROCESS = """
import sys
from memory.config import MemoryConfig
from memory.service import run_worker_process
from model import ModelConfig
import logging
logging.basicConfig(level=logging.INFO)
cfg = MemoryConfig(level_capacities=(16, 16, 16), merge_group=8, ack_wait_s=1.0,
                   fetch_timeout_s=0.2, order_nak_delay_s=0.02, reconnect_wait_s=0.05)
run_worker_process(sys.argv[1], ModelConfig.named("tiny"), config=cfg, workers=2,
                   data_dir=sys.argv[2])
"""


@contextlib.asynccontextmanager
async def worker_process(url: str, data_dir: Path) -> AsyncIterator[Path]:
    """`bwr worker` as its own process (tiny, seed-0 weights) -> its log; on exit, SIGTERM, and
    it must stop cleanly (exit 0)."""
    log = data_dir / "worker.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        cmd = [sys.executable, "-c", WORKER_PROCESS, url, str(data_dir)]
        async with await anyio.open_process(cmd, stdout=subprocess.DEVNULL, stderr=out) as proc:
            try:
                yield log
            finally:
                proc.send_signal(signal.SIGTERM)
                with anyio.fail_after(20):
                    code = await proc.wait()
    assert code == 0, log.read_text(errors="replace")


def assert_same_slots(got: SessionMemory | None, want: SessionMemory) -> None:
    assert got is not None and got.summary() == want.summary()  # same spans, seqs, counts
    for a, b in zip(got.levels, want.levels, strict=True):  # same weights, other thread count
        assert torch.allclose(a.buf.slots, b.buf.slots, atol=1e-5)


async def test_worker_process_applies_jobs_and_stops_on_sigterm(
    nats_server: NatsServer, mem_config: MemoryConfig, tiny_model: ByteLM, tmp_path: Path
) -> None:
    """`bwr worker` as its own process: the same tiny weights (seed 0); SIGTERM ends it."""
    n = 6
    async with await MemoryService.connect(
        nats_server.url, TINY, model_compressor(tiny_model), mem_config
    ) as svc:
        for seq in range(n):
            await svc.submit(job("proc", seq))
        async with worker_process(nats_server.url, tmp_path):
            await wait_until(lambda: all_applied(svc, ["proc"], n), 60, "worker process")
        assert_same_slots(await svc.latest("proc"), reference(svc, "proc", n))


async def test_worker_process_compresses_with_the_announced_weights(
    nats_server: NatsServer, mem_config: MemoryConfig, tmp_path: Path
) -> None:
    """A trainer announces new weights on model.updated: `bwr worker` fetches them and the
    segments it consolidates afterwards are compressed by the new weights, not the old."""
    from memory.reload import announce, checkpoint_name, model_files, new_notice, put_checkpoint

    torch.manual_seed(1)
    new = ByteLM(TINY).eval()  # other weights than the worker's seed-0 start
    n = 4
    async with await MemoryService.connect(
        nats_server.url, TINY, model_compressor(new), mem_config
    ) as svc:
        async with worker_process(nats_server.url, tmp_path) as log:
            name = checkpoint_name(7)
            files = model_files(new)
            await put_checkpoint(svc.bus, name, files)
            await announce(svc.bus, new_notice(name, new, 7, 1, sum(map(len, files.values()))))
            await wait_until(  # fetched and loaded (before any job of this test)
                lambda: anyio.to_thread.run_sync(
                    lambda: "reload 1" in log.read_text(errors="replace")
                ),
                60,
                "the worker to load the new weights",
            )
            for seq in range(n):
                await svc.submit(job("fresh", seq))
            await wait_until(lambda: all_applied(svc, ["fresh"], n), 60, "jobs")
        # the service here compresses with the new weights too: the same slots
        assert_same_slots(await svc.latest("fresh"), reference(svc, "fresh", n))
