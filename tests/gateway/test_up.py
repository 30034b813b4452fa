"""End to end against a real `bwr up` subprocess (free port, embedded nats-server, tiny model on
the CPU, an API key): a streamed session, resume by token, SSE read by httpx, metrics moving,
NATS events, `bwr chat`, the refusal to bind a public address without a key, and a SIGTERM that
drains and stops everything the process started.

Resuming after the gateway restarts (from session snapshots) is in test_restart.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway.conftest import Client, Up, pid_alive, start_up, stop_up

KEY = "e2e-secret"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    running = start_up(tmp_path_factory.mktemp("up"), "--api-key", KEY, "--max-sessions", "8")
    yield running
    stop_up(running)


def values(text: str) -> dict[str, float]:
    return {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if not s.labels
    }


async def test_stream_a_session(up: Up) -> None:
    assert any("dashboard" in line for line in up.banner)
    async with await Client.connect(up.ws + "/v1/stream", up.headers) as c:
        opened = await c.open(sampling={"seed": 3})
        await c.send({"type": "input", "text": "Hello, world", "max_bytes": 32})
        _, done, seen = await c.until_done()
        assert done["usage"]["input_bytes"] == 12 and done["reason"] in ("length", "eos")
        assert [f["type"] for f in seen][-1] == "done" and opened["detach_timeout_s"] > 0


async def test_resume_by_token(up: Up) -> None:
    c = await Client.connect(up.ws + "/v1/stream", up.headers)
    opened = await c.open()
    _, first = await c.turn("remember this", max_bytes=5)
    await c.close()
    sid, token = opened["session"], opened["token"]
    async with await Client.connect(
        f"{up.ws}/v1/sessions/{sid}/stream?token={token}", up.headers
    ) as r:
        again = await r.open()
        assert again["resumed"] and again["context_bytes"] == first["usage"]["context_bytes"]
        _, done = await r.turn(" and this", max_bytes=5)
        assert (
            done["usage"]["context_bytes"]
            == first["usage"]["context_bytes"] + 9 + done["usage"]["output_bytes"]
        )
    async with httpx.AsyncClient(base_url=up.url, headers=up.headers) as http:
        assert (
            await http.delete(f"/v1/sessions/{sid}", params={"token": token})
        ).status_code == 200


async def test_sse_with_a_plain_http_client(up: Up) -> None:
    chunks: list[Any] = []
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16, "stream": True}
    async with (
        httpx.AsyncClient(base_url=up.url, headers=up.headers) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    assert chunks[-1] == "[DONE]" and chunks[-2]["choices"][0]["finish_reason"] in (
        "length",
        "stop",
    )


async def test_auth_and_metrics(up: Up) -> None:
    async with httpx.AsyncClient(base_url=up.url) as http:
        assert (await http.get("/metrics")).status_code == 401
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).json()["nats"] == "connected"
        before = values((await http.get("/metrics", headers=up.headers)).text)
        r = await http.post(
            "/v1/completions",
            headers=up.headers,
            json={"prompt": "count", "max_tokens": 12, "ignore_eos": True},
        )
        assert r.status_code == 200
        after = values((await http.get("/metrics", headers=up.headers)).text)
        info = (await http.get("/v1/info", headers=up.headers)).json()
    assert info["nats_url"] == up.nats_url and info["model"] == "tiny" and info["random_weights"]
    for name in (
        "bwr:time_to_first_token_seconds_count",
        "bwr:request_queue_time_seconds_count",
        "bwr:output_bytes_total",
        "bwr:completion_requests_total",
    ):
        assert after[name] > before.get(name, 0), name
    assert (
        after["bwr:nats_connected"] == 1
        and "bwr:num_requests_running" in after
        and "bwr:num_requests_waiting" in after
    )


async def test_engine_events_on_nats(up: Up) -> None:
    got: list[str] = []
    nc = await nats.connect(up.nats_url)

    async def on_event(msg: Any) -> None:
        got.append(msg.subject)

    await nc.subscribe("events.>", cb=on_event)
    for _ in range(150):
        if "events.engine" in got:
            break
        await asyncio.sleep(0.02)
    await nc.close()
    assert "events.engine" in got


def test_chat_client(up: Up) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "chat", "--url", up.ws, "--max-bytes", "8"],
        input="hello there\n",
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "BWR_API_KEY": KEY},
    )
    assert run.returncode == 0, run.stderr
    assert "session" in run.stderr and (
        "[length" in run.stderr or "[stop" in run.stderr or "[eos" in run.stderr
    ), run.stderr


def test_refuses_public_bind_without_key(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "BWR_API_KEY"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "up",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert run.returncode == 2 and "refusing to bind 0.0.0.0 without an API key" in run.stderr
    assert not (tmp_path / "nats").exists()  # nothing was started


def test_sigterm_drains_and_stops_everything(up: Up) -> None:
    """Runs last in this module: SIGTERM ends the shared server."""
    assert pid_alive(up.nats_pid)
    up.proc.send_signal(signal.SIGTERM)
    assert stop_up(up) == 0
    assert not pid_alive(up.nats_pid)
