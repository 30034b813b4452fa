"""The training consumer: documents from the DOCS stream into optimizer steps, checkpoints into
the `checkpoints` object store, `model.updated` out.

Acks and resume. A document message is acked only once every byte of it went into an optimizer
step *and* a checkpoint holding that step is stored and named by ckpt.latest. Killed anywhere, the
trainer restarts from ckpt.latest (weights, optimizer, step, weights version) and from its durable
consumer `trainer`: the messages it had not acked come back (ack_wait after it died) and train
again. An acked document is never lost; an unacked one may train twice. Held messages are kept
alive with in-progress acks, so ack_wait can stay short; held messages are bounded by
max_ack_pending (near it, the trainer checkpoints and acks early, flushing a padded tail if it
must). A stream gone quiet has its tail trained padded (PAD targets carry no loss) after
idle_flush_s, so every document reaches a step.

DDP (torchrun). Every rank pulls from the same durable consumer: JetStream hands each message to
one rank, so the ranks train on distinct documents; each rank acks only its own messages, and
only after rank 0 stored the checkpoint and said so through a collective. Every decision (step,
flush, checkpoint, stop) is a sum over the ranks, so they never diverge.

trainer.py owns that protocol and the pull loop. It does not own the optimisation
(model/train.py), the checkpoint layout (memory/reload.py) or the streams (memory/bus.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import anyio
import nats.errors
import orjson
import torch
from nats.aio.msg import Msg

from memory.bus import Bus
from memory.config import MemoryConfig
from memory.ingest import parse_doc
from memory.reload import (
    MODEL_FILES,
    TRAINER_STATE,
    ModelUpdated,
    announce,
    checkpoint_name,
    delete_checkpoint,
    fetch_checkpoint,
    latest_pointer,
    model_files,
    new_notice,
    put_checkpoint,
)
from memory.worker import TRANSIENT
from model.checkpoint import load_checkpoint
from model.distributed import Dist
from model.lm import ByteLM
from model.train import Packer, Stage, TrainConfig, TrainLoop

log = logging.getLogger("bwr.trainer")
R = TypeVar("R")


@dataclass(frozen=True)
class TrainerConfig:
    consumer: str = "trainer"  # durable pull consumer on DOCS
    checkpoint_every: int = 200  # optimizer steps between checkpoints (acks happen at them)
    keep_checkpoints: int = 2  # trainer checkpoints kept in the store
    ack_wait_s: float = 30.0  # a dead trainer's unacked messages come back after this
    max_ack_pending: int = 4096  # messages held unacked, all ranks together
    fetch_batch: int = 64  # most messages one pull asks for
    fetch_timeout_s: float = 0.5  # longest one pull waits
    idle_flush_s: float = 5.0  # a stream quiet this long has its held tail trained padded
    until_idle_s: float = 0.0  # >0: exit once quiet this long with every message acked
    max_steps: int = 0  # stop at this step (0: never; past TrainConfig.steps lr stays at its floor)
    save_dtype: str = "float32"  # checkpoint weights: float32 or bfloat16
    local_dir: str = ""  # also write each checkpoint's model files under this directory
    doc_log: str = ""  # JSON lines of what each step finished and each checkpoint acked

    def __post_init__(self) -> None:
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1 or self.max_ack_pending < 2:
            raise ValueError("checkpoint_every >= 1, keep_checkpoints >= 1, max_ack_pending >= 2")
        if self.save_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"save_dtype {self.save_dtype!r}: float32 or bfloat16")


@dataclass
class Held:
    """A message this rank holds unacked: in the packer, or stepped and awaiting a checkpoint."""

    msg: Msg
    seq: int  # stream sequence
    doc: str  # document id
    chunk: int


class NatsTrainer:
    """One rank's trainer: its bus connection, its pull subscription and its held messages."""

    def __init__(
        self,
        bus: Bus,
        loop: TrainLoop,
        cfg: TrainerConfig,
        *,
        version: int = 0,
        progress: IO[str] | None = None,
    ) -> None:
        self.bus, self.loop, self.cfg = bus, loop, cfg
        self.model: ByteLM = loop.model
        self.dist = loop.dist
        self.version = version  # weights version of the last checkpoint
        self.packer: Packer[Held] = Packer()
        self.held: dict[int, Held] = {}  # stream seq -> message, everything unacked here
        self.stepped: list[Held] = []  # finished by steps since the last checkpoint
        self.since_ckpt = 0  # steps since the last checkpoint (the same on every rank)
        self.cap = max(1, cfg.max_ack_pending // self.dist.world)  # this rank's share
        self.stopping = False
        self.progress = progress if self.dist.is_main else None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="bwr-train")
        self._doc_log = _open_log(cfg.doc_log, self.dist)
        self._mark = (time.perf_counter(), loop.bytes)

    # ----- the torch thread: steps and collectives run there, one at a time, in order -----

    async def _torch(self, fn: Callable[..., R], *args: Any) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _sum(self, values: list[float]) -> list[float]:
        return await self._torch(self.dist.sum, values)

    # ----- the loop -----

    async def run(self) -> int:
        """Train until stopped, max_steps, or until_idle; -> optimizer steps taken in all."""
        js = self.bus.js
        sub = await js.pull_subscribe_bind(
            durable=self.cfg.consumer, stream=self.bus.config.docs_stream, pending_msgs_limit=-1
        )
        self._log({"ev": "resume", "step": self.loop.step, "version": self.version})
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._keep_alive)
                await self._loop(sub)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                if not self.bus.nc.is_closed:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
                self._executor.shutdown(wait=True)
                if self._doc_log is not None:
                    self._doc_log.close()
        return self.loop.step

    async def _loop(self, sub: Any) -> None:
        cfg, world = self.cfg, self.dist.world
        quiet_since: float | None = None
        while True:
            stage = self.loop.stage()
            need = self.loop.cfg.grad_accum * stage.batch_bytes
            got = await self._pull(sub, need)
            now = time.monotonic()
            if got or self.packer.pending >= need:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            quiet_for = 0.0 if quiet_since is None else now - quiet_since
            high = len(self.held) >= 0.75 * self.cap
            idle_done = cfg.until_idle_s > 0 and quiet_for >= cfg.until_idle_s and not self.held
            ready = self.packer.pending >= need
            flags = [
                float(not ready),
                float(self.packer.pending > 0),
                float(ready or quiet_for >= cfg.idle_flush_s),  # nothing more to wait for here
                float(self.stopping),
                float(idle_done),
                float(high),
            ]
            not_ready, with_data, quiet, stop, idle, n_high = await self._sum(flags)
            at_max = cfg.max_steps > 0 and self.loop.step >= cfg.max_steps
            go = stop == 0 and not at_max
            flushed = stepped = False
            if go and not_ready == 0:
                stepped = await self._step(stage, padded=False)
            elif go and with_data > 0 and (quiet == world or n_high > 0):
                stepped = flushed = await self._step(stage, padded=True)
            at_max = cfg.max_steps > 0 and self.loop.step >= cfg.max_steps
            ending = stop > 0 or idle == world or at_max
            due = stepped and (self.loop.step % cfg.checkpoint_every == 0 or flushed)
            if self.since_ckpt > 0 and (due or n_high > 0 or ending):
                await self._checkpoint()
            if ending:
                return

    async def _pull(self, sub: Any, need: int) -> int:
        """Fetch until the packer holds `need` ids, a pull comes back empty, or the share of
        max_ack_pending is held. -> messages received."""
        got = 0
        while self.packer.pending < need and len(self.held) < self.cap:
            batch = min(self.cfg.fetch_batch, self.cap - len(self.held))
            try:
                msgs = await sub.fetch(batch, timeout=self.cfg.fetch_timeout_s)
            except nats.errors.TimeoutError:
                break
            except TRANSIENT as e:  # the server is away: the client reconnects on its own
                log.info("fetch: %s", type(e).__name__)
                await anyio.sleep(self.cfg.fetch_timeout_s)
                break
            if not msgs:  # a status reply (e.g. a stale request's timeout): nothing now
                await anyio.sleep(min(0.05, self.cfg.fetch_timeout_s))
                break
            for msg in msgs:
                got += 1
                self._hold(msg)
        return got

    def _hold(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        if seq in self.held:  # redelivered while held (the loop stalled past ack_wait)
            self.held[seq].msg = msg
            return
        meta = parse_doc(msg.headers, msg.data)
        held = Held(msg, seq, meta.doc, meta.chunk)
        self.held[seq] = held
        self.packer.add(msg.data, held, eos=meta.last or not msg.data)

    async def _step(self, stage: Stage, *, padded: bool) -> bool:
        micro, finished = [], []
        for _ in range(self.loop.cfg.grad_accum):
            rows, cols = stage.batch_size, stage.seq_len + 1
            take = self.packer.take_padded if padded else self.packer.take
            batch, done = take(rows, cols)
            micro.append(batch)
            finished.extend(done)
        loss = await self._torch(self.loop.run_step, micro, stage.segments)
        self.stepped.extend(finished)
        self.since_ckpt += 1
        step = self.loop.step
        self._log({"ev": "step", "step": step, "docs": [[h.doc, h.chunk] for h in finished]})
        if step % self.loop.cfg.log_every == 0:
            loss = await self._torch(self.loop.mean_over_ranks, loss)
            report = self._report(step, loss, stage)
            if self.dist.is_main:  # the dashboard's loss curve: best effort, never blocks a step
                with contextlib.suppress(Exception):
                    await self.bus.publish_event("train", orjson.dumps(report))
        return True

    def _report(self, step: int, loss: float, stage: Stage) -> dict[str, Any]:
        """Print the progress line (rank 0) -> the same figures for `events.train`."""
        now = time.perf_counter()
        t, b = self._mark
        rate = (self.loop.bytes - b) / max(now - t, 1e-9)
        self._mark = (now, self.loop.bytes)
        mfu = self.loop.mfu(rate)
        report: dict[str, Any] = {
            "ts": time.time(),
            "step": step,
            "loss": loss,
            "lr": self.loop.lr(),
            "bytes_per_s": rate,
            "mfu": mfu,
            "seq_len": stage.seq_len,
            "segments": stage.segments,
            "held": len(self.held),
            "weights_version": self.version,
        }
        if self.progress is not None:
            line = (
                f"step {step:>7}  loss {loss:.4f}  lr {report['lr']:.2e}  {rate:>12,.0f} B/s"
                + (f"  MFU {100 * mfu:4.1f}%" if mfu else "")
                + f"  seq {stage.seq_len}x{stage.segments}  held {len(self.held)}"
                + f"  ckpt v{self.version}"
            )
            print(line, file=self.progress, flush=True)
        return report

    # ----- checkpoints and acks -----

    async def _checkpoint(self) -> None:
        """Rank 0 stores the checkpoint and announces it; then every rank acks what it stepped."""
        ok = 0.0
        if self.dist.is_main:
            try:
                await self._write()
                ok = 1.0
            except Exception:
                log.exception(
                    "checkpoint at step %d failed; acks wait for the next", self.loop.step
                )
        if (await self._sum([ok]))[0] == 0:
            return
        if not self.dist.is_main:
            self.version += 1
        acked, self.stepped = self.stepped, []
        for h in acked:
            self.held.pop(h.seq, None)
            with contextlib.suppress(*TRANSIENT):  # a lost ack: the message trains again
                await h.msg.ack()
        self.since_ckpt = 0
        self._log(
            {"ev": "ckpt", "step": self.loop.step, "acked": [[h.doc, h.chunk] for h in acked]}
        )

    async def _write(self) -> ModelUpdated:
        step, version = self.loop.step, self.version + 1
        dtype = torch.bfloat16 if self.cfg.save_dtype == "bfloat16" else torch.float32
        extra: dict[str, object] = {"step": step, "weights_version": version}
        files = await self._torch(lambda: model_files(self.model, dtype=dtype, extra=extra))
        state = await self._torch(self._trainer_state, version)
        name = checkpoint_name(step)
        await put_checkpoint(self.bus, name, {**files, TRAINER_STATE: state})
        old, _ = await latest_pointer(self.bus)
        older = () if old is None else (*old.history, old.latest.object)
        keep_old = self.cfg.keep_checkpoints - 1
        history = older[-keep_old:] if keep_old > 0 else ()
        nbytes = sum(len(d) for d in files.values())
        notice = new_notice(name, self.model, step, version, nbytes)
        await announce(self.bus, notice, history)
        self.version = version
        for gone in older:
            if gone not in history:
                await delete_checkpoint(self.bus, gone, (*MODEL_FILES, TRAINER_STATE))
        if self.cfg.local_dir:
            out = Path(self.cfg.local_dir) / name
            out.mkdir(parents=True, exist_ok=True)
            for fname, data in files.items():
                (out / fname).write_bytes(data)
        log.info("checkpoint %s: step %d, weights version %d", name, step, version)
        return notice

    def _trainer_state(self, version: int) -> bytes:
        buf = io.BytesIO()
        torch.save({"loop": self.loop.state_dict(), "version": version}, buf)
        return buf.getvalue()

    async def _keep_alive(self) -> None:
        """Tell JetStream every held message is still being worked on, well within ack_wait."""
        while True:
            await anyio.sleep(self.cfg.ack_wait_s / 3)
            for h in list(self.held.values()):
                with contextlib.suppress(*TRANSIENT):
                    await h.msg.in_progress()

    def _log(self, record: dict[str, Any]) -> None:
        if self._doc_log is not None:
            self._doc_log.write(json.dumps(record) + "\n")
            self._doc_log.flush()


def _open_log(path: str, dist: Dist) -> IO[str] | None:
    if not path:
        return None
    p = Path(path if dist.world == 1 else f"{path}.{dist.rank}")
    p.parent.mkdir(parents=True, exist_ok=True)
    return p.open("a")


# ----- set-up: the consumer, resume, the whole run -----


async def ensure_consumer(bus: Bus, cfg: TrainerConfig) -> None:
    """Create (or update) the durable pull consumer the trainer reads DOCS through."""
    await bus.docs_consumer(cfg.consumer, cfg.ack_wait_s, cfg.max_ack_pending)


async def resume(bus: Bus, device: torch.device) -> tuple[ByteLM, dict[str, Any]] | None:
    """The newest trainer checkpoint in the store: (model, trainer state), or None."""
    ptr, _ = await latest_pointer(bus)
    if ptr is None:
        return None
    name = ptr.latest.object
    with tempfile.TemporaryDirectory(prefix="bwr-resume-") as d:
        path = await fetch_checkpoint(bus, name, Path(d) / "ckpt", (*MODEL_FILES, TRAINER_STATE))
        model = load_checkpoint(path, device)
        state = torch.load(path / TRAINER_STATE, map_location=device, weights_only=True)
    log.info("resuming from %s (step %d)", name, ptr.latest.step)
    return model, state


async def train_from_stream(
    url: str,
    init: Callable[[], ByteLM],
    train_cfg: TrainConfig,
    cfg: TrainerConfig,
    *,
    dist: Dist | None = None,
    device: torch.device | str = "cpu",
    memory_config: MemoryConfig | None = None,
    progress: IO[str] | None = sys.stderr,
    stop: anyio.Event | None = None,
) -> int:
    """The whole run of one rank: connect, make sure of the consumer, resume from ckpt.latest (or
    start from init()), train until stopped. -> optimizer steps taken in all. `stop` set: finish
    the step under way, checkpoint, ack, return."""
    d = dist or Dist.single()
    dev = torch.device(device)
    bus = await Bus.connect(url, memory_config, name=f"bwr-trainer-{d.rank}")
    try:
        await ensure_consumer(bus, cfg)
        found = await resume(bus, dev)
        model = found[0] if found else init().to(dev)
        loop = TrainLoop(model, train_cfg, d)
        version = 0
        if found:
            loop.load_state_dict(found[1]["loop"])
            loop.horizon = train_cfg.steps  # the schedule of this run's flags
            version = int(found[1]["version"])
        trainer = NatsTrainer(bus, loop, cfg, version=version, progress=progress)
        async with anyio.create_task_group() as tg:
            if stop is not None:

                async def watch(ev: anyio.Event) -> None:
                    await ev.wait()
                    trainer.stopping = True

                tg.start_soon(watch, stop)
            steps = await trainer.run()
            tg.cancel_scope.cancel()
        loop.close()
        return steps
    finally:
        with anyio.CancelScope(shield=True):
            await bus.close()


if __name__ == "__main__":
    from memory.train_cli import main

    sys.exit(main())
