"""collector.py hands one session's output to its consumer; it never blocks the engine.

One collector per session, a single slot: bytes the engine emits while the consumer is busy are
merged into the slot rather than queued event by event, so a slow consumer costs memory bounded
by its lag (and the engine pauses that session past `lag_limit`, never the batch). The consumer
is woken for the first byte of a turn, for every event, and then once `stream_interval` bytes
wait: with hundreds of sessions streaming, waking each consumer every byte costs more host time
than the step itself. Text goes out
only on whole UTF-8 boundaries (an incomplete trailing sequence waits for its next byte; invalid
bytes become U+FFFD); binary mode hands out raw bytes. No torch here.
"""

from __future__ import annotations

import asyncio
import codecs
from collections.abc import AsyncIterator, Callable

from engine.types import Delta, Done, Event, MemoryNotice


class Collector:
    def __init__(
        self,
        *,
        binary: bool = False,
        lag_limit: int = 4096,
        on_lag: Callable[[bool], None] | None = None,
        stream_interval: int = 1,
    ) -> None:
        self.binary = binary
        self.lag_limit = lag_limit
        self.stream_interval = stream_interval
        self._eager = True  # the next byte starts a turn: wake the consumer for it at once
        self._on_lag = on_lag
        self._buf = bytearray()  # emitted, not yet handed out
        self._text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._order: list[tuple[int, Done | MemoryNotice]] = []  # (bytes before it, event)
        self._wake = asyncio.Event()
        self._lagging = False
        self.closed = False

    # ----- engine side -----

    def push(self, data: bytes) -> None:
        self._buf += data
        if self._eager or len(self._buf) >= self.stream_interval:
            self._eager = False
            self._wake.set()
        if not self._lagging and len(self._buf) >= self.lag_limit:
            self._lagging = True
            if self._on_lag:
                self._on_lag(True)

    def push_event(self, event: Done | MemoryNotice) -> None:
        self._order.append((len(self._buf), event))
        if isinstance(event, Done):
            self._eager = True
        self._wake.set()

    def close(self) -> None:
        self.closed = True
        self._wake.set()

    @property
    def lag(self) -> int:
        return len(self._buf)

    # ----- consumer side -----

    def take(self) -> list[Event]:
        """Everything ready now, merged: at most one Delta between control events."""
        events: list[Event] = []
        consumed = 0
        for upto, ev in self._order:
            if upto > consumed:
                events += self._delta(bytes(self._buf[consumed:upto]), final=isinstance(ev, Done))
                consumed = upto
            elif isinstance(ev, Done):
                events += self._flush_text()
            events.append(ev)
        self._order.clear()
        if len(self._buf) > consumed:
            events += self._delta(bytes(self._buf[consumed:]), final=False)
        self._buf.clear()
        if self._lagging:
            self._lagging = False
            if self._on_lag:
                self._on_lag(False)
        return events

    def _delta(self, data: bytes, final: bool) -> list[Event]:
        if self.binary:
            return [Delta(data, "")]
        text = self._text.decode(data, final=final)
        if final:
            self._text.reset()
        return [Delta(data, text)] if data else []

    def _flush_text(self) -> list[Event]:
        if self.binary:
            return []
        text = self._text.decode(b"", final=True)
        self._text.reset()
        return [Delta(b"", text)] if text else []

    async def events(self) -> AsyncIterator[Event]:
        """Iterate events until the collector closes (and is drained)."""
        while True:
            self._wake.clear()
            ready = self.take()
            for ev in ready:
                yield ev
            if not ready:
                if self.closed:
                    return
                await self._wake.wait()

    async def next_batch(self, timeout: float | None = None) -> list[Event]:
        """Wait for at least one event (or close / timeout) and return everything ready."""
        while True:
            self._wake.clear()
            ready = self.take()
            if ready or self.closed:
                return ready
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                return []
