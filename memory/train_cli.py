"""`bwr train --nats-url URL`: the trainer's flags, the torchrun world and the signals, wired to
memory/trainer.py. Also runnable alone: `python -m memory.train_cli --nats-url URL ...` (or
`torchrun --nproc_per_node N -m memory.train_cli ...`).

train_cli.py is an entry point: it alone here reads argv and the environment (torchrun's RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). It adds only the flags a parser lacks, so it
can extend the `bwr train` parser that already has --config, --steps and the like.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import torch

from memory.trainer import TrainerConfig, train_from_stream
from model.config import ModelConfig
from model.distributed import Dist
from model.lm import ByteLM
from model.train import TrainConfig, parse_curriculum

_FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("--nats-url", dict(help="NATS server: train from the DOCS stream (durable consumer)")),
    ("--config", dict(default="tiny", help="named config, config JSON file, or checkpoint dir")),
    ("--resume", dict(help="checkpoint dir to start from when the store holds none")),
    ("--steps", dict(type=int, default=300, help="steps the cosine schedule spans")),
    ("--batch-size", dict(type=int, default=16)),
    ("--seq-len", dict(type=int, default=256)),
    ("--segments", dict(type=int, default=1, help="train through memory over this many")),
    ("--grad-accum", dict(type=int, default=1)),
    ("--lr", dict(type=float, default=3e-3)),
    ("--warmup", dict(type=int, default=20)),
    ("--seed", dict(type=int, default=0)),
    ("--device", dict(default="auto")),
    ("--save-dtype", dict(choices=["float32", "bfloat16"], default="float32")),
    ("--out", dict(help="also write each checkpoint's model files under this directory")),
    ("--curriculum", dict(default="", help="e.g. 0:256x1,0.3:1024x2 (fraction:seq_len x segs)")),
    (
        "--memory-levels",
        dict(
            default="",
            help="train through this hierarchy's merges: level capacities, e.g. 8,8,8 (''"
            ": one unbounded level)",
        ),
    ),
    ("--merge-group", dict(type=int, default=0, help="slots a full level merges (0: 4 * m)")),
    (
        "--state-drop",
        dict(
            type=float,
            default=0.0,
            help="chance a row's recurrent state is zeroed at a segment boundary (trains the read)",
        ),
    ),
    (
        "--state-pass",
        dict(
            type=float,
            default=0.0,
            help="chance a row starts from the last batch's final state (length generalisation)",
        ),
    ),
    ("--grad-checkpoint", dict(action="store_true", help="recompute activations in backward")),
    (
        "--train-compile",
        dict(
            default="auto",
            choices=["auto", "off", "blocks"],
            help="torch.compile each mixing block for training (auto: on a GPU)",
        ),
    ),
    ("--peak-flops", dict(type=float, default=800e12, help="device peak bf16 FLOP/s, for MFU")),
    ("--log-every", dict(type=int, default=25)),
    ("--checkpoint-every", dict(type=int, default=200, help="steps between checkpoints")),
    ("--keep-checkpoints", dict(type=int, default=2)),
    ("--consumer", dict(default="trainer", help="durable consumer name on DOCS")),
    (
        "--ack-wait",
        dict(type=float, default=30.0, help="seconds before a dead trainer's messages come back"),
    ),
    ("--max-ack-pending", dict(type=int, default=4096)),
    ("--fetch-batch", dict(type=int, default=64)),
    ("--idle-flush", dict(type=float, default=5.0, help="quiet seconds before the tail trains")),
    (
        "--until-idle",
        dict(
            type=float,
            default=0.0,
            help="exit after this many quiet seconds with everything acked (0: run on)",
        ),
    ),
    ("--max-steps", dict(type=int, default=0, help="stop at this step (0: run on)")),
    ("--doc-log", dict(default="", help="JSON lines of documents per step and per checkpoint")),
    ("--threads", dict(type=int, default=0, help="torch CPU threads (0: torch's default)")),
]


def add_train_nats_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the trainer's flags that `parser` does not have yet."""
    have = set(parser._option_string_actions)
    for flag, kw in _FLAGS:
        if flag not in have:
            parser.add_argument(flag, **kw)


def _arg(args: argparse.Namespace, flag: str) -> Any:
    """A flag's value, or its default here when the parser it came from lacks it."""
    name = flag.lstrip("-").replace("-", "_")
    if hasattr(args, name):
        return getattr(args, name)
    kw = dict(_FLAGS)[flag]
    return kw.get("default", False if kw.get("action") == "store_true" else None)


def configs(args: argparse.Namespace) -> tuple[TrainConfig, TrainerConfig]:

    def a(flag: str) -> Any:
        return _arg(args, flag)

    train = TrainConfig(
        steps=int(a("--steps")),
        batch_size=int(a("--batch-size")),
        seq_len=int(a("--seq-len")),
        grad_accum=int(a("--grad-accum")),
        lr=float(a("--lr")),
        warmup=int(a("--warmup")),
        segments=int(a("--segments")),
        seed=int(a("--seed")),
        log_every=int(a("--log-every")),
        grad_checkpoint=bool(a("--grad-checkpoint")),
        compile=str(a("--train-compile")),
        curriculum=parse_curriculum(str(a("--curriculum") or "")),
        peak_flops=float(a("--peak-flops")),
        memory_levels=tuple(int(x) for x in str(a("--memory-levels") or "").split(",") if x),
        merge_group=int(a("--merge-group")),
        state_drop=float(a("--state-drop")),
        state_pass=float(a("--state-pass")),
    )
    trainer = TrainerConfig(
        consumer=str(a("--consumer")),
        checkpoint_every=int(a("--checkpoint-every")),
        keep_checkpoints=int(a("--keep-checkpoints")),
        ack_wait_s=float(a("--ack-wait")),
        max_ack_pending=int(a("--max-ack-pending")),
        fetch_batch=int(a("--fetch-batch")),
        idle_flush_s=float(a("--idle-flush")),
        until_idle_s=float(a("--until-idle")),
        max_steps=int(a("--max-steps")),
        save_dtype=str(a("--save-dtype")),
        local_dir=str(a("--out") or ""),
        doc_log=str(a("--doc-log") or ""),
    )
    return train, trainer


def initial_model(config: str, resume: str | None, seed: int) -> Callable[[], ByteLM]:
    """What the trainer starts from when the store holds no checkpoint: the --resume checkpoint,
    a checkpoint directory or config JSON given as --config, or a named config (seeded)."""

    def make() -> ByteLM:
        torch.manual_seed(seed)
        if resume:
            return ByteLM.load(resume)
        p = Path(config)
        if p.is_dir():
            return ByteLM.load(str(p))
        if p.is_file():
            data = json.loads(p.read_text())
            return ByteLM(ModelConfig.from_dict(data.get("config", data)))
        return ByteLM(ModelConfig.named(config))

    return make


def run_train_nats(args: argparse.Namespace) -> int:
    """`bwr train --nats-url URL ...`: train from the DOCS stream until SIGINT/SIGTERM (or
    --max-steps, --until-idle). Under torchrun every rank runs this. -> exit status."""
    url = _arg(args, "--nats-url")
    if not url:
        print("bwr train: --nats-url URL is required here", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    train_cfg, trainer_cfg = configs(args)
    threads = int(_arg(args, "--threads") or 0)
    if threads:
        torch.set_num_threads(threads)
    dist = Dist.from_env(os.environ, str(_arg(args, "--device")))
    dist.init()
    try:
        init = initial_model(str(_arg(args, "--config")), _arg(args, "--resume"), train_cfg.seed)
        device = dist.device(str(_arg(args, "--device")))
        steps = anyio.run(_main, str(url), init, train_cfg, trainer_cfg, dist, device)
    finally:
        dist.close()
    if dist.is_main:
        print(f"trainer: stopped at step {steps}", file=sys.stderr)
    return 0


async def _main(
    url: str,
    init: Callable[[], ByteLM],
    train_cfg: TrainConfig,
    trainer_cfg: TrainerConfig,
    dist: Dist,
    device: torch.device,
) -> int:
    stop = anyio.Event()

    async def on_signals() -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:  # finish the step, checkpoint, ack, exit
                stop.set()
                return

    async with anyio.create_task_group() as tg:
        tg.start_soon(on_signals)
        steps = await train_from_stream(
            url, init, train_cfg, trainer_cfg, dist=dist, device=device, stop=stop
        )
        tg.cancel_scope.cancel()
    return steps


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m memory.train_cli", description="train from the DOCS stream"
    )
    add_train_nats_arguments(parser)
    return run_train_nats(parser.parse_args(argv))


if __name__ == "__main__":
    code = main()
    if "LOCAL_RANK" in os.environ:
        # Under torchrun, once the group is left and the checkpoints written, skip the
        # interpreter's teardown: gloo's threads can abort it ("terminate called without an
        # active exception", SIGABRT), failing a run whose work is all done.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
