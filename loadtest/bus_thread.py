"""One asyncio loop in a real OS thread, shared by every NATS user of a locust process.

locust runs its users as gevent greenlets on a monkey-patched stdlib; nats-py needs asyncio.
The loop runs in a thread started with the unpatched `_thread.start_new_thread` and polls with
the unpatched epoll selector, so gevent never sees it. Greenlets hand work in with
`call_soon_threadsafe` and read results back from a deque (append and popleft are atomic), never
through a lock that gevent patched. bus_thread.py never imports locust.

Documents follow docs/INGEST.md's message format (memory/ingest.py's `chunk_headers`, written
out here so the locust process does not import torch): one message per document, since the
documents are smaller than max_payload.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import os
import time
from dataclasses import dataclass
from typing import Any

import nats
from nats.js.errors import NotFoundError

from memory.bus import Bus, docs_subject
from memory.config import MemoryConfig


def _original(module: str, name: str) -> Any:
    try:
        from gevent import monkey

        return monkey.get_original(module, name)
    except ImportError:  # no gevent: the stdlib is the original
        mod = __import__(module)
        return getattr(mod, name)


@dataclass
class Published:
    ok: bool
    seconds: float
    size: int
    error: str = ""


class BusThread:
    """Connect once, publish documents with JetStream acks, count what was acked."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.cfg = MemoryConfig()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.js: Any = None
        self.error = ""
        self.ready = collections.deque[bool]()
        self.acked = 0  # documents acked as new (not duplicates)
        self.acked_bytes = 0
        self._ids = itertools.count()
        _original("_thread", "start_new_thread")(self._main, ())

    def _main(self) -> None:
        selector = _original("selectors", "EpollSelector")()
        self.loop = asyncio.SelectorEventLoop(selector)
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._connect())
        self.ready.append(True)
        self.loop.run_forever()

    async def _connect(self) -> None:
        try:
            nc = await nats.connect(self.url, name="bwr-loadtest", connect_timeout=5)
            bus = Bus(nc, self.cfg)
            try:
                await bus.js.stream_info(self.cfg.docs_stream)
            except NotFoundError:  # a fresh server: make the streams as `bwr ingest` would
                await bus.ensure()
            self.js = bus.js
        except Exception as e:  # reported by every publish
            self.error = f"{type(e).__name__}: {e}"

    def wait_ready(self, sleep: Any, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready:
            if time.monotonic() > deadline:
                raise TimeoutError(f"NATS thread did not connect to {self.url}")
            sleep(0.01)

    def submit(self, namespace: str, size: int, out: collections.deque[Published]) -> None:
        """Publish one fresh document of `size` bytes; its Published lands in `out`."""
        assert self.loop is not None
        n = next(self._ids)
        body = os.urandom(16).hex().encode() + f" {n} ".encode()
        body = (body * (size // len(body) + 1))[:size]
        self.loop.call_soon_threadsafe(
            lambda: self.loop.create_task(self._publish(namespace, body, out))  # type: ignore[union-attr]
        )

    async def _publish(
        self, namespace: str, body: bytes, out: collections.deque[Published]
    ) -> None:
        t0 = time.perf_counter()
        if self.js is None:
            out.append(Published(False, 0.0, len(body), self.error or "not connected"))
            return
        did = hashlib.sha256(namespace.encode() + b"\0" + body).hexdigest()
        headers = {
            "Nats-Msg-Id": did,
            "Bwr-Doc": did,
            "Bwr-Chunk": "0",
            "Bwr-Chunks": "1",
            "Bwr-Namespace": namespace,
            "Bwr-Doc-Bytes": str(len(body)),
        }
        try:
            ack = await self.js.publish(
                docs_subject(namespace),
                body,
                headers=headers,
                stream=self.cfg.docs_stream,
                timeout=10,
            )
        except Exception as e:
            out.append(
                Published(False, time.perf_counter() - t0, len(body), f"{type(e).__name__}: {e}")
            )
            return
        if ack.duplicate:
            out.append(Published(False, time.perf_counter() - t0, len(body), "duplicate ack"))
            return
        self.acked += 1
        self.acked_bytes += len(body)
        out.append(Published(True, time.perf_counter() - t0, len(body)))


_shared: BusThread | None = None


def shared(url: str) -> BusThread:
    """The process's one BusThread (created by the first NATS user, a greenlet: no race)."""
    global _shared
    if _shared is None:
        _shared = BusThread(url)
    return _shared


async def stream_messages(url: str, stream: str = "DOCS") -> tuple[int, int]:
    """(messages, bytes) the stream holds now."""
    nc = await nats.connect(url, connect_timeout=5)
    try:
        info = await nc.jetstream().stream_info(stream)
        return int(info.state.messages), int(info.state.bytes)
    finally:
        await nc.close()
