"""GET /v1/events without a browser: the SSE feed carries the engine summary every second and the
session events as they happen, with no NATS at all; a slow subscriber loses events (counted)
instead of slowing the gateway; the page and its static files need no API key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import nats
import orjson
import pytest

from gateway.config import GatewayConfig
from gateway.web import Feed
from tests.gateway.conftest import TIMEOUT, Client, Running, serve
from tests.nats_server import NatsServer


@pytest.fixture(scope="module")
def running() -> Iterator[Running]:
    r = serve(GatewayConfig(events_interval_s=0.2))
    yield r
    r.stop()


async def _events(response: httpx.Response) -> list[tuple[str, dict[str, object]]]:
    """Read SSE blocks until both an engine and a session event were seen."""
    seen: list[tuple[str, dict[str, object]]] = []
    kind = ""
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            seen.append((kind, orjson.loads(line[6:])))
            if {"engine", "session"} <= {k for k, _ in seen}:
                return seen
    return seen


async def test_feed_carries_engine_and_session_events(running: Running) -> None:
    async with (
        httpx.AsyncClient(base_url=running.url, timeout=TIMEOUT) as http,
        http.stream("GET", "/v1/events") as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        async with await Client.connect(running.ws + "/v1/stream") as c:
            opened = await c.open()
            seen = await _events(r)
    engine = next(p for k, p in seen if k == "engine")
    assert {"bytes_out_per_s", "ttft_p50_s", "itl_p50_s", "running", "waiting"} <= set(engine)
    assert {"weights_version", "sessions", "ts"} <= set(engine)
    session = next(p for k, p in seen if k == "session")
    assert session["session"] == opened["session"] and session["event"] == "opened"
    for _ in range(100):  # the server notices the client has gone on its own time
        if not running.gateway.feed.subscribers:
            break
        await anyio.sleep(0.05)
    assert running.gateway.feed.subscribers == set()  # the subscriber left with its client


async def test_page_and_static_files(running: Running) -> None:
    async with httpx.AsyncClient(base_url=running.url) as http:
        page = await http.get("/")
        assert page.status_code == 200 and "/static/vendor/uPlot.iife.min.js" in page.text
        for path in ("/static/app.js", "/static/style.css", "/static/vendor/uPlot.min.css"):
            assert (await http.get(path)).status_code == 200, path
        assert (await http.get("/static/nothing.js")).status_code == 404


async def test_feed_forwards_other_services_events_from_nats(tmp_path: Path) -> None:
    with NatsServer(tmp_path / "nats") as server:
        r = serve(GatewayConfig(nats_url=server.url, events_interval_s=0.2))
        try:
            for _ in range(100):  # the gateway connects to the bus in the background
                if r.gateway.nats_state() == 1:
                    break
                await anyio.sleep(0.05)
            nc = await nats.connect(server.url)
            async with (
                httpx.AsyncClient(base_url=r.url, timeout=TIMEOUT) as http,
                http.stream("GET", "/v1/events") as resp,
            ):
                lines = resp.aiter_lines()
                async for line in lines:  # the feed answers once it is subscribed to the bus
                    if line == ": connected":
                        break
                data = orjson.dumps({"namespace": "docs", "documents": 2, "bytes": 10})
                await nc.publish("events.namespace", data)
                await nc.flush()
                kinds: dict[str, int] = {}
                kind = ""
                async for line in lines:
                    if line.startswith("event: "):
                        kind = line[7:]
                        kinds[kind] = kinds.get(kind, 0) + 1
                        assert sum(kinds.values()) < 100, kinds
                    elif line.startswith("data: ") and kind == "namespace":
                        assert orjson.loads(line[6:])["documents"] == 2
                        break
            await nc.close()
            assert kinds.get("namespace") == 1
        finally:
            r.stop()


def test_feed_is_bounded() -> None:
    feed = Feed(queue_size=2, max_subscribers=1)
    feed.publish("session", {"event": "opened"})  # nobody listens: nothing kept
    with feed.subscribe() as q, feed.subscribe() as refused:
        assert q is not None and refused is None
        for i in range(5):
            feed.publish("session", {"n": i})
        assert q.qsize() == 2 and feed.dropped == 3
        assert q.get_nowait().startswith(b"event: session\ndata: ")
    assert feed.subscribers == set()
