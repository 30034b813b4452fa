"""events.py publishes the gateway's events to NATS, best effort: `events.session` (opened,
attached, detached, closed) and `events.engine` (a throughput summary every interval). It also
keeps the last TRAIN_HISTORY `events.train` reports of a trainer on the bus (step, loss, bytes/s),
so a dashboard opened mid-run draws the loss curve from its start.

NATS is optional for serving: publishing never blocks a request (a bounded queue; when it is full
events are dropped and counted), a lost server is retried forever in the background, and
`connected` tells /readyz and /metrics how it stands. events.py owns this one client connection;
it never creates streams or buckets (memory/bus.py does).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
import nats
import orjson
from nats.aio.client import Client as NATS

log = logging.getLogger("bwr.events")

EVENTS_PREFIX = "events"  # the same prefix as memory/bus.py's dashboard feed
TRAIN_HISTORY = 2048  # training reports kept for GET /v1/training


class EventBus:
    def __init__(self, url: str, *, queue_size: int = 1024, interval_s: float = 1.0) -> None:
        self.url = url
        self.interval_s = interval_s
        self.nc: NATS | None = None
        self.queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(queue_size)
        self.published = 0
        self.dropped = 0
        self.failed = 0
        self.reconnects = 0
        self.training: deque[dict[str, Any]] = deque(maxlen=TRAIN_HISTORY)
        self._closing = False

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    def publish(self, kind: str, payload: dict[str, Any]) -> None:
        """Queue an event for `events.<kind>`; never blocks, drops when the queue is full."""
        try:
            self.queue.put_nowait(
                (f"{EVENTS_PREFIX}.{kind}", orjson.dumps({"ts": time.time(), **payload}))
            )
        except asyncio.QueueFull:
            self.dropped += 1

    async def run(self, summary: Callable[[], dict[str, Any]]) -> None:
        """Connect (retrying), publish queued events and the periodic summary; until cancelled."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._ticker, summary)
            await self._connect()
            tg.start_soon(self._publisher)

    async def _connect(self) -> None:
        delay = 0.25
        while True:
            try:
                self.nc = await nats.connect(
                    self.url,
                    name="bwr-gateway",
                    connect_timeout=2,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnect,
                    reconnected_cb=self._on_reconnect,
                )
                log.info("events: connected to %s", self.url)
                await self.nc.subscribe(f"{EVENTS_PREFIX}.train", cb=self._on_train)
                return
            except Exception as e:  # any failure to reach the server: try again later
                log.warning(
                    "events: cannot reach NATS at %s (%s); retrying", self.url, type(e).__name__
                )
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _publisher(self) -> None:
        while True:
            subject, data = await self.queue.get()
            nc = self.nc
            if nc is None:
                continue
            try:
                await nc.publish(subject, data)  # buffered by the client while it reconnects
                self.published += 1
            except Exception as e:  # a full reconnect buffer or a closed client: drop, go on
                self.failed += 1
                log.debug("events: publish %s failed: %s", subject, e)

    async def _ticker(self, summary: Callable[[], dict[str, Any]]) -> None:
        while True:
            await anyio.sleep(self.interval_s)
            self.publish("engine", summary())

    async def close(self) -> None:
        """Flush what is queued (briefly) and close the connection; never raises."""
        self._closing = True
        nc, self.nc = self.nc, None
        if nc is None:
            return
        with anyio.move_on_after(2.0, shield=True):
            try:
                while not self.queue.empty() and nc.is_connected:
                    subject, data = self.queue.get_nowait()
                    await nc.publish(subject, data)
                if nc.is_connected:
                    await nc.flush(timeout=1)
            except Exception as e:
                log.debug("events: flush on close failed: %s", e)
            try:
                await nc.close()
            except Exception as e:
                log.debug("events: close failed: %s", e)

    async def _on_train(self, msg: Any) -> None:
        """Keep a trainer's report (a JSON object with a numeric step); ignore anything else."""
        try:
            report = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            return
        if isinstance(report, dict) and isinstance(report.get("step"), int):
            self.training.append(report)

    async def _on_error(self, e: Exception) -> None:
        log.debug("events: NATS error: %s", e)

    async def _on_disconnect(self) -> None:
        if self._closing:
            return
        log.warning("events: NATS connection lost; the gateway keeps serving and retries")

    async def _on_reconnect(self) -> None:
        self.reconnects += 1
        log.info("events: NATS reconnected")
