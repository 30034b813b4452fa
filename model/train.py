"""The training loop: bytes in, a better model out.

train.py owns the optimisation (packing, AdamW, cosine schedule, accumulation, autocast) and takes
any iterator of byte strings; it knows nothing about files or NATS (callers bring the bytes: a
local text file here, the DOCS stream consumer in memory/).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from model.codec import EOS, encode
from model.lm import ByteLM
from model.segments import run_segments


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300  # optimizer steps
    batch_size: int = 16  # sequences per micro-batch
    seq_len: int = 256  # bytes per sequence (a multiple of the segment length trains memory)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    warmup: int = 20  # linear warmup steps
    weight_decay: float = 0.1  # AdamW decay on matrices
    clip: float = 1.0  # gradient norm clip
    segments: int = 1  # >1: train through memory with run_segments over this many segments
    seed: int = 0  # data order and lag draws
    log_every: int = 25  # steps between log lines
    time_budget_s: float = 0.0  # >0: stop by then; the schedule is fitted to the measured pace


def pack(docs: Iterable[bytes], batch_size: int, seq_len: int) -> Iterator[torch.Tensor]:
    """Documents (EOS after each) packed into (batch_size, seq_len + 1) long batches, streaming:
    holds at most about one batch of bytes in memory."""
    need = batch_size * (seq_len + 1)
    parts: list[torch.Tensor] = []
    have = 0
    for doc in docs:
        parts.append(torch.cat([encode(doc), torch.tensor([EOS])]))
        have += parts[-1].numel()
        while have >= need:
            flat = torch.cat(parts)
            yield flat[:need].view(batch_size, seq_len + 1)
            parts, have = [flat[need:]], flat.numel() - need


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: ByteLM, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=False)


def loss_on(model: ByteLM, batch: torch.Tensor, cfg: TrainConfig, rng: random.Random) -> torch.Tensor:
    x, y = batch[:, :-1], batch[:, 1:]
    if cfg.segments > 1:
        seg = max(1, x.shape[1] // cfg.segments)
        logits = run_segments(model, x, segment_len=seg, lag=rng.randint(0, 1))
    else:
        logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


@dataclass
class StepLog:
    step: int
    loss: float
    lr: float
    bytes_per_s: float


def train(
    model: ByteLM,
    batches: Iterator[torch.Tensor],
    cfg: TrainConfig,
    *,
    on_log: Callable[[StepLog], None] | None = None,
) -> list[StepLog]:
    """Run cfg.steps optimizer steps over `batches`; returns the log. Stops early if the data ends."""
    device = model.embed.weight.device
    use_bf16 = device.type == "cuda"
    if use_bf16:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    opt = make_optimizer(model, cfg)
    rng = random.Random(cfg.seed)
    model.train()
    logs: list[StepLog] = []
    t0, seen = time.perf_counter(), 0
    total_steps = cfg.steps
    for step in range(cfg.steps):
        if step >= total_steps:
            break
        if cfg.time_budget_s > 0 and step == cfg.warmup + 5:
            # Fit the cosine schedule to the steps the time budget allows at the measured pace.
            pace = (time.perf_counter() - t0) / step
            total_steps = max(step + 1, min(cfg.steps, int(cfg.time_budget_s / pace)))
        sched = TrainConfig(**{**cfg.__dict__, "steps": total_steps})
        for g in opt.param_groups:
            g["lr"] = lr_at(step, sched)
        total = 0.0
        for _ in range(cfg.grad_accum):
            try:
                batch = next(batches).to(device, non_blocking=True)
            except StopIteration:
                return logs
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = loss_on(model, batch, cfg, rng) / cfg.grad_accum
            loss.backward()
            total += loss.item()
            seen += batch.numel()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % cfg.log_every == 0 or step == total_steps - 1:
            entry = StepLog(step, total, opt.param_groups[0]["lr"], seen / (time.perf_counter() - t0))
            logs.append(entry)
            if on_log:
                on_log(entry)
    model.eval()
    return logs


def file_documents(path: str | Path, doc_bytes: int = 4096, *, loop: bool = True, seed: int = 0) -> Iterator[bytes]:
    """A text file read as documents of about doc_bytes, in shuffled order, forever if loop."""
    data = Path(path).read_bytes()
    if not data:
        raise ValueError(f"{path} is empty")
    starts = list(range(0, len(data), doc_bytes))
    rng = random.Random(seed)
    while True:
        rng.shuffle(starts)
        for s in starts:
            yield data[s : s + doc_bytes]
        if not loop:
            return


def unigram_entropy(data: bytes) -> float:
    """Entropy of the byte distribution in nats: what a model that ignores context can reach."""
    counts = torch.bincount(torch.frombuffer(bytearray(data), dtype=torch.uint8).long(), minlength=256).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())
