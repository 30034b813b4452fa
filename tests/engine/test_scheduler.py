"""Scheduler invariants under random traffic, checked against a plain model of what each session
is owed.

A hypothesis state machine admits, releases and reuses sessions, submits random bytes with random
sampling parameters (max_bytes, stop sequences), cancels, pauses and resumes, and runs steps
through a fake runner that returns bytes from a small alphabet (so stop sequences happen) and
now and then EOS. A step may be left in flight while commands arrive, as in the engine, where
the runner works in a thread while the event loop takes input. Pipelined runs plan step k+1
before step k completes, as the engine does on a GPU: sessions whose sample is in flight feed it
speculatively, and the model checks how complete() settles those feeds (the byte fed once, EOS
taken back, a stop sequence's void sample reported in `unsampled`).

The model keeps, per session, the bytes it is owed to the runner (admitted input and accepted
samples, in order), the bytes the plans fed, and the turn in progress. Checked on every plan and
outcome: no slot owned twice, no session twice in a plan, a feed's slot is its session's own, a
paused session never planned, the prefill budget holds, fed bytes are exactly the owed bytes in
order, every accepted sample is emitted exactly once and in order (less a stop sequence that
ended the turn), and every turn ends with exactly one Finished whose reason and usage fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import count

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from engine.scheduler import EOS_ID, Emitted, Finished, Outcome, Scheduler, StepPlan
from engine.types import FinishReason, SamplingParams

ALPHABET = b"ab\n"  # what the fake runner mostly samples; stop sequences are drawn from it too

stop_seq = st.lists(st.sampled_from(b"ab"), min_size=1, max_size=3).map(bytes)
params_strategy = st.builds(
    SamplingParams,
    max_bytes=st.integers(0, 8),
    stop=st.lists(stop_seq, max_size=3).map(tuple),
)
COMMANDS = ["submit", "submit", "cancel", "release", "pause", "admit"]
sampled_ids = st.one_of(
    st.sampled_from(list(ALPHABET)),
    st.sampled_from(list(ALPHABET)),
    st.sampled_from(list(ALPHABET)),
    st.integers(0, 255),
    st.just(EOS_ID),
)


@dataclass
class ModelTurn:
    tid: int
    params: SamplingParams
    input_bytes: int
    generated: bytearray = field(default_factory=bytearray)  # accepted samples (< 256)
    emitted: bytearray = field(default_factory=bytearray)  # Emitted data so far


@dataclass
class ModelSession:
    sid: str
    slot: int
    owed: bytearray = field(
        default_factory=bytearray
    )  # to feed, in order: input and accepted samples
    fed: bytearray = field(default_factory=bytearray)  # what the plans fed, in order
    turn: ModelTurn | None = None
    paused: bool = False
    spec: int | None = None  # offset of a speculative feed of the sample in flight
    deferred: list[tuple[bytes, SamplingParams | None] | None] = field(default_factory=list)


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(
        max_slots=st.integers(1, 4),
        budget=st.integers(1, 12),
        chunk=st.integers(1, 8),
        n=st.integers(1, 4),
        pipelined=st.booleans(),
        boundary=st.sampled_from([0, 0, 2, 3]),
        data=st.data(),
    )
    def setup(
        self,
        max_slots: int,
        budget: int,
        chunk: int,
        n: int,
        pipelined: bool,
        boundary: int,
        data: st.DataObject,
    ) -> None:
        self.sched = Scheduler(max_slots, budget, chunk, boundary)
        self.max_slots, self.budget = max_slots, budget
        self.pipelined, self.boundary = pipelined, boundary
        self.live: dict[str, ModelSession] = {}
        self.released: list[str] = []
        self.unreset: set[int] = set()  # slots admitted since the last plan
        # Plans in flight, oldest first (two at most when pipelined), with their samplers.
        self.inflight: list[tuple[StepPlan, list[tuple[ModelSession, int | None]]]] = []
        self.ids = count()
        self.tids = count()
        for _ in range(min(n, max_slots)):
            self.do_admit(data)
            self.do_submit(data)

    # ----- helpers -----

    def pick(self, data: st.DataObject) -> ModelSession:
        return self.live[data.draw(st.sampled_from(sorted(self.live)), label="session")]

    def end_turn(self, s: ModelSession, reason: FinishReason, outcomes: list[Outcome]) -> None:
        """Take one session's outcomes up to its first Finished out of `outcomes`: Emitted data
        first, then exactly one Finished(reason)."""
        turn = s.turn
        assert turn is not None
        mine = [o for o in outcomes if o.sid == s.sid]
        end = next((i for i, o in enumerate(mine) if isinstance(o, Finished)), None)
        assert end is not None, f"{s.sid}: no Finished in {mine}"
        mine = mine[: end + 1]
        for o in mine:
            outcomes.remove(o)
        for o in mine[:-1]:
            self.emit(turn, o.data)
        done = mine[-1]
        assert isinstance(done, Finished)
        event(f"finished {done.reason.label}")
        assert done.reason is reason, f"{s.sid}: finished {done.reason!r}, expected {reason!r}"
        gen, out = bytes(turn.generated), bytes(turn.emitted)
        if reason is FinishReason.STOP:
            assert any(gen.endswith(x) and out + x == gen for x in turn.params.stop), (
                gen,
                out,
                turn.params.stop,
            )
        else:
            assert out == gen, f"{s.sid}: emitted {out!r} of generated {gen!r}"
        assert done.usage.output_bytes == len(gen)
        assert done.usage.input_bytes == turn.input_bytes
        assert done.usage.context_bytes == len(s.fed) + len(s.owed)
        s.turn = None

    def emit(self, turn: ModelTurn, data: bytes) -> None:
        assert data, "empty Emitted"
        turn.emitted += data
        assert turn.generated.startswith(turn.emitted), "emitted bytes that were not generated"

    def only_emitted(self, s: ModelSession, outcomes: list[Outcome]) -> None:
        for o in [o for o in outcomes if o.sid == s.sid]:
            assert isinstance(o, Emitted), f"{s.sid}: unexpected {o}"
            assert s.turn is not None
            self.emit(s.turn, o.data)
            outcomes.remove(o)

    # ----- commands (also drawn while a step is in flight) -----

    def do_admit(self, data: st.DataObject) -> None:
        reuse = self.released and data.draw(st.booleans(), label="reuse id")
        sid = (
            data.draw(st.sampled_from(self.released), label="old id")
            if reuse
            else f"s{next(self.ids)}"
        )
        if sid in self.live:
            with pytest.raises(KeyError):
                self.sched.admit(sid)
            return
        if len(self.live) == self.max_slots:
            with pytest.raises(LookupError):
                self.sched.admit(sid)
            return
        slot = self.sched.admit(sid)
        assert 0 <= slot < self.max_slots
        assert slot not in {s.slot for s in self.live.values()}, f"slot {slot} given twice"
        self.live[sid] = ModelSession(sid, slot)
        self.unreset.add(slot)

    def do_release(self, data: st.DataObject) -> None:
        s = self.pick(data)
        out = self.sched.release(s.sid)
        if s.turn is not None:
            self.end_turn(s, FinishReason.CLOSED, out)
        else:
            assert not out
        del self.live[s.sid]
        s.deferred.clear()
        self.released.append(s.sid)
        self.unreset.discard(s.slot)
        assert s.slot in self.sched.free

    def do_submit(self, data: st.DataObject) -> None:
        s = self.pick(data)
        payload = data.draw(st.binary(max_size=12), label="payload")
        params = data.draw(st.none() | params_strategy | params_strategy, label="params")
        out = self.sched.submit(s.sid, payload, params)
        if s.spec is not None:  # waits for the speculative byte in flight
            assert not out
            s.deferred.append((payload, params))
            return
        self.apply_submit(s, payload, params, out)

    def apply_submit(
        self,
        s: ModelSession,
        payload: bytes,
        params: SamplingParams | None,
        out: list[Outcome],
        deferred: bool = False,
    ) -> None:
        if s.turn is not None:
            self.end_turn(s, FinishReason.INTERRUPTED, out)
        else:
            # no outcome of its own (a deferred command's list may hold later commands' ones,
            # which they take; complete() checks nothing is left)
            assert deferred or not [o for o in out if o.sid == s.sid]
        s.owed += payload
        if params is not None and params.max_bytes > 0:
            s.turn = ModelTurn(next(self.tids), params, len(payload))

    def do_cancel(self, data: st.DataObject) -> None:
        s = self.pick(data)
        out = self.sched.cancel(s.sid)
        if s.spec is not None:
            assert not out
            s.deferred.append(None)
            return
        self.apply_cancel(s, out)

    def apply_cancel(self, s: ModelSession, out: list[Outcome], deferred: bool = False) -> None:
        if s.turn is not None:
            self.end_turn(s, FinishReason.CANCELLED, out)
        else:
            # no outcome of its own (a deferred command's list may hold later commands' ones,
            # which they take; complete() checks nothing is left)
            assert deferred or not [o for o in out if o.sid == s.sid]

    def do_pause(self, data: st.DataObject) -> None:
        s = self.pick(data)
        s.paused = data.draw(st.booleans(), label="paused")
        self.sched.pause(s.sid, s.paused)

    def command(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(COMMANDS if self.live else ["admit"]), label="command")
        getattr(self, f"do_{name}")(data)

    @rule(data=st.data())
    def admit(self, data: st.DataObject) -> None:
        self.do_admit(data)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        self.do_release(data)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def submit(self, data: st.DataObject) -> None:
        self.do_submit(data)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        self.do_cancel(data)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def pause(self, data: st.DataObject) -> None:
        self.do_pause(data)

    # ----- steps -----

    @rule(data=st.data(), n=st.integers(1, 8))
    def step(self, data: st.DataObject, n: int) -> None:
        """n steps; between a plan and its completion, commands may arrive (the step is running).
        Pipelined, each plan is made while the one before it is still in flight."""
        for _ in range(n):
            before = (self.sched.running, self.sched.waiting)
            self.check_plan(self.sched.schedule())
            assert self.sched.counts == before  # what the metrics gauges show, found on the way
            for _ in range(data.draw(st.sampled_from([0, 0, 0, 1, 2]), label="commands in flight")):
                self.command(data)
            if len(self.inflight) > self.pipelined:
                self.complete(data)

    @precondition(lambda self: self.inflight)
    @rule(data=st.data())
    def complete_oldest(self, data: st.DataObject) -> None:
        """The engine completes a plan without making another (nothing left to plan)."""
        self.complete(data)

    def check_plan(self, plan: StepPlan) -> None:
        assert set(plan.reset) == self.unreset, f"reset {plan.reset}, admitted {self.unreset}"
        assert len(plan.reset) == len(set(plan.reset))
        self.unreset = set()
        feeds = (*plan.decode, *plan.prefill, *plan.sample_only)
        sids = [f.sid for f in feeds]
        assert len(sids) == len(set(sids)), f"a session twice in one plan: {sids}"
        assert sum(len(f.data) for f in plan.prefill) <= self.budget
        assert all(len(f.data) == 1 for f in plan.decode)
        assert all(f.data for f in plan.prefill)
        assert all(not f.data and f.sample for f in plan.sample_only)
        samplers: list[tuple[ModelSession, int | None]] = []
        flying = self.flying()
        spec = {plan.decode[i].sid for i in plan.spec}
        assert len(spec) == len(plan.spec)
        for f in feeds:
            s = self.live.get(f.sid)
            assert s is not None, f"released session {f.sid} planned"
            assert f.slot == s.slot, f"{f.sid} fed on slot {f.slot}, owns {s.slot}"
            assert not s.paused, f"paused session {f.sid} planned"
            assert f.start == len(s.fed)
            turn = s.turn
            if f.sid in spec:
                # The sample in flight, fed before it is known: only while its turn goes on,
                # nothing else owed, never closing a segment.
                assert turn is not None and flying.get(f.sid) == turn.tid, f"{f.sid}: spec"
                assert not s.owed and s.spec is None
                assert not self.boundary or (f.start + 1) % self.boundary
                s.spec = f.start
                s.fed.append(0)  # a placeholder until the step in flight says which byte
                assert f.sample == (len(turn.generated) + 1 < turn.params.max_bytes)
                continue
            assert f.sid not in flying or turn is None or flying[f.sid] != turn.tid, (
                f"{f.sid}: planned while its sample is in flight"
            )
            if f.data == b"\n" and not s.owed and not s.fed:
                # A turn asked for before any input starts from a newline (the scheduler's rule).
                assert turn is not None and not turn.generated
            elif not f.data:
                assert s.fed and not s.owed and turn is not None and not turn.generated
            else:
                assert s.owed.startswith(f.data), f"{f.sid} fed {f.data!r}, owed {bytes(s.owed)!r}"
                del s.owed[: len(f.data)]
            s.fed += f.data
            assert f.sample == (turn is not None and not s.owed), f"{f.sid}: sample flag {f.sample}"
        for f in plan.samples:
            s = self.live[f.sid]
            samplers.append((s, s.turn.tid if s.turn else None))
        # Work conservation: nobody who can advance is left out of the batched step (a session
        # whose sample is in flight may wait for it).
        planned = set(sids)
        for s in self.live.values():
            if s.paused or s.sid in flying:
                continue
            if len(s.owed) == 1 or (
                s.turn is not None and not s.turn.generated and not s.owed and s.sid not in planned
            ):
                assert s.sid in planned, f"{s.sid} could advance but was not planned"
        if any(len(s.owed) > 1 and not s.paused for s in self.live.values()) or plan.prefill:
            assert plan.prefill, "input waiting but nothing prefilled"
        self.inflight.append((plan, samplers))

    def flying(self) -> dict[str, int | None]:
        """Sessions with a sample in flight -> the turn it is for (the oldest plan's)."""
        out: dict[str, int | None] = {}
        for _, samplers in self.inflight:
            for s, tid in samplers:
                if self.live.get(s.sid) is s:
                    out.setdefault(s.sid, tid)
        return out

    def complete(self, data: st.DataObject | None) -> None:
        """Finish the oldest step in flight with ids from `data` (None: all "z", which ends no
        turn)."""
        plan, samplers = self.inflight.pop(0)
        ids = [data.draw(sampled_ids, label="sampled") if data else ord("z") for _ in plan.samples]
        out = self.sched.complete(plan, ids)
        ended: dict[str, FinishReason] = {}
        unsampled = []
        for (s, tid), value in zip(samplers, ids, strict=True):
            turn = s.turn
            spec, s.spec = s.spec, None
            if self.live.get(s.sid) is not s:
                continue  # closed while the step ran
            if spec is not None:
                event("speculative feed")
                if value >= 256:
                    event("speculative feed of EOS")
                    assert len(s.fed) == spec + 1
                    del s.fed[spec]  # EOS is never fed
                else:
                    s.fed[spec] = value
            if turn is None or turn.tid != tid:
                event("sample void")
                continue  # cancelled or interrupted while the step ran: the sample is void
            if value >= 256:
                ended[s.sid] = FinishReason.EOS
                continue
            turn.generated.append(value)
            if spec is None:
                s.owed.append(value)
            if any(turn.generated.endswith(x) for x in turn.params.stop):
                ended[s.sid] = FinishReason.STOP
                if spec is not None and len(turn.generated) < turn.params.max_bytes:
                    event("speculative sample void by a stop sequence")
                    unsampled.append(s.slot)  # the speculative row sampled for this turn
            elif len(turn.generated) >= turn.params.max_bytes:
                ended[s.sid] = FinishReason.LENGTH
        assert sorted(self.sched.unsampled) == sorted(unsampled)
        self.sched.unsampled.clear()
        touched = {o.sid for o in out}
        assert touched <= {s.sid for s, _ in samplers}, (
            f"outcomes for sessions not in the plan: {out}"
        )
        waited = {s.sid for s, _ in samplers if self.live.get(s.sid) is s and s.deferred}
        for sid in touched | set(ended) | waited:
            s = self.live[sid]
            if sid in ended:
                self.end_turn(s, ended[sid], out)
            if s.deferred:  # commands that waited for this byte apply now, in order
                event("command waited for a speculative byte")
                commands, s.deferred = s.deferred, []
                for c in commands:
                    if c is None:
                        self.apply_cancel(s, out, deferred=True)
                    else:
                        self.apply_submit(s, *c, out, deferred=True)
            self.only_emitted(s, out)
        assert not out, f"outcomes left unexplained: {out}"
        for s in self.live.values():
            if s.turn is not None:
                # Only a possible stop sequence is held back; everything else is out.
                held = bytes(s.turn.generated[len(s.turn.emitted) :])
                assert not held or any(
                    x.startswith(held) and x != held for x in s.turn.params.stop
                ), held

    # ----- invariants -----

    @invariant()
    def slots_partition(self) -> None:
        if not hasattr(self, "sched"):
            return
        owned = [s.slot for s in self.live.values()]
        free = list(self.sched.free)
        assert len(owned) == len(set(owned))
        assert sorted(owned + free) == list(range(self.max_slots)), (owned, free)
        assert {sid: s.slot for sid, s in self.sched.seqs.items()} == {
            sid: s.slot for sid, s in self.live.items()
        }

    @invariant()
    def counts(self) -> None:
        if not hasattr(self, "sched"):
            return
        assert self.sched.running == sum(1 for s in self.live.values() if s.turn and not s.paused)
        assert self.sched.waiting == sum(1 for s in self.live.values() if s.owed and s.turn is None)

    def teardown(self) -> None:
        """Drain: resume all, step until nothing is left; every byte is fed, every turn ends."""
        if not hasattr(self, "sched"):
            return
        while self.inflight:
            self.complete(None)
        for s in self.live.values():
            self.sched.pause(s.sid, False)
            s.paused = False
        for _ in range(1000):
            plan = self.sched.schedule()
            if not plan:
                break
            self.check_plan(plan)
            self.complete(None)
        for s in self.live.values():
            assert not s.owed, f"{s.sid}: {bytes(s.owed)!r} never fed"
            assert s.turn is None, f"{s.sid}: turn never ended"


SchedulerMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestScheduler = SchedulerMachine.TestCase


# ----- cases the machine found, kept as plain tests -----


def test_stop_sequence_overlapping_a_longer_held_prefix_emits_the_rest() -> None:
    """With stops "abc" and "bd", "ab" is held (it may become "abc"); a "d" ends the turn on "bd",
    and the "a" before the stop is output, not lost."""
    sched = Scheduler(1, 16, 16)
    sched.admit("s")
    sched.submit("s", b"x", SamplingParams(max_bytes=10, stop=(b"abc", b"bd")))
    out: list[Outcome] = []
    for byte in b"abd":
        plan = sched.schedule()
        out += sched.complete(plan, [byte])
    emitted = b"".join(o.data for o in out if isinstance(o, Emitted))
    done = [o for o in out if isinstance(o, Finished)]
    assert emitted == b"a"
    assert [d.reason for d in done] == [FinishReason.STOP]
    assert done[0].usage.output_bytes == 3


def test_sample_in_flight_is_not_given_to_the_next_turn() -> None:
    """A turn cancelled while its step runs, then a new turn with no input: the byte sampled for
    the old turn (with the old parameters) is void; the new turn samples its own."""
    sched = Scheduler(1, 16, 16)
    sched.admit("s")
    sched.submit("s", b"hello", SamplingParams(max_bytes=5))
    plan = sched.schedule()
    assert [f.sample for f in plan.samples] == [True]
    assert [o.reason for o in sched.cancel("s") if isinstance(o, Finished)] == [
        FinishReason.CANCELLED
    ]
    sched.submit("s", b"", SamplingParams(max_bytes=5))
    assert sched.complete(plan, [ord("q")]) == []
    nxt = sched.schedule()
    assert [(f.data, f.sample) for f in nxt.sample_only] == [(b"", True)]
    out = sched.complete(nxt, [ord("r")])
    assert out == [Emitted("s", b"r")]


def test_prefill_round_robin_under_budget() -> None:
    sched = Scheduler(3, prefill_budget=5, prefill_chunk=3)
    for sid in "abc":
        sched.admit(sid)
        sched.submit(sid, sid.encode() * 7, None)
    fed = {sid: b"" for sid in "abc"}
    for _ in range(20):
        plan = sched.schedule()
        if not plan:
            break
        assert sum(len(f.data) for f in plan.prefill) <= 5
        assert all(len(f.data) <= 3 for f in plan.prefill)
        for f in (*plan.decode, *plan.prefill):
            fed[f.sid] += f.data
        sched.complete(plan, [])
    assert fed == {sid: sid.encode() * 7 for sid in "abc"}


def test_paused_session_waits_and_resumes() -> None:
    sched = Scheduler(2, 64, 64)
    sched.admit("slow")
    sched.admit("fast")
    for sid in ("slow", "fast"):
        sched.submit(sid, b"hi", SamplingParams(max_bytes=3))
    sched.pause("slow", True)
    for _ in range(5):
        plan = sched.schedule()
        assert "slow" not in {f.sid for f in (*plan.decode, *plan.prefill, *plan.sample_only)}
        sched.complete(plan, [ord("x")] * len(plan.samples))
    assert sched.seqs["fast"].turn is None and sched.seqs["slow"].turn is not None
    sched.pause("slow", False)
    plan = sched.schedule()
    assert [f.sid for f in plan.prefill] == ["slow"]


def test_take_resets_hands_over_new_slots_once() -> None:
    sched = Scheduler(2, 8, 8)
    a = sched.admit("a")
    assert sched.take_resets() == (a,)
    assert sched.take_resets() == ()
    sched.submit("a", b"xy", None)
    assert sched.schedule().reset == ()
    b = sched.admit("b")
    sched.release("b")  # released before any plan: nothing to zero
    assert b in sched.free and sched.take_resets() == ()


def test_input_during_a_speculative_byte_waits_for_it() -> None:
    """Pipelined: plan 2 feeds the byte plan 1 is still sampling. Input that arrives then is
    deferred (and counted as queued); completing plan 1 emits that byte first, then ends the turn
    (INTERRUPTED) with it, and queues the input."""
    sched = Scheduler(1, 16, 16)
    sched.admit("s")
    sched.submit("s", b"x", SamplingParams(max_bytes=10))
    first = sched.schedule()
    second = sched.schedule()  # made before the first completes
    assert len(second.spec) == 1 and second.decode[0].start == 1
    assert sched.submit("s", b"more", None) == []
    assert sched.seqs["s"].queued == 4 and not sched.seqs["s"].pending
    out = sched.complete(first, [ord("a")])
    assert out[0] == Emitted("s", b"a")
    done = out[-1]
    assert isinstance(done, Finished) and done.reason is FinishReason.INTERRUPTED
    assert done.usage.output_bytes == 1 and done.usage.context_bytes == 2  # "x", "a"
    assert bytes(sched.seqs["s"].pending) == b"more"
