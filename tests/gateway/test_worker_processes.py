"""`bwr up --worker-processes 1`: consolidation runs in a `bwr worker` process the gateway starts
(no worker in the gateway's own interpreter), a session's memory still fills, and stopping the
gateway stops the worker."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import httpx
import pytest

from tests.gateway.conftest import Client, pid_alive, start_up, stop_up

pytestmark = pytest.mark.slow


async def test_consolidation_in_a_worker_process(tmp_path: Path) -> None:
    up = start_up(tmp_path, "--api-key", "worker-secret", "--worker-processes", "1")
    try:
        line = next(x for x in up.banner if x.strip().startswith("memory"))
        assert "0 in this process, 1 processes" in line, line
        match = re.search(r"pids (\d+)", line)
        assert match is not None
        worker_pid = int(match.group(1))
        assert pid_alive(worker_pid)
        async with await Client.connect(up.ws + "/v1/stream", up.headers) as c:
            opened = await c.open()
            text = "The worker compresses what the engine closes. " * 20  # 940 bytes: 7 segments
            _, done = await c.turn(text, max_bytes=4)
            assert done["usage"]["input_bytes"] == len(text)
            sid, token = opened["session"], opened["token"]
            memory: dict[str, object] = {}
            async with httpx.AsyncClient(base_url=up.url, headers=up.headers) as http:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    memory = (
                        await http.get(f"/v1/sessions/{sid}/memory", params={"token": token})
                    ).json()
                    if isinstance(memory.get("slots"), int) and memory["slots"] > 0:
                        break
                    await asyncio.sleep(0.25)
            assert isinstance(memory.get("slots"), int) and memory["slots"] > 0, memory
        log = (tmp_path / "data" / "worker-0" / "worker.log").read_text()
        assert "consolidation workers" in log, log[-2000:]
    finally:
        assert stop_up(up) == 0
    assert not pid_alive(worker_pid)
