"""Data parallelism on the CPU: two processes under torchrun with the gloo backend train on
distinct documents and end with equal weights (rank 0's start, averaged gradients), reading a
file or sharing the DOCS stream's durable consumer."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import anyio
import torch
from safetensors.torch import load_file

from memory.bus import Bus
from memory.config import MemoryConfig
from memory.ingest import doc_id, ingest_paths
from tests.nats_server import NatsServer
from tests.train.conftest import PYTHON, ROOT, corpus


def test_two_ranks_see_distinct_documents_and_stay_equal(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(ROOT / "tests" / "train" / "ddp_runner.py"), str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    seen0, seen1 = (set(r["seen"]) for r in ranks)
    assert seen0 and seen1 and not seen0 & seen1
    assert ranks[0]["losses"] == ranks[1]["losses"]  # logged as the mean over the ranks

    init0, init1 = (load_file(str(tmp_path / f"init{r}.safetensors")) for r in (0, 1))
    final0, final1 = (load_file(str(tmp_path / f"final{r}.safetensors")) for r in (0, 1))
    assert any(not torch.equal(init0[k], init1[k]) for k in init0)  # they started apart
    for k in final0:
        torch.testing.assert_close(final0[k], final1[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(final0[k], init0[k]) for k in final0)  # and trained


async def test_two_ranks_share_the_stream_and_miss_nothing(
    tmp_path: Path, nats_server: NatsServer, micro_json: Path
) -> None:
    """The DOCS consumer under torchrun: each message goes to one rank, every document is
    stepped and acked once, by the rank that holds it."""
    docs = corpus(tmp_path / "docs", 40)
    await ingest_paths(nats_server.url, [str(tmp_path / "docs")], "ddp", None)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "docs.jsonl"
    cmd = [
        PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "memory.train_cli", "--nats-url", nats_server.url, "--config", str(micro_json),
        "--steps", "100", "--batch-size", "2", "--seq-len", "64", "--segments", "2",
        "--warmup", "2", "--checkpoint-every", "5", "--ack-wait", "2", "--idle-flush", "1",
        "--until-idle", "2", "--fetch-batch", "4", "--doc-log", str(log), "--threads", "1",
        "--device", "cpu",
    ]  # fmt: skip
    done = await anyio.to_thread.run_sync(
        lambda: subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    )
    assert done.returncode == 0, done.stderr[-4000:]
    stepped, acked = [], []
    for r in (0, 1):
        recs = [json.loads(line) for line in Path(f"{log}.{r}").read_text().splitlines()]
        stepped.append({d[0] for x in recs if x["ev"] == "step" for d in x["docs"]})
        acked.append([d[0] for x in recs if x["ev"] == "ckpt" for d in x["acked"]])
        assert [x["step"] for x in recs if x["ev"] == "step"] == list(
            range(1, recs[-1]["step"] + 1)
        )
    assert stepped[0] and stepped[1] and not stepped[0] & stepped[1]
    assert stepped[0] | stepped[1] == {doc_id("ddp", b) for b in docs.values()}
    assert sorted(acked[0] + acked[1]) == sorted(stepped[0] | stepped[1])  # each acked once
    bus = await Bus.connect(nats_server.url, MemoryConfig())
    try:
        ci = await bus.js.consumer_info("DOCS", "trainer")
        assert (ci.num_pending, ci.num_ack_pending) == (0, 0)
    finally:
        await bus.close()
