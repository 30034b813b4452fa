"""The asyncio engine on a tiny CPU model, end to end: outputs, turns, lifecycle, weights.

Every output is held to `RefSession` (reference.py): the same model driven directly. Batching,
prefill chunking, the budget and the worker thread must not change a byte.
"""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path

import pytest

from engine import (
    Busy,
    Delta,
    Done,
    Engine,
    FinishReason,
    IncompatibleWeights,
    InputTooLarge,
    SamplingParams,
    SessionClosed,
    ShuttingDown,
    UnknownSession,
)
from model import ByteLM
from tests.engine.reference import (
    CONFIG,
    Reader,
    RefSession,
    engine_config,
    make_model,
    reference,
    until,
)

pytestmark = pytest.mark.usefixtures("pipelined")

PROMPTS = [
    b"a",
    b"hello",
    bytes(range(40, 90)),
    b"The quick brown fox jumps over the lazy dog. " * 3,
]
PARAMS = [
    SamplingParams(max_bytes=20, temperature=0.0),
    SamplingParams(max_bytes=20, temperature=0.9, seed=11),
    SamplingParams(max_bytes=20, temperature=1.2, top_k=20, seed=12),
    SamplingParams(max_bytes=20, temperature=0.8, top_p=0.9, seed=2**40 + 13),
]


# ----- outputs -----


async def test_batched_equals_alone_equals_reference(model: ByteLM) -> None:
    """Four sessions at once (prompts up to 135 bytes: prefill spans several steps and shares the
    budget) give the bytes each gives alone, and the bytes of the direct reference."""
    want = [reference(model, p, sp) for p, sp in zip(PROMPTS, PARAMS, strict=True)]
    assert any(len(p) > 16 * 3 for p in PROMPTS)

    async with Engine(model, engine_config()) as engine:
        sessions = [engine.open() for _ in PROMPTS]
        for s, p, sp in zip(sessions, PROMPTS, PARAMS, strict=True):
            s.submit(p, sp)
        batched = await asyncio.gather(*(Reader(s).turn() for s in sessions))
        for s in sessions:
            await s.close()
        alone = []
        for p, sp in zip(PROMPTS, PARAMS, strict=True):
            s = engine.open()
            s.submit(p, sp)
            alone.append(await Reader(s).turn())
            await s.close()

        for (b_out, b_done), (a_out, a_done), (r_out, r_reason), p in zip(
            batched, alone, want, PROMPTS, strict=True
        ):
            assert b_out == a_out == r_out
            assert b_done.reason is a_done.reason is r_reason
            assert b_done.usage.input_bytes == len(p)
            assert b_done.usage.output_bytes == len(r_out)

        m = engine.metrics
        turns = 2 * len(PROMPTS)
        assert m.turns == turns and sum(m.finished.values()) == turns
        assert m.ttft.n == turns and m.queue.n == turns
        assert m.itl.n > 0 and m.step.n == m.steps > 0 and m.batch.n == m.steps
        assert m.bytes_out == 2 * sum(len(out) for out, _ in want)
        assert m.bytes_in >= 2 * sum(len(p) for p in PROMPTS)
        assert max(m.batch.recent) >= 2, "sessions never shared a step"
        assert m.ttft.quantile(0.5) > 0 and m.sessions == 0


async def test_same_seed_same_bytes_and_counter_carries_on_without_seed(model: ByteLM) -> None:
    p = SamplingParams(max_bytes=12, temperature=1.0, seed=5)
    async with Engine(model, engine_config()) as engine:
        a, b = engine.open(), engine.open()
        ra, rb = Reader(a), Reader(b)
        a.submit(b"abc", p)
        b.submit(b"abc", p)
        (out_a, _), (out_b, _) = await asyncio.gather(ra.turn(), rb.turn())
        assert out_a == out_b == reference(model, b"abc", p)[0]

        slot = engine.scheduler.seqs[a.id].slot
        assert int(engine.runner.counter[slot]) == 12  # one per sampled byte
        a.submit(b"", SamplingParams(max_bytes=5, temperature=1.0))  # no seed: the counter goes on
        out, done = await ra.turn()
        assert int(engine.runner.counter[slot]) == 12 + samples(out, done)
        a.submit(b"", p)  # the seed again: the counter starts over
        out, done = await ra.turn()
        assert int(engine.runner.counter[slot]) == samples(out, done)


def samples(out: bytes, done: Done) -> int:
    """Bytes sampled in a turn: each output byte, and the EOS that ended it."""
    return len(out) + (done.reason is FinishReason.EOS)


async def test_input_while_generating_interrupts_and_is_read_next(model: ByteLM) -> None:
    first = SamplingParams(max_bytes=10_000, temperature=0.0)
    second = SamplingParams(max_bytes=12, temperature=0.9, seed=3)
    async with Engine(model, engine_config()) as engine:
        s = engine.open()
        r = Reader(s)
        s.submit(b"once upon a time", first)
        await r.first_delta()
        s.submit(b" and then", second)
        gen1, done1 = await r.turn()
        gen2, done2 = await r.turn()

    assert done1.reason is FinishReason.INTERRUPTED
    assert 0 < len(gen1) < first.max_bytes and done1.usage.output_bytes == len(gen1)
    full, _ = reference(
        model, b"once upon a time", SamplingParams(max_bytes=len(gen1), temperature=0.0)
    )
    assert gen1 == full
    ref = RefSession(model)
    ref.feed(b"once upon a time" + gen1 + b" and then")
    assert (gen2, done2.reason) == ref.generate(second)
    assert done2.usage.input_bytes == len(b" and then")


async def test_cancel_ends_the_turn_and_close_frees_the_slot(model: ByteLM) -> None:
    p = SamplingParams(max_bytes=8, temperature=0.0)
    endless = SamplingParams(max_bytes=10_000, temperature=0.0)
    async with Engine(model, engine_config(max_slots=2)) as engine:
        a, b = engine.open(), engine.open()
        with pytest.raises(Busy):
            engine.open()
        ra, rb = Reader(a), Reader(b)
        a.submit(b"cancel me", endless)
        b.submit(b"close me", endless)
        await ra.first_delta()
        await rb.first_delta()
        a.cancel()
        gen_a, done = await ra.turn()
        assert done.reason is FinishReason.CANCELLED and not a.generating
        a.submit(b"next", p)  # the session lives on, its cancelled bytes read back
        await b.close()
        c = engine.open()  # the slot is free at once
        assert len(engine.scheduler.seqs) == 2
        _, done_b = await rb.turn()
        assert done_b.reason is FinishReason.CLOSED
        c.submit(b"fresh start", p)  # on the closed session's slot, from a zeroed state
        out_a, _ = await ra.turn()
        out_c, _ = await Reader(c).turn()
        ref = RefSession(model)
        ref.feed(b"cancel me" + gen_a + b"next")
        assert out_a == ref.generate(p)[0]
        assert out_c == reference(model, b"fresh start", p)[0]
        await until(lambda: a.context_bytes == len(ref.fed))


async def test_errors(model: ByteLM) -> None:
    async with Engine(
        model, engine_config(max_slots=1, max_input_bytes=64, max_pending_bytes=100)
    ) as engine:
        s = engine.open("mine")
        assert engine.get("mine") is s
        with pytest.raises(UnknownSession):
            engine.get("nobody")
        with pytest.raises(Busy):
            engine.open("mine")
        with pytest.raises(InputTooLarge):
            s.submit(b"x" * 65)
        engine.scheduler.pause("mine", True)  # hold the input unread
        s.submit(b"x" * 64)
        with pytest.raises(Busy):
            s.submit(b"y" * 40)  # 104 unread bytes would pass max_pending_bytes
        engine.scheduler.pause("mine", False)
        await s.close()
        for call in (lambda: s.submit(b"late"), s.cancel):
            with pytest.raises(SessionClosed):
                call()
        await s.close()  # closing twice is fine
        assert (await s.next_batch(timeout=1)) == []


async def test_stop_sequence_is_not_emitted_and_ends_with_stop(model: ByteLM) -> None:
    greedy = SamplingParams(max_bytes=40, temperature=0.0)
    free, _ = reference(model, b"hello", greedy)
    stop = free[12:14]
    cut = free.find(stop)
    p = SamplingParams(max_bytes=40, temperature=0.0, stop=(b"\x00never", stop))
    async with Engine(model, engine_config()) as engine:
        s = engine.open()
        s.submit(b"hello", p)
        out, done = await Reader(s).turn()
    assert done.reason is FinishReason.STOP
    assert out == free[:cut] and stop not in out
    assert done.usage.output_bytes == cut + len(stop)


async def test_eos_ends_the_turn(model: ByteLM) -> None:
    p = SamplingParams(max_bytes=40, temperature=0.0)
    want, reason = reference(model, b"stop here:", p)
    assert reason is FinishReason.EOS  # this model's greedy choice, not the length
    async with Engine(model, engine_config()) as engine:
        s = engine.open()
        s.submit(b"stop here:", p)
        out, done = await Reader(s).turn()
    assert (out, done.reason) == (want, FinishReason.EOS) and done.usage.output_bytes == len(want)


async def test_ignore_eos_runs_the_turn_to_max_bytes(model: ByteLM) -> None:
    p = SamplingParams(max_bytes=40, temperature=0.0, ignore_eos=True)
    want, reason = reference(model, b"stop here:", p)  # greedy picks EOS here without the flag
    assert reason is FinishReason.LENGTH and len(want) == 40
    async with Engine(model, engine_config(max_slots=2)) as engine:
        a, b = engine.open(), engine.open()
        a.submit(b"stop here:", p)
        b.submit(b"stop here:", SamplingParams(max_bytes=40, temperature=0.0))  # same batch
        out, done = await Reader(a).turn()
        _, other = await Reader(b).turn()
    assert (out, done.reason) == (want, FinishReason.LENGTH)
    assert other.reason is FinishReason.EOS  # the flag is per session


async def test_max_bytes_gives_length(model: ByteLM) -> None:
    p = SamplingParams(max_bytes=7, temperature=0.7, seed=1)
    want, reason = reference(model, b"count", p)
    async with Engine(model, engine_config()) as engine:
        s = engine.open()
        s.submit(b"count", p)
        out, done = await Reader(s).turn()
        s.submit(b"", SamplingParams(max_bytes=0))  # nothing to do: no turn
        assert not s.generating
    assert (out, done.reason) == (want, reason) and reason is FinishReason.LENGTH and len(out) == 7


async def test_a_slow_consumer_pauses_only_its_own_session(model: ByteLM) -> None:
    p = SamplingParams(max_bytes=64, temperature=0.0)
    async with Engine(model, engine_config(max_slots=2, lag_limit=8)) as engine:
        slow, fast = engine.open(), engine.open()
        slow.submit(b"slow reader", p)
        fast.submit(b"fast reader", p)
        fast_out, fast_done = await Reader(fast).turn()  # slow is not read meanwhile
        assert fast_done.reason is FinishReason.LENGTH and len(fast_out) == 64
        await until(lambda: engine.scheduler.seqs[slow.id].paused)
        assert slow.generating and 8 <= slow.collector.lag < 64
        lag = slow.collector.lag
        await asyncio.sleep(0.05)
        assert slow.collector.lag == lag, "a paused session kept decoding"
        slow_out, slow_done = await Reader(slow).turn()
    assert (slow_out, slow_done.reason) == reference(model, b"slow reader", p)
    assert (fast_out, fast_done.reason) == reference(model, b"fast reader", p)


async def test_shutdown_stops_intake_drains_and_closes(model: ByteLM) -> None:
    engine = Engine(model, engine_config())
    await engine.start()
    long, short = engine.open(), engine.open()
    long.submit(b"forever", SamplingParams(max_bytes=1_000_000, temperature=0.0))
    r_long, r_short = Reader(long), Reader(short)
    await r_long.first_delta()
    short.submit(b"brief", SamplingParams(max_bytes=3, temperature=0.0))
    stopping = asyncio.create_task(engine.shutdown(drain_s=1.5))
    await asyncio.sleep(0)
    with pytest.raises(ShuttingDown):
        engine.open()
    with pytest.raises(ShuttingDown):
        long.submit(b"more")
    _, short_done = await r_short.turn()
    assert short_done.reason is FinishReason.LENGTH  # a short turn finishes while draining
    await stopping
    _, long_done = await r_long.turn()
    assert long_done.reason is FinishReason.CLOSED  # the drain ran out: cut
    assert not engine.sessions and long.closed and short.closed
    assert long.collector.closed and [e async for e in long.events()] == []
    with pytest.raises(SessionClosed):
        long.submit(b"after")


# ----- weights -----


async def test_load_weights_hot_swaps_and_rejects_another_shape(
    model: ByteLM, tmp_path: Path
) -> None:
    p = SamplingParams(max_bytes=16, temperature=0.8, seed=4)
    live = copy.deepcopy(model)
    other = make_model(1)
    other.save(str(tmp_path / "other"))
    make_model(2, CONFIG.replace(d_model=48)).save(str(tmp_path / "wide"))
    want_before = reference(model, b"weights", p)
    want_after = reference(other, b"weights", p)
    assert want_before[0] != want_after[0]
    async with Engine(live, engine_config()) as engine:
        s = engine.open()
        r = Reader(s)
        s.submit(b"weights", p)
        assert (await r.turn())[0] == want_before[0]
        assert await engine.load_weights(str(tmp_path / "other")) == 1
        t = engine.open()
        t.submit(b"weights", p)
        assert (await Reader(t).turn())[0] == want_after[0]
        with pytest.raises(IncompatibleWeights):
            await engine.load_weights(str(tmp_path / "wide"))
        assert engine.metrics.weights_version == 1
        u = engine.open()
        u.submit(b"weights", p)
        assert (await Reader(u).turn())[0] == want_after[0]


def test_observe_n_equals_n_observations() -> None:
    from engine.metrics import Histogram

    a, b = Histogram(), Histogram()
    for v, n in ((0.002, 3), (0.04, 1), (7.0, 5)):
        a.observe_n(v, n)
        for _ in range(n):
            b.observe(v)
    assert (a.counts, a.n, a.total, list(a.recent)) == (b.counts, b.n, b.total, list(b.recent))
    assert a.quantile(0.5) == b.quantile(0.5)


async def test_stream_interval_coalesces_deliveries_and_changes_no_byte(model: ByteLM) -> None:
    """With stream_interval 8 the consumer is woken about every 8 bytes (plus the first byte and
    the end), and the bytes are exactly those of stream_interval 1."""
    params = SamplingParams(max_bytes=64, temperature=0.9, seed=5)
    outputs, wakes = [], []
    for interval in (1, 8):
        async with Engine(model, engine_config(stream_interval=interval)) as engine:
            session = engine.open(binary=True)
            session.submit(b"Once upon a time", params)
            data, n = bytearray(), 0
            while True:
                batch = await asyncio.wait_for(session.next_batch(), 30)
                n += 1
                data += b"".join(e.data for e in batch if isinstance(e, Delta))
                if any(isinstance(e, Done) for e in batch):
                    break
            outputs.append(bytes(data))
            wakes.append(n)
            await session.close()
    assert outputs[0] == outputs[1] and len(outputs[0]) == 64
    assert wakes[1] <= 64 // 8 + 2 < wakes[0], wakes
