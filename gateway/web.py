"""web.py serves the browser side of the gateway: the page at `/`, the static files of web/static
under `/static`, and `GET /v1/events`, a Server-Sent Events feed of what the gateway emits.

The feed is an in-process fan-out (`Feed`): every `Gateway.emit` (session events) and the periodic
engine summary reach each subscriber's bounded queue; a subscriber that reads too slowly loses
events (counted) rather than slowing the gateway. It works with or without NATS; with a bus, each
subscriber also gets the other services' `events.>` (namespace ingestion, failed memory jobs),
forwarded as they are. web.py never touches the engine itself: it reads only what the Gateway
hands it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import orjson
from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from gateway.events import EVENTS_PREFIX

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("bwr.web")

STATIC = Path(__file__).resolve().parent.parent / "web" / "static"
KEEPALIVE_S = 15.0  # an SSE comment this often keeps proxies from closing an idle feed
POLL_S = 0.5  # how often a waiting feed looks at whether the gateway is closing
OWN_KINDS = frozenset({"engine", "session"})  # in the feed from this process, not from the bus
KIND = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # an SSE event name taken from a subject


class Feed:
    """Bounded fan-out of events to the SSE subscribers of this process."""

    def __init__(self, queue_size: int = 256, max_subscribers: int = 64) -> None:
        self.queue_size = queue_size
        self.max_subscribers = max_subscribers
        self.subscribers: set[asyncio.Queue[bytes]] = set()
        self.dropped = 0

    def publish(self, kind: str, payload: dict[str, Any]) -> None:
        """Hand one event to every subscriber; never blocks (a full queue drops it)."""
        if not self.subscribers:
            return
        frame = self.frame(kind, orjson.dumps({"ts": time.time(), **payload}))
        for q in self.subscribers:
            try:
                q.put_nowait(frame)
            except asyncio.QueueFull:
                self.dropped += 1

    @staticmethod
    def frame(kind: str, data: bytes) -> bytes:
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

    @contextmanager
    def subscribe(self) -> Iterator[asyncio.Queue[bytes] | None]:
        """A queue of SSE frames, or None when there are already max_subscribers."""
        if len(self.subscribers) >= self.max_subscribers:
            yield None
            return
        q: asyncio.Queue[bytes] = asyncio.Queue(self.queue_size)
        self.subscribers.add(q)
        try:
            yield q
        finally:
            self.subscribers.discard(q)

    async def tick(self, summary: Callable[[], dict[str, Any]], interval_s: float) -> None:
        """Call summary() every interval (it publishes); until cancelled. Used without NATS."""
        while True:
            await anyio.sleep(interval_s)
            summary()


def _gateway(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


async def page(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def _bridge(gw: Gateway, q: asyncio.Queue[bytes]) -> Any:
    """Subscribe q to the bus's `events.>` from other services; None without a connected bus."""
    nc = gw.events.nc if gw.events is not None else None
    if nc is None or not nc.is_connected:
        return None

    async def forward(msg: Any) -> None:
        kind = msg.subject.removeprefix(EVENTS_PREFIX + ".")
        if kind in OWN_KINDS or not KIND.fullmatch(kind) or b"\n" in msg.data:
            return
        try:
            q.put_nowait(Feed.frame(kind, msg.data))
        except asyncio.QueueFull:
            gw.feed.dropped += 1

    try:
        sub = await nc.subscribe(EVENTS_PREFIX + ".>", cb=forward)
        await nc.flush(timeout=1)  # the server knows the subscription before the feed answers
        return sub
    except Exception as e:  # the bus is optional: the feed goes on without it
        log.debug("web: cannot subscribe to events: %s", e)
        return None


async def events(request: Request) -> Response:
    """`event: engine` every second (Gateway.summary) and `event: session` as sessions change."""
    gw = _gateway(request)

    async def stream() -> AsyncIterator[bytes]:
        with gw.feed.subscribe() as q:
            if q is None:
                yield b'event: error\ndata: {"error":"too many event subscribers"}\n\n'
                return
            sub = await _bridge(gw, q)
            try:
                yield b"retry: 1000\n: connected\n\n"
                idle = 0.0
                while not gw.closing:
                    try:
                        with anyio.fail_after(POLL_S):
                            frame = await q.get()
                    except TimeoutError:
                        idle += POLL_S
                        if idle >= KEEPALIVE_S:
                            idle = 0.0
                            yield b": keepalive\n\n"
                        continue
                    idle = 0.0
                    yield frame
            finally:
                if sub is not None:
                    with anyio.CancelScope(shield=True):
                        try:
                            await sub.unsubscribe()
                        except Exception as e:  # a closed connection has no subscription left
                            log.debug("web: unsubscribe failed: %s", e)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def routes() -> list[BaseRoute]:
    return [
        Route("/", page),
        Route("/v1/events", events, methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=STATIC, check_dir=False), name="static"),
    ]
