"""End to end: `bwr up --train` plus `bwr ingest` of a text corpus. The trainer beside the engine
learns from the ingested documents (its loss falls), writes checkpoints to the bus, the engine
reloads them between steps (the weights version in /v1/info moves) and sessions keep generating
with the new weights; the namespace reports what it ingested."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.gateway.conftest import Client, start_up, stop_up, train_flags

KEY = "train-secret"
CORPUS = Path(__file__).parents[1] / "data" / "english.txt"
pytestmark = pytest.mark.slow


async def test_up_train_ingest_reload(tmp_path: Path) -> None:
    up = start_up(tmp_path, "--api-key", KEY, *train_flags(log_every=5, steps=60))
    try:
        async with httpx.AsyncClient(base_url=up.url, headers=up.headers, timeout=30) as http:
            before = (await http.get("/v1/info")).json()["weights_version"]
            docs = tmp_path / "docs"
            docs.mkdir()
            text = CORPUS.read_text()
            for i in range(8):  # a few documents, each the corpus from another offset
                (docs / f"doc{i}.txt").write_text(text[i * 3000 :] + text[: i * 3000])
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "gateway.cli",
                    "ingest",
                    str(docs),
                    "--namespace",
                    "books",
                    "--nats-url",
                    up.nats_url,
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, done.stderr
            deadline = time.monotonic() + 150
            info = {}
            while time.monotonic() < deadline:
                info = (await http.get("/v1/info")).json()
                if info["weights_version"] >= before + 2:
                    break
                await _sleep(0.5)
            assert info["weights_version"] >= before + 2, (
                tmp_path / "data" / "trainer.log"
            ).read_text()[-3000:]
            ns: dict[str, int] = {}
            while time.monotonic() < deadline + 60:  # the ingest worker prefills every document
                ns = (await http.get("/v1/namespaces/books")).json()
                if ns["documents"] == 8:
                    break
                await _sleep(0.5)
            assert ns["documents"] == 8 and ns["bytes"] == 8 * len(text.encode()), ns
        async with await Client.connect(up.ws + "/v1/stream", up.headers) as c:
            await c.open()
            _, turn = await c.turn("In the beginning", max_bytes=16, seed=1)
            assert turn["usage"]["input_bytes"] == 16
        losses = [
            float(x)
            for x in re.findall(r"loss (\d+\.\d+)", (tmp_path / "data" / "trainer.log").read_text())
        ]
        assert len(losses) >= 3 and losses[-1] < losses[0] - 0.5, losses
    finally:
        stop_up(up)


async def _sleep(s: float) -> None:
    import asyncio

    await asyncio.sleep(s)
