"""The training consumer against a real nats-server, as a process: killed with SIGKILL mid-run
and started again, it resumes from its last checkpoint and its consumer position, and every
published document goes into an optimizer step; acks wait for the checkpoint holding the step."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import anyio
import nats
from nats.aio.msg import Msg

from memory.bus import MODEL_UPDATED, Bus
from memory.config import MemoryConfig
from memory.ingest import doc_id, ingest_paths
from memory.reload import MODEL_FILES, decode_notice, fetch_checkpoint, latest_checkpoint
from model import ByteLM
from tests.ingest.conftest import MICRO
from tests.nats_server import NatsServer
from tests.train.conftest import PYTHON, ROOT, corpus

NS = "train"


def trainer(url: str, config: Path, log: Path, *extra: str) -> list[str]:
    return [
        PYTHON, "-m", "memory.train_cli", "--nats-url", url, "--config", str(config),
        "--steps", "400", "--batch-size", "2", "--seq-len", "64", "--segments", "2",
        "--warmup", "2", "--checkpoint-every", "4", "--ack-wait", "2", "--idle-flush", "1",
        "--fetch-batch", "4", "--doc-log", str(log), "--threads", "1", "--log-every", "10",
        "--device", "cpu", *extra,
    ]  # fmt: skip


def records(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.endswith("}")]


def runs(log: Path) -> list[list[dict[str, Any]]]:
    out: list[list[dict[str, Any]]] = []
    for r in records(log):
        if r["ev"] == "resume":
            out.append([])
        out[-1].append(r)
    return out


def mid_interval(log: Path) -> bool:
    """A checkpoint was written and a later step finished a document (stepped, not acked)."""
    recs = records(log)
    ckpts = [r["step"] for r in recs if r["ev"] == "ckpt"]
    return bool(ckpts) and any(
        r["ev"] == "step" and r["step"] > ckpts[-1] and r["docs"] for r in recs
    )


async def test_killed_trainer_resumes_and_loses_no_document(
    tmp_path: Path, nats_server: NatsServer, micro_json: Path
) -> None:
    url, log = nats_server.url, tmp_path / "docs.jsonl"
    first = corpus(tmp_path / "a", 40)
    await ingest_paths(url, [str(tmp_path / "a")], NS, None)

    with (tmp_path / "run1.out").open("w") as out:
        proc = subprocess.Popen(trainer(url, micro_json, log), cwd=ROOT, stdout=out, stderr=out)
        try:
            with anyio.fail_after(60):
                while True:
                    assert proc.poll() is None, (tmp_path / "run1.out").read_text()[-3000:]
                    if mid_interval(log):
                        proc.send_signal(signal.SIGSTOP)  # frozen: the log is final
                        if mid_interval(log):  # no checkpoint slipped in before the stop
                            break
                        proc.send_signal(signal.SIGCONT)
                    await anyio.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # more documents while it is down; then it starts again and runs until the stream is quiet
    second = corpus(tmp_path / "b", 20, offset=40)
    await ingest_paths(url, [str(tmp_path / "b")], NS, None)
    notices: list[int] = []
    nc = await nats.connect(url)

    async def on_notice(msg: Msg) -> None:
        notices.append(decode_notice(msg.data).version)

    sub = await nc.subscribe(MODEL_UPDATED, cb=on_notice)
    try:
        cmd = trainer(url, micro_json, log, "--until-idle", "3")
        done = await anyio.to_thread.run_sync(
            lambda: subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=90)
        )
        assert done.returncode == 0, done.stderr[-3000:]
        bus = await Bus.connect(url, MemoryConfig())
        try:
            latest = await latest_checkpoint(bus)
        finally:
            await bus.close()
        assert latest is not None
        with anyio.fail_after(5):  # the last notice may still be on its way
            while not notices or notices[-1] != latest.version:
                await anyio.sleep(0.02)
    finally:
        await sub.unsubscribe()
        await nc.close()

    run1, run2 = runs(log)
    ckpt1 = [r for r in run1 if r["ev"] == "ckpt"]
    steps1 = [r for r in run1 if r["ev"] == "step"]
    steps2 = [r for r in run2 if r["ev"] == "step"]
    # resumed from the last checkpoint of the killed run: its step and weights version
    assert run2[0]["step"] == ckpt1[-1]["step"] > 0
    assert run2[0]["version"] == len(ckpt1)
    assert steps2[0]["step"] == ckpt1[-1]["step"] + 1
    # acks came only with a checkpoint holding the steps that finished those documents
    for c in ckpt1:
        finished = {tuple(d) for s in steps1 if s["step"] <= c["step"] for d in s["docs"]}
        assert {tuple(d) for d in c["acked"]} <= finished
    # what the killed run stepped after its last checkpoint was not acked: it trained again
    lost = {tuple(d) for s in steps1 if s["step"] > ckpt1[-1]["step"] for d in s["docs"]}
    assert lost and lost <= {tuple(d) for s in steps2 for d in s["docs"]}
    # every published document went into an optimizer step
    published = {doc_id(NS, body) for body in (*first.values(), *second.values())}
    stepped = {d[0] for r in (*steps1, *steps2) for d in r["docs"]}
    assert published <= stepped
    acked = {d[0] for r in (*run1, *run2) if r["ev"] == "ckpt" for d in r["acked"]}
    assert acked == published

    bus = await Bus.connect(url, MemoryConfig())
    try:
        ci = await bus.js.consumer_info("DOCS", "trainer")
        assert (ci.num_pending, ci.num_ack_pending) == (0, 0)
        assert latest.step == steps2[-1]["step"]
        assert notices and notices[-1] == latest.version and notices == sorted(notices)
        path = await fetch_checkpoint(bus, latest.object, tmp_path / "ckpt", MODEL_FILES)
        model = ByteLM.load(str(path))
        assert model.config.compatible(MICRO)
    finally:
        await bus.close()
