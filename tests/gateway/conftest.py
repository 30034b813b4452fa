"""Gateway fixtures: a real uvicorn server on a free loopback port, run in a thread of the test
process (fast: no second torch import), and a real `bwr up` subprocess for the end-to-end tests.

Both speak over real sockets; tests use websockets and httpx like any client would.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import uvicorn
from starlette.applications import Starlette

from gateway.app import Gateway, Hooks, create_app
from gateway.config import GatewayConfig
from gateway.serve import read_banner
from model import ByteLM, ModelConfig

TIMEOUT = 20.0  # seconds any single wait in these tests may take


def tiny() -> ByteLM:
    torch.manual_seed(0)
    return ByteLM(ModelConfig.named("tiny")).eval()


@dataclass
class Running:
    url: str  # http://127.0.0.1:PORT
    app: Starlette
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def ws(self) -> str:
        return self.url.replace("http://", "ws://")

    @property
    def gateway(self) -> Gateway:
        gw: Gateway = self.app.state.gateway
        return gw

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "the test server did not stop"


def serve(config: GatewayConfig, hooks: Hooks | None = None) -> Running:
    """Start the gateway app under uvicorn in a thread; returns once it accepts connections."""
    app = create_app(
        config, tiny(), hooks=hooks, info={"model": "tiny", "device": "cpu", "version": "test"}
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    cfg = uvicorn.Config(
        app,
        lifespan="on",
        ws="websockets-sansio",
        loop="asyncio",
        log_level="warning",
        ws_max_size=config.ws_max_size,
        ws_per_message_deflate=False,
        timeout_graceful_shutdown=3,
    )
    server = uvicorn.Server(cfg)

    def run() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            sock.close()

    thread = threading.Thread(target=run, name="test-gateway", daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test gateway did not start")
        time.sleep(0.01)
    return Running(f"http://127.0.0.1:{port}", app, server, thread)


@pytest.fixture(scope="module")
def server() -> Iterator[Running]:
    """A gateway with no key and default limits (module-wide)."""
    running = serve(GatewayConfig(detach_timeout_s=30.0, max_sessions=16, max_sessions_per_key=16))
    yield running
    running.stop()


# ----- a real `bwr up` -----


@dataclass
class Up:
    proc: subprocess.Popen[str]
    url: str
    nats_url: str
    nats_pid: int
    api_key: str
    banner: list[str]

    @property
    def ws(self) -> str:
        return self.url.replace("http://", "ws://")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


def train_flags(*, log_every: int, steps: int) -> tuple[str, ...]:
    """`bwr up` flags for a trainer beside the engine, small enough for the CPU: a checkpoint
    (hot-reloaded) every 10 steps, sequences of 128 bytes, a quiet stream flushed after 0.5 s."""
    return (
        "--train",
        "--train-every",
        "10",
        "--train-arg=--batch-size=4",
        "--train-arg=--seq-len=128",
        "--train-arg=--idle-flush=0.5",
        f"--train-arg=--log-every={log_every}",
        "--train-arg=--lr=3e-3",
        f"--train-arg=--steps={steps}",
    )


def start_up(tmp: Path, *args: str, env: dict[str, str] | None = None) -> Up:
    cmd = [
        sys.executable,
        "-m",
        "gateway.cli",
        "up",
        "--port",
        "0",
        "--model",
        "tiny",
        "--device",
        "cpu",
        "--data-dir",
        str(tmp / "data"),
        *args,
    ]
    with open(tmp / "up.log", "w") as log:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, **(env or {})}
        )
    assert proc.stdout is not None
    banner = read_banner(proc.stdout, 60)
    text = "\n".join(banner)
    if "listening on" not in text:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        raise RuntimeError(f"bwr up did not start:\n{text}\n{(tmp / 'up.log').read_text()}")
    url = banner[0].rsplit(" ", 1)[-1]
    nats_line = next(x for x in banner if x.strip().startswith("nats"))
    nats_url = nats_line.split()[1]
    nats_pid = int(nats_line.split("pid ")[1].split(",")[0]) if "pid " in nats_line else -1
    key = next((a for i, a in enumerate(args) if i and args[i - 1] == "--api-key"), "")
    return Up(proc, url, nats_url, nats_pid, key, banner)


def stop_up(up: Up, timeout: float = 30.0) -> int:
    if up.proc.poll() is None:
        up.proc.terminate()
    try:
        code = up.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        up.proc.kill()
        code = up.proc.wait()
    assert up.proc.stdout is not None
    up.proc.stdout.close()
    return code


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def frames(messages: list[str | bytes]) -> list[dict[str, Any]]:
    return [json.loads(m) for m in messages]


class Client:
    """A WebSocket client speaking the protocol, with a timeout on every wait."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws

    @classmethod
    async def connect(cls, url: str, headers: dict[str, str] | None = None) -> Client:
        import websockets

        return cls(
            await websockets.connect(
                url, additional_headers=headers, max_size=None, open_timeout=TIMEOUT
            )
        )

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        await self.ws.send(frame if isinstance(frame, str | bytes) else json.dumps(frame))

    async def recv(self) -> dict[str, Any]:
        import asyncio

        out: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), TIMEOUT))
        return out

    async def open(self, **fields: Any) -> dict[str, Any]:
        await self.send({"type": "open", **fields})
        frame = await self.recv()
        assert frame["type"] == "opened", frame
        return frame

    async def until_done(self) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
        """Read to the next done -> (the text of its deltas, the done frame, every frame)."""
        seen, parts = [], []
        while True:
            frame = await self.recv()
            seen.append(frame)
            if frame["type"] == "delta":
                parts.append(frame.get("text", ""))
            elif frame["type"] == "done":
                return "".join(parts), frame, seen
            elif frame["type"] == "error":
                raise AssertionError(f"unexpected error frame {frame}")

    async def turn(self, text: str, **fields: Any) -> tuple[str, dict[str, Any]]:
        await self.send({"type": "input", "text": text, **fields})
        out, done, _ = await self.until_done()
        return out, done

    async def close(self) -> None:
        await self.ws.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
