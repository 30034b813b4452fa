"""Smoke load test: a real `bwr up` (tiny, CPU) under 20 locust users for 20 s, WebSocket
sessions, OpenAI SSE completions and NATS ingestion mixed. Fails on any failed request, on a
kind of request that never completed, and unless documents acked == DOCS stream count ==
documents the ingest worker of `bwr up` applied.

It runs loadtest/run.py as a subprocess: locust's gevent patching stays out of this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
USERS, SECONDS = 20, 20


@pytest.mark.slow
def test_smoke(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "BWR_WS_WEIGHT": "16",
        "BWR_SSE_WEIGHT": "3",
        "BWR_NATS_WEIGHT": "1",
        "BWR_MAX_BYTES": "32",
        "BWR_TURN_BYTES": "64",
        "BWR_NATS_INFLIGHT": "2",
        "BWR_DOC_RATE": "2",  # the ingest worker applies a few documents/s on a CPU
        "BWR_DOC_BYTES": "512",
    }
    cmd = [sys.executable, "-m", "loadtest.run", "--users", str(USERS), "--spawn-rate", "20",
           "--duration", str(SECONDS), "--out", str(tmp_path)]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    summary_file = tmp_path / "summary.json"
    assert summary_file.exists(), f"no summary\n{r.stdout}\n{r.stderr}"
    s = json.loads(summary_file.read_text())
    detail = f"{r.stdout}\n{(tmp_path / 'locust.log').read_text()[-3000:]}"
    assert s["requests"] > 0, detail
    assert s["failures"] == 0, detail
    for name in ("WS open", "WS ttft", "WS inter-token", "WS turn", "SSE completion",
                 "NATS publish"):  # fmt: skip
        assert s["stats"].get(name, {}).get("requests", 0) > 0, f"no {name}\n{detail}"
    ingest = s["ingest"]
    assert ingest["published_acked"] > 0
    assert ingest["published_acked"] == ingest["stream_messages"] == ingest["ingested"], ingest
    assert s["server_peak_rss_bytes"] > 0
    assert r.returncode == 0, detail
    for report in ("report.html", "report_stats.csv"):
        assert (tmp_path / report).exists()
