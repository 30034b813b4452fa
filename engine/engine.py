"""engine.py: the asyncio engine. Sessions in, bytes out, one batched model step at a time.

The loop is schedule -> launch -> collect -> emit. The scheduler (no torch) plans who advances;
the runner launches the plan on the device and a worker thread waits for its sampled bytes (so
the event loop keeps serving sockets while the device computes); the outcomes go to each
session's collector. Sessions are touched only on the event loop; the runner only sees slots.

Pipelined (the default on a GPU): step k+1 is planned and launched before step k is collected,
so the host's planning, row building and emitting run while the device computes, and the device
always has the next step queued. Sessions generating feed their byte in flight speculatively
(the scheduler's docstring says how each case settles). What needs the host and the device to
agree (a snapshot) waits until nothing is in flight.

The engine knows neither NATS nor HTTP: memory plugs in through `MemoryHooks` (closed segments
out, new memory versions in, applied only between steps), and callers use `Session`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from engine.collector import Collector
from engine.config import EngineConfig
from engine.metrics import EngineMetrics
from engine.runner import ClosedSegment, Launched, Runner
from engine.scheduler import Emitted, Finished, Outcome, Scheduler, StepPlan
from engine.types import (
    Busy,
    Done,
    Event,
    IncompatibleWeights,
    InputTooLarge,
    MemoryNotice,
    SamplingParams,
    SessionClosed,
    ShuttingDown,
    UnknownSession,
)
from model import ByteLM, MemorySlots

log = logging.getLogger("bwr.engine")


@dataclass(frozen=True)
class MemoryUpdate:
    session: str
    version: int
    memory: MemorySlots  # batch 1, up to the engine's memory_capacity slots
    written: Tensor  # (M,) long: the segment index each slot was written at
    levels: list[dict[str, int]] = field(default_factory=list)


class MemoryHooks(Protocol):
    """What the engine asks of a memory system. Called on the event loop, between steps."""

    def segment_closed(self, session: str, index: int, start: int, hidden: Tensor) -> None:
        """Segment `index` of a session (bytes start..start+S) closed; hidden (S, D), on device."""

    def take_updates(self) -> list[MemoryUpdate]:
        """New memory versions ready to install (the engine installs them before the next step)."""
        ...

    def forget(self, session: str) -> None:
        """The session closed: drop what is kept for it (its jobs in flight may still finish)."""


@dataclass(frozen=True)
class SessionSnapshot:
    """Everything a session needs to continue bit-exactly elsewhere (memory is saved apart)."""

    session: str
    state: dict[str, Tensor]  # recurrent state rows, on the host
    logits: Tensor  # (V,) logits of the last byte read
    seed: int  # sampling seed and counter: same seed, same bytes
    counter: int
    context_bytes: int  # bytes read so far
    pending: bytes  # bytes queued but not read yet (e.g. the last sampled byte)
    memory_version: int = -1  # memory version the session read (-1: none)


@dataclass
class _TurnClock:
    submitted: float
    scheduled: bool = False
    last_out: float | None = None


class Session:
    """A caller's handle on one session: submit input, read events, cancel, close."""

    def __init__(self, engine: Engine, sid: str, collector: Collector) -> None:
        self._engine = engine
        self.id = sid
        self.collector = collector
        self.closed = False

    def submit(self, data: bytes | str, params: SamplingParams | None = None) -> None:
        """Queue input (also while generating: the turn ends, the input is read next)."""
        self._engine._submit(self, data.encode() if isinstance(data, str) else bytes(data), params)

    def cancel(self) -> None:
        self._engine._cancel(self)

    async def close(self) -> None:
        self._engine._close(self)

    def events(self) -> AsyncIterator[Event]:
        return self.collector.events()

    async def next_batch(self, timeout: float | None = None) -> list[Event]:
        return await self.collector.next_batch(timeout)

    @property
    def context_bytes(self) -> int:
        seq = self._engine.scheduler.seqs.get(self.id)
        return 0 if seq is None else seq.fed + len(seq.pending)

    @property
    def generating(self) -> bool:
        seq = self._engine.scheduler.seqs.get(self.id)
        return seq is not None and seq.turn is not None


class Engine:
    def __init__(
        self, model: ByteLM, config: EngineConfig | None = None, hooks: MemoryHooks | None = None
    ) -> None:
        self.config = config or EngineConfig()
        self.hooks = hooks
        self.runner = Runner(model, self.config, capture_segments=hooks is not None)
        cuda = self.runner.device.type == "cuda"
        self.pipelined = cuda if self.config.pipeline is None else self.config.pipeline
        # Speculative feeds never close a segment (closed segments are captured at launch).
        memory = hooks is not None or self.config.memory_capacity > 0
        self.scheduler = Scheduler(
            self.config.max_slots,
            self.config.prefill_budget,
            self.config.prefill_chunk,
            boundary=model.config.segment_len if memory else 0,
        )
        self.metrics = EngineMetrics()
        self.sessions: dict[str, Session] = {}
        self._clocks: dict[str, _TurnClock] = {}
        self._unscheduled: set[str] = set()  # sessions whose turn no step has read yet
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="bwr-step")
        self._pending_weights: dict[str, Tensor] | None = None
        self._closing = False
        self._stopped = asyncio.Event()
        self.memory_versions: dict[str, int] = {}
        self._sampling_updates: list[tuple[int, SamplingParams, int, bool]] = []
        self._restores: list[tuple[int, SessionSnapshot]] = []
        self._snapshot_waiters: list[tuple[str, asyncio.Future[SessionSnapshot]]] = []
        self._last_collect = 0.0

    @property
    def model(self) -> ByteLM:
        return self.runner.model

    # ----- lifecycle -----

    async def start(self) -> None:
        if self.runner.graphs is not None:
            await asyncio.get_running_loop().run_in_executor(
                self._executor, self.runner.graphs.capture_all
            )
        self._task = asyncio.create_task(self._loop(), name="bwr-engine")

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    async def shutdown(self, drain_s: float = 5.0) -> None:
        """Stop intake, let running turns finish (up to drain_s), close every session, stop."""
        self._closing = True
        deadline = time.monotonic() + drain_s
        while (
            self.scheduler.running
            and time.monotonic() < deadline
            and self._task
            and not self._task.done()
        ):
            await asyncio.sleep(0.01)
        for session in list(self.sessions.values()):
            self._close(session)
        if self._task is not None:
            self._wake.set()
            await self._task
        self._executor.shutdown(wait=True)

    # ----- caller API (event loop only) -----

    def open(
        self,
        sid: str | None = None,
        *,
        binary: bool = False,
        restore: SessionSnapshot | None = None,
    ) -> Session:
        """Open a session (id: unguessable unless given), fresh or from a snapshot; raises Busy
        when no slot is free."""
        if self._closing:
            raise ShuttingDown("the engine is shutting down")
        sid = sid or (restore.session if restore else secrets.token_urlsafe(18))
        if sid in self.sessions:
            raise Busy(f"session {sid} is already open")
        try:
            if restore is None:
                self.scheduler.admit(sid)
            else:
                slot = self.scheduler.adopt(
                    sid,
                    restore.context_bytes,
                    restore.pending,
                    has_logits=restore.context_bytes > 0,
                )
                self._restores.append((slot, restore))  # loaded before the next step
                if restore.memory_version >= 0:
                    self.memory_versions[sid] = restore.memory_version
        except LookupError:
            raise Busy(f"all {self.config.max_slots} session slots are in use") from None
        collector = Collector(
            binary=binary,
            lag_limit=self.config.lag_limit,
            on_lag=lambda lag: self._on_lag(sid, lag),
            stream_interval=self.config.stream_interval,
        )
        session = Session(self, sid, collector)
        self.sessions[sid] = session
        self.metrics.sessions = len(self.sessions)
        self._wake.set()
        return session

    def get(self, sid: str) -> Session:
        try:
            return self.sessions[sid]
        except KeyError:
            raise UnknownSession(f"no open session {sid!r}") from None

    def _live(self, session: Session) -> None:
        if session.closed or session.id not in self.scheduler.seqs:
            raise SessionClosed(f"session {session.id} is closed")
        if self._closing:
            raise ShuttingDown("the engine is shutting down")

    def _submit(self, session: Session, data: bytes, params: SamplingParams | None) -> None:
        self._live(session)
        if len(data) > self.config.max_input_bytes:
            raise InputTooLarge(
                f"{len(data)} bytes in one input; the limit is {self.config.max_input_bytes}"
            )
        seq = self.scheduler.seqs[session.id]
        if seq.queued + len(data) > self.config.max_pending_bytes:
            raise Busy(
                f"session {session.id} has {seq.queued} unread bytes;"
                f" the inbox holds {self.config.max_pending_bytes}"
            )
        if not data and (params is None or params.max_bytes == 0):
            return
        self._emit(self.scheduler.submit(session.id, data, params))
        if params is not None and params.max_bytes > 0:
            seed = params.seed if params.seed is not None else secrets.randbits(32)
            # Device tensors change only between steps (a step may be running in the worker).
            self._sampling_updates.append((seq.slot, params, seed, params.seed is not None))
            self._clocks[session.id] = _TurnClock(time.perf_counter())
            self._unscheduled.add(session.id)
        self._wake.set()

    def _cancel(self, session: Session) -> None:
        self._live(session)
        self._emit(self.scheduler.cancel(session.id))
        self._wake.set()

    def _close(self, session: Session) -> None:
        if session.closed:
            return
        session.closed = True
        if session.id in self.scheduler.seqs:
            self._emit(self.scheduler.release(session.id))
        session.collector.close()
        self.sessions.pop(session.id, None)
        self._clocks.pop(session.id, None)
        self._unscheduled.discard(session.id)
        self.memory_versions.pop(session.id, None)
        if self.hooks is not None:
            self.hooks.forget(session.id)
        self.metrics.sessions = len(self.sessions)
        self._wake.set()

    async def snapshot(self, sid: str) -> SessionSnapshot:
        """The session's state, taken between steps (never while a step may write it)."""
        self.get(sid)
        fut: asyncio.Future[SessionSnapshot] = asyncio.get_running_loop().create_future()
        self._snapshot_waiters.append((sid, fut))
        self._wake.set()
        if self._task is None or self._task.done():
            self._serve_snapshots()
        return await fut

    async def last_read(self, sid: str) -> dict[str, object] | None:
        """Which memory slots the session's last decoded byte read (see Runner.last_read); None
        when memory is off. Read on the step thread, so never in the middle of a step."""
        self.get(sid)
        seq = self.scheduler.seqs.get(sid)
        if seq is None:
            return None
        if not self.config.threaded_steps:
            return self.runner.last_read(seq.slot)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.runner.last_read, seq.slot)

    def _serve_snapshots(self) -> None:
        for sid, fut in self._snapshot_waiters:
            seq = self.scheduler.seqs.get(sid)
            if fut.done():
                continue
            if seq is None:
                fut.set_exception(UnknownSession(f"no open session {sid!r}"))
                continue
            r = self.runner
            fut.set_result(
                SessionSnapshot(
                    session=sid,
                    state={k: v.cpu() for k, v in r.state_rows(seq.slot).items()},
                    logits=r.logits[seq.slot].cpu(),
                    seed=int(r.seed[seq.slot]),
                    counter=int(r.counter[seq.slot]),
                    context_bytes=seq.fed,
                    pending=bytes(seq.pending),
                    memory_version=self.memory_versions.get(sid, -1),
                )
            )
        self._snapshot_waiters.clear()

    def _on_lag(self, sid: str, lagging: bool) -> None:
        if sid in self.scheduler.seqs:
            self.scheduler.pause(sid, lagging)
            if not lagging:
                self._wake.set()

    # ----- weights -----

    async def load_weights(self, path: str) -> int:
        """Read a checkpoint beside the live weights; they switch before the next step.
        Raises IncompatibleWeights when its config differs in shape. -> the new weights version."""
        from model.checkpoint import load_weights, read_config

        def read() -> dict[str, Tensor]:
            config, _ = read_config(path)
            if not config.compatible(self.model.config):
                raise IncompatibleWeights(f"{path}: config differs from the running model's")
            return load_weights(path, config, self.runner.device)

        tensors = await asyncio.get_running_loop().run_in_executor(None, read)
        self._pending_weights = tensors
        self._wake.set()
        while self._pending_weights is tensors and self._task is not None and not self._task.done():
            await asyncio.sleep(0.005)
        if self._pending_weights is tensors:  # engine not running: swap now
            self.runner.swap_weights(tensors)
            self._pending_weights = None
            self.metrics.weights_version += 1
        return self.metrics.weights_version

    # ----- the loop -----

    async def _loop(self) -> None:
        flight: tuple[StepPlan, Launched, float] | None = None  # launched, not yet collected
        while not (self._closing and not self.sessions and flight is None):
            if flight is not None and self._snapshot_waiters:
                await self._collect(flight)  # a snapshot needs every byte settled
                flight = None
            self._between_steps()
            plan = self.scheduler.schedule()
            if not plan:
                if flight is not None:
                    await self._collect(flight)
                    flight = None
                    continue
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.config.idle_wait_s)
                continue
            t0 = time.perf_counter()
            try:
                launched = await self._launch(plan)
            except Exception:
                log.exception("step failed; closing the sessions in it")
                self._close_plan(plan)
                if flight is not None:
                    await self._collect(flight)
                    flight = None
                continue
            if flight is not None:
                await self._collect(flight)
            flight = (plan, launched, t0)
            if not self.pipelined:
                await self._collect(flight)
                flight = None
            await asyncio.sleep(0)  # let consumers and sockets run between steps

    async def _launch(self, plan: StepPlan) -> Launched:
        """Queue the step: a decode-only step on a GPU here (launching it is a copy and a graph
        replay); a prefill (the parallel form, many kernels to launch) or any step elsewhere in
        the worker thread, so the event loop keeps serving meanwhile."""
        cuda = self.runner.device.type == "cuda"
        if (cuda and not plan.prefill) or not self.config.threaded_steps:
            return self.runner.launch(plan)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.runner.launch, plan)

    async def _collect(self, flight: tuple[StepPlan, Launched, float]) -> None:
        """Wait for a launched step (in the worker thread on a GPU) and hand out its bytes."""
        plan, launched, t0 = flight
        try:
            if self.runner.device.type == "cuda" and self.config.threaded_steps:
                loop = asyncio.get_running_loop()
                sampled, closed = await loop.run_in_executor(
                    self._executor, self.runner.collect, launched
                )
            else:
                sampled, closed = self.runner.collect(launched)
        except Exception:
            log.exception("step failed; closing the sessions in it")
            self._close_plan(plan)
            return
        now = time.perf_counter()
        # A step's time runs from its launch, or from the step before it ending if it was
        # queued behind that one: what the device took for it, as the host sees it.
        self._account(plan, max(t0, self._last_collect), now)
        self._last_collect = now
        self._emit(self.scheduler.complete(plan, sampled), now)
        self._segments(plan, closed)

    def _close_plan(self, plan: StepPlan) -> None:
        for f in (*plan.decode, *plan.prefill, *plan.sample_only):
            if f.sid in self.sessions:
                self._close(self.sessions[f.sid])

    def _between_steps(self) -> None:
        # Zero newly owned slots here rather than in the next plan: what is loaded into a slot
        # between steps (a memory version) must land after the zeroing, and a snapshot must not
        # read what the slot's last owner left there.
        if self.scheduler.unsampled:  # before any counter reset a new turn's seed asks for
            self.runner.uncount(self.scheduler.unsampled)
            self.scheduler.unsampled.clear()
        for slot in self.scheduler.take_resets():
            self.runner.reset_slot(slot)
        for slot, snap in self._restores:
            self.runner.restore_slot(slot, snap.state, snap.logits, snap.seed, snap.counter)
        self._restores.clear()
        if self._snapshot_waiters:
            self._serve_snapshots()
        for slot, params, seed, reset_counter in self._sampling_updates:
            self.runner.set_sampling(slot, params, seed, reset_counter)
        self._sampling_updates.clear()
        if self._pending_weights is not None:
            self.runner.swap_weights(self._pending_weights)
            self._pending_weights = None
            self.metrics.weights_version += 1
        if self.hooks is None:
            return
        for upd in self.hooks.take_updates():
            seq = self.scheduler.seqs.get(upd.session)
            if seq is None or self.runner.memory is None:
                continue
            self.runner.install_memory(seq.slot, upd.memory, upd.written)
            self.memory_versions[upd.session] = upd.version
            self.metrics.memory_installs += 1
            self.sessions[upd.session].collector.push_event(MemoryNotice(upd.version, upd.levels))

    def _account(self, plan: StepPlan, t0: float, now: float) -> None:
        m = self.metrics
        m.steps += 1
        m.step.observe(now - t0)
        m.batch.observe(len(plan.decode) + len(plan.prefill) + len(plan.sample_only))
        m.bytes_in += sum(len(f.data) for f in plan.prefill) + sum(
            1 for f in plan.decode if not f.sample
        )
        if self._unscheduled:  # queue time: only turns no step has read yet (few, not all)
            fed = {f.sid for f in (*plan.decode, *plan.prefill, *plan.sample_only)}
            for sid in self._unscheduled & fed:
                self._unscheduled.discard(sid)
                clock = self._clocks.get(sid)
                if clock is not None and not clock.scheduled:
                    clock.scheduled = True
                    m.queue.observe(t0 - clock.submitted)
        m.running, m.waiting = self.scheduler.counts

    def _emit(self, outcomes: list[Outcome], now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        sessions, clocks, m = self.sessions, self._clocks, self.metrics
        out = 0
        gaps: dict[float, int] = {}  # inter-byte gap -> bytes: most sessions share the step's
        for o in outcomes:  # one per generating session per step: kept lean
            session = sessions.get(o.sid)
            if session is None:
                continue
            if type(o) is Emitted:
                data = o.data
                session.collector.push(data)
                out += len(data)
                clock = clocks.get(o.sid)
                if clock is not None:
                    if clock.last_out is None:
                        m.ttft.observe(now - clock.submitted)
                    else:
                        gap = (now - clock.last_out) / len(data)
                        gaps[gap] = gaps.get(gap, 0) + len(data)
                    clock.last_out = now
            else:
                assert isinstance(o, Finished)
                session.collector.push_event(Done(o.reason, o.usage))
                m.turns += 1
                label = o.reason.label
                m.finished[label] = m.finished.get(label, 0) + 1
                clocks.pop(o.sid, None)
        m.bytes_out += out
        for gap, count in gaps.items():
            m.itl.observe_n(gap, count)

    def _segments(self, plan: StepPlan, closed: list[ClosedSegment]) -> None:
        if not closed or self.hooks is None:
            return
        by_slot = {f.slot: f.sid for f in (*plan.decode, *plan.prefill)}
        for seg in closed:
            sid = by_slot.get(seg.slot)
            if sid is not None and sid in self.sessions:
                self.metrics.segments_closed += 1
                self.hooks.segment_closed(sid, seg.index, seg.start, seg.hidden)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
