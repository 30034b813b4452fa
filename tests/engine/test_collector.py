"""The collector: merging for a lagging consumer, text on whole UTF-8 boundaries, no raw byte
lost, control events in order after the bytes before them, lag pause and resume."""

from __future__ import annotations

import asyncio
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.collector import Collector
from engine.types import Delta, Done, Event, FinishReason, MemoryNotice, Usage

DONE = Done(FinishReason.LENGTH, Usage(0, 0, 0))

SETTINGS = settings(deadline=None)  # a loaded CI machine must not fail a slow example


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def deltas(events: list[Event]) -> list[Delta]:
    return [e for e in events if isinstance(e, Delta)]


def test_a_lagging_consumer_gets_one_merged_delta() -> None:
    c = Collector()
    for i in range(100):
        c.push(b"x%d " % i)
    events = c.take()
    want = b"".join(b"x%d " % i for i in range(100))
    assert events == [Delta(want, want.decode())]
    assert c.take() == [] and c.lag == 0


def test_multibyte_character_waits_for_its_last_byte() -> None:
    c = Collector()
    euro = "€".encode()  # 3 bytes
    c.push(b"a" + euro[:1])
    assert c.take() == [Delta(b"a" + euro[:1], "a")]
    c.push(euro[1:2])
    assert c.take() == [Delta(euro[1:2], "")]
    c.push(euro[2:] + b"b")
    assert c.take() == [Delta(euro[2:] + b"b", "€b")]


@SETTINGS
@given(
    text=st.text(max_size=60),
    cuts=st.lists(st.integers(0, 400), max_size=12),
    take_every=st.integers(1, 4),
)
def test_any_split_of_valid_utf8_gives_the_text_back(
    text: str, cuts: list[int], take_every: int
) -> None:
    data = text.encode()
    c = Collector()
    events: list[Event] = []
    for i, piece in enumerate(split(data, cuts)):
        c.push(piece)
        if i % take_every == 0:
            events += c.take()
    c.push_event(DONE)
    events += c.take()
    out = deltas(events)
    assert "".join(d.text for d in out) == text
    assert b"".join(d.data for d in out) == data
    seen, shown = b"", ""
    for d in out:  # text so far is every whole character of the bytes so far, no more, no less
        seen += d.data
        shown += d.text
        whole = next(k for k in range(len(seen), -1, -1) if _decodes(seen[:k]))
        assert shown == seen[:whole].decode()
    assert events[-1] == DONE


def _decodes(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


@SETTINGS
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("push"), st.binary(min_size=1, max_size=8)),
            st.tuples(st.just("push"), st.sampled_from(["é", "€", "𝄞"]).map(str.encode)),
            st.tuples(st.just("done"), st.none()),
            st.tuples(st.just("notice"), st.none()),
            st.tuples(st.just("take"), st.none()),
        ),
        max_size=30,
    )
)
def test_no_byte_lost_invalid_utf8_replaced_events_in_order(ops: list[tuple[str, object]]) -> None:
    """Any interleaving of pushes (arbitrary bytes), Dones, memory notices and takes."""
    c = Collector()
    events: list[Event] = []
    pushed = bytearray()
    turns: list[bytes] = []  # bytes of each turn that a Done closed
    turn_start = 0
    before: list[int] = []  # bytes pushed before each control event
    for op, arg in ops:
        if op == "push":
            assert isinstance(arg, bytes)
            c.push(arg)
            pushed += arg
        elif op == "done":
            c.push_event(DONE)
            turns.append(bytes(pushed[turn_start:]))
            turn_start = len(pushed)
            before.append(len(pushed))
        elif op == "notice":
            c.push_event(MemoryNotice(1))
            before.append(len(pushed))
        else:
            batch = c.take()
            # Merged: never two Deltas in a row within one take.
            for a, b in itertools.pairwise(batch):
                assert not (isinstance(a, Delta) and isinstance(b, Delta)), batch
            events += batch
    c.push_event(DONE)
    turns.append(bytes(pushed[turn_start:]))
    before.append(len(pushed))
    events += c.take()

    assert b"".join(d.data for d in deltas(events)) == bytes(pushed)
    assert all(d.data or d.text for d in deltas(events))
    seen, at, texts, text = 0, [], [], ""
    for e in events:
        if isinstance(e, Delta):
            seen += len(e.data)
            text += e.text
        else:
            at.append(seen)
            if isinstance(e, Done):
                texts.append(text)
                text = ""
    assert at == before, "a control event moved relative to the bytes around it"
    assert texts == [t.decode("utf-8", errors="replace") for t in turns]


def test_invalid_bytes_become_replacement_characters() -> None:
    c = Collector()
    c.push(b"ok\xff\xfe")
    c.push(b"\xc3")  # an unfinished sequence, then the turn ends
    c.push_event(DONE)
    events = c.take()
    assert b"".join(d.data for d in deltas(events)) == b"ok\xff\xfe\xc3"
    assert "".join(d.text for d in deltas(events)) == "ok\ufffd\ufffd\ufffd"
    assert events[-1] == DONE
    c.push("é".encode())  # the next turn starts clean
    assert c.take() == [Delta("é".encode(), "é")]


def test_unfinished_character_taken_earlier_is_flushed_at_done() -> None:
    c = Collector()
    c.push(b"a\xe2\x82")
    assert c.take() == [Delta(b"a\xe2\x82", "a")]
    c.push_event(DONE)
    assert c.take() == [Delta(b"", "\ufffd"), DONE]


def test_binary_mode_hands_out_raw_bytes() -> None:
    c = Collector(binary=True)
    c.push(b"\xff\x00")
    c.push(b"\xe2\x82")
    c.push_event(DONE)
    c.push(b"\xac")
    assert c.take() == [Delta(b"\xff\x00\xe2\x82", ""), DONE, Delta(b"\xac", "")]


def test_done_comes_after_the_bytes_before_it() -> None:
    c = Collector()
    notice = MemoryNotice(3, [{"level": 1, "slots": 4}])
    c.push(b"ab")
    c.push_event(notice)
    c.push(b"cd")
    c.push_event(DONE)
    c.push(b"ef")
    assert c.take() == [Delta(b"ab", "ab"), notice, Delta(b"cd", "cd"), DONE, Delta(b"ef", "ef")]


def test_lag_limit_pauses_and_taking_resumes() -> None:
    calls: list[bool] = []
    c = Collector(lag_limit=4, on_lag=calls.append)
    c.push(b"abc")
    assert calls == []
    c.push(b"d")
    assert calls == [True]
    c.push(b"efgh")
    assert calls == [True], "one pause per lag episode"
    assert c.lag == 8
    c.take()
    assert calls == [True, False]
    c.push(b"ab")
    c.take()
    assert calls == [True, False], "no resume without a pause"


async def test_events_iterates_until_closed_and_drained() -> None:
    c = Collector()

    async def produce() -> None:
        for piece in (b"he", b"llo", b" w"):
            c.push(piece)
            await asyncio.sleep(0)
        c.push(b"orld")
        c.push_event(DONE)
        c.close()

    task = asyncio.create_task(produce())
    got = [e async for e in c.events()]
    await task
    assert "".join(d.text for d in deltas(got)) == "hello world"
    assert got[-1] == DONE


async def test_next_batch_waits_times_out_and_sees_close() -> None:
    c = Collector()
    assert await c.next_batch(timeout=0.01) == []
    asyncio.get_running_loop().call_later(0.01, c.push, b"x")
    assert await c.next_batch(timeout=5) == [Delta(b"x", "x")]
    c.close()
    assert await c.next_batch(timeout=5) == []


async def test_stream_interval_wakes_for_the_first_byte_then_every_n_and_at_done() -> None:
    """The consumer sleeps until `stream_interval` bytes wait, except for the first byte of a
    turn, events, and close; no byte is lost or reordered by the coalescing."""
    c = Collector(binary=True, stream_interval=4)
    c.push(b"a")  # first byte of the turn: wakes at once
    assert c._wake.is_set()
    assert [e.data for e in c.take() if isinstance(e, Delta)] == [b"a"]
    c._wake.clear()
    for b in (b"b", b"c", b"d"):
        c.push(b)
        assert not c._wake.is_set()  # 1, 2, 3 bytes wait: not yet
    c.push(b"e")
    assert c._wake.is_set()  # 4 bytes wait
    assert [e.data for e in c.take() if isinstance(e, Delta)] == [b"bcde"]
    c._wake.clear()
    c.push(b"f")
    assert not c._wake.is_set()
    c.push_event(Done(FinishReason.LENGTH, Usage(1, 6, 7)))  # the end wakes with what waits
    assert c._wake.is_set()
    got = c.take()
    assert b"".join(e.data for e in got if isinstance(e, Delta)) == b"f"
    assert isinstance(got[-1], Done)
    c._wake.clear()
    c.push(b"g")  # the next turn's first byte wakes again
    assert c._wake.is_set()

    # through the async iterator: every byte arrives, in order
    c2 = Collector(binary=True, stream_interval=3)
    data = bytes(range(50))
    for i in range(len(data)):
        c2.push(data[i : i + 1])
    c2.push_event(Done(FinishReason.LENGTH, Usage(0, 50, 50)))
    c2.close()
    out = b""
    async for ev in c2.events():
        if isinstance(ev, Delta):
            out += ev.data
    assert out == data
