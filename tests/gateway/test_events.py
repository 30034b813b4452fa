"""The embedded nats-server manager and the gateway's NATS events: published while NATS is up,
serving goes on while it is away (/readyz and /metrics say so), and the connection comes back."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from gateway.config import GatewayConfig
from gateway.natsd import NatsServer, NatsServerError
from tests.gateway.conftest import Client, pid_alive, serve


def test_nats_server_process(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats")
    with server as url:
        assert (
            url.startswith("nats://127.0.0.1:") and server.pid is not None and pid_alive(server.pid)
        )
        pid = server.pid
    assert not pid_alive(pid) and server.pid is None
    assert server.stop() is None  # stopping twice is harmless
    taken = NatsServer(tmp_path / "again", port=server.port)
    with taken, pytest.raises(NatsServerError):  # the port is free again, then taken
        NatsServer(tmp_path / "clash", port=server.port, start_timeout=2).start()


async def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def test_events_and_nats_outage(tmp_path: Path) -> None:
    natsd = NatsServer(tmp_path / "nats")
    url = natsd.start()
    running = serve(GatewayConfig(nats_url=url, events_interval_s=0.2))
    gw = running.gateway
    try:
        await wait_for(lambda: gw.nats_state() == 1)
        got: list[tuple[str, dict[str, Any]]] = []
        nc = await nats.connect(url)

        async def on_event(msg: Any) -> None:
            got.append((msg.subject, json.loads(msg.data)))

        await nc.subscribe("events.>", cb=on_event)
        async with await Client.connect(running.ws + "/v1/stream") as c:
            sid = (await c.open())["session"]
            await c.turn("hi", max_bytes=4)
        await wait_for(lambda: any(s == "events.engine" for s, _ in got))
        await wait_for(
            lambda: any(
                s == "events.session" and e.get("session") == sid and e["event"] == "detached"
                for s, e in got
            )
        )
        assert any(
            s == "events.session" and e["event"] == "opened" and e["session"] == sid for s, e in got
        )
        engine = next(e for s, e in got if s == "events.engine")
        assert {"bytes_out_per_s", "sessions", "running", "waiting"} <= set(engine)
        await nc.close()

        natsd.stop()  # NATS goes away: the gateway keeps serving and says so
        await wait_for(lambda: gw.nats_state() == 0)
        async with httpx.AsyncClient(base_url=running.url) as http:
            ready = await http.get("/readyz")
            assert ready.status_code == 200 and ready.json()["nats"] == "disconnected"
            assert "bwr:nats_connected 0.0" in (await http.get("/metrics")).text
        async with await Client.connect(running.ws + "/v1/stream") as c:
            await c.open()
            _, done = await c.turn("still serving", max_bytes=4)
            assert done["reason"] in ("length", "eos")

        natsd.start()  # same port and store: the client reconnects by itself
        await wait_for(lambda: gw.nats_state() == 1, timeout=15)
        nc = await nats.connect(url)
        got.clear()
        await nc.subscribe("events.>", cb=on_event)
        await wait_for(lambda: any(s == "events.engine" for s, _ in got))
        await nc.close()
    finally:
        running.stop()
        natsd.stop()


def test_nats_required_makes_readiness_fail(tmp_path: Path) -> None:
    running = serve(GatewayConfig(nats_url="nats://127.0.0.1:9", nats_required=True))
    try:
        r = httpx.get(running.url + "/readyz")
        assert r.status_code == 503 and r.json()["nats"] == "disconnected"
        assert httpx.get(running.url + "/healthz").status_code == 200
    finally:
        running.stop()
