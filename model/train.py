"""The training loop: bytes in, a better model out.

train.py owns the optimisation: packing documents into batches (remembering whose bytes went
where), the curriculum over sequence length and segments, AdamW with a cosine schedule, gradient
accumulation, gradient checkpointing, bf16 autocast and TF32 on the GPU (float32 on the CPU),
data parallelism through model/distributed.py, and the throughput figures (bytes/s, MFU). It
takes any iterator of byte strings or batches; it knows nothing about files beyond
`file_documents` and nothing about NATS (the DOCS stream consumer lives in memory/trainer.py and
drives `TrainLoop` one optimizer step at a time).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from model.codec import EOS, PAD, encode
from model.distributed import Dist
from model.lm import ByteLM, State
from model.segments import Hierarchy, run_segments, zero_rows

K = TypeVar("K")
Batch = Tensor | tuple[Tensor, Tensor]  # (B, T + 1) ids, or ids and their answer mask


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300  # optimizer steps (the cosine schedule spans them)
    batch_size: int = 16  # sequences per micro-batch (at seq_len; the curriculum keeps the bytes)
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
    time_budget_s: float = 0.0  # >0: a hard stop (after a step); the schedule fits the pace
    grad_checkpoint: bool = False  # recompute each block's activations in backward (less memory)
    compile: str = "auto"  # "blocks": torch.compile each mixing block; "off"; "auto": blocks on GPU
    curriculum: tuple[tuple[float, int, int], ...] = ()  # (from step fraction, seq_len, segments)
    peak_flops: float = 800e12  # one device's peak bf16 FLOP/s for MFU (H100: about 800e12 here)
    answer_weight: float = 1.0  # loss weight of answer bytes, in batches given with answer masks
    memory_levels: tuple[int, ...] = ()  # level capacities to consolidate through (): one level
    merge_group: int = 0  # slots a full level merges at once (0: 4 * mem_slots), as MemoryConfig
    state_drop: float = 0.0  # chance a row's recurrent state is zeroed at a segment boundary
    state_pass: float = 0.0  # chance a row starts from the previous batch's final state, not zeros

    def __post_init__(self) -> None:
        fracs = [f for f, _, _ in self.curriculum]
        if fracs != sorted(fracs) or any(not 0 <= f < 1 for f in fracs):
            raise ValueError(f"curriculum {self.curriculum}: fractions ascending, in [0, 1)")
        if any(s < 2 or n < 1 for _, s, n in self.curriculum):
            raise ValueError(f"curriculum {self.curriculum}: seq_len >= 2 and segments >= 1")
        if self.compile not in ("auto", "off", "blocks"):
            raise ValueError(f"compile {self.compile!r}: auto, off or blocks")
        if self.answer_weight < 0:
            raise ValueError(f"answer_weight {self.answer_weight}: want >= 0")
        if not 0 <= self.state_drop < 1:
            raise ValueError(f"state_drop {self.state_drop}: want [0, 1)")
        if not 0 <= self.state_pass <= 1:
            raise ValueError(f"state_pass {self.state_pass}: want [0, 1]")

    @property
    def hierarchy(self) -> Hierarchy | None:
        return Hierarchy(self.memory_levels, self.merge_group) if self.memory_levels else None


# ----- the curriculum -----


@dataclass(frozen=True)
class Stage:
    """The shape of one step's micro-batches."""

    seq_len: int
    segments: int
    batch_size: int

    @property
    def batch_bytes(self) -> int:
        return self.batch_size * (self.seq_len + 1)


def stage_at(step: int, cfg: TrainConfig) -> Stage:
    """The stage of `step`: the last curriculum entry whose fraction of cfg.steps it has reached
    (cfg.seq_len and cfg.segments before any). Rows shrink as sequences grow: same bytes a step."""
    seq, segs = cfg.seq_len, cfg.segments
    for frac, s, n in cfg.curriculum:
        if step >= frac * cfg.steps:
            seq, segs = s, n
    return Stage(seq, segs, max(1, cfg.batch_size * cfg.seq_len // seq))


def parse_curriculum(text: str) -> tuple[tuple[float, int, int], ...]:
    """ "0:256x1,0.3:1024x2,0.6:2048x4" -> ((0.0, 256, 1), (0.3, 1024, 2), (0.6, 2048, 4))."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            frac, shape = part.split(":")
            seq, segs = shape.lower().split("x")
            out.append((float(frac), int(seq), int(segs)))
        except ValueError:
            raise ValueError(
                f"curriculum entry {part!r}: want FRACTION:SEQ_LENxSEGMENTS, e.g. 0.3:1024x2"
            ) from None
    return tuple(out)


# ----- packing -----


class Packer(Generic[K]):
    """Documents (each followed by EOS) packed into batches, streaming, remembering whose bytes
    they are. take() hands out the oldest bytes first and returns the owners whose last byte it
    handed out, so a caller knows when all of a document went into an optimizer step. Holds only
    the bytes not yet taken."""

    def __init__(self) -> None:
        self._parts: deque[tuple[Tensor, K | None]] = deque()
        self._head = 0  # ids of _parts[0] already taken
        self.pending = 0  # ids held

    def add(self, doc: bytes, owner: K | None = None, *, eos: bool = True) -> None:
        """Queue a document (eos=False: a chunk that a later chunk continues)."""
        ids = encode(doc)
        if eos:
            ids = torch.cat([ids, torch.tensor([EOS])])
        if ids.numel() == 0:
            raise ValueError("an empty chunk without EOS has no bytes to train on")
        self._parts.append((ids, owner))
        self.pending += ids.numel()

    def take(self, rows: int, cols: int) -> tuple[Tensor, list[K]]:
        """-> (rows, cols) long batch of the oldest ids, the owners it finished."""
        n = rows * cols
        if n > self.pending:
            raise ValueError(f"take of {n} ids from a packer holding {self.pending}")
        flat, done = self._take(n)
        return flat.view(rows, cols), done

    def take_padded(self, rows: int, cols: int) -> tuple[Tensor, list[K]]:
        """Like take, but whatever is held (possibly nothing) padded with PAD to the shape: PAD
        targets carry no loss. For the tail of a stream that went quiet."""
        n = min(rows * cols, self.pending)
        flat, done = self._take(n)
        out = torch.full((rows * cols,), PAD, dtype=torch.long)
        out[:n] = flat
        return out.view(rows, cols), done

    def _take(self, n: int) -> tuple[Tensor, list[K]]:
        pieces: list[Tensor] = []
        done: list[K] = []
        while n > 0:
            ids, owner = self._parts[0]
            k = min(ids.numel() - self._head, n)
            pieces.append(ids[self._head : self._head + k])
            self._head += k
            n -= k
            self.pending -= k
            if self._head == ids.numel():
                self._parts.popleft()
                self._head = 0
                if owner is not None:
                    done.append(owner)
        flat = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
        return flat, done


def pack(docs: Iterable[bytes], batch_size: int, seq_len: int) -> Iterator[Tensor]:
    """Documents (EOS after each) packed into (batch_size, seq_len + 1) long batches, streaming:
    holds at most about one batch of bytes in memory."""
    packer: Packer[None] = Packer()
    need = batch_size * (seq_len + 1)
    for doc in docs:
        packer.add(doc)
        while packer.pending >= need:
            yield packer.take(batch_size, seq_len + 1)[0]


def curriculum_batches(docs: Iterable[bytes], cfg: TrainConfig) -> Iterator[Tensor]:
    """pack() with the curriculum's shapes: the grad_accum batches of step s have the shape of
    stage_at(s). Without a curriculum, the same batches as pack(docs, batch_size, seq_len)."""
    packer: Packer[None] = Packer()
    i = 0
    for doc in docs:
        packer.add(doc)
        while True:
            st = stage_at(i // cfg.grad_accum, cfg)
            if packer.pending < st.batch_bytes:
                break
            yield packer.take(st.batch_size, st.seq_len + 1)[0]
            i += 1


# ----- the objective -----


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: ByteLM, cfg: TrainConfig) -> torch.optim.AdamW:
    def decays(n: str, p: nn.Parameter) -> bool:
        return p.dim() >= 2 and "embed" not in n

    decay = [p for n, p in model.named_parameters() if decays(n, p)]
    other = [p for n, p in model.named_parameters() if not decays(n, p)]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": other, "weight_decay": 0.0},
    ]
    # fused on the GPU: one kernel for all parameters (the foreach path took a fifth of a step)
    fused = model.embed.weight.is_cuda
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=fused)


def sequence_loss(
    model: ByteLM,
    batch: Tensor,
    segments: int,
    lag: int,
    weight: Tensor | None = None,
    hierarchy: Hierarchy | None = None,
    drop: Tensor | None = None,
) -> Tensor:
    """Mean next-byte cross entropy of batch (B, T + 1); PAD targets carry none. segments > 1
    trains through memory (run_segments, with `lag` segments before slots are readable, the
    `hierarchy`'s merges and the state dropped where `drop` says). weight (B, T), one per
    target: the weighted mean instead."""
    return sequence_loss_from(model, batch, segments, lag, weight, hierarchy, drop, None)[0]


def sequence_loss_from(
    model: ByteLM,
    batch: Tensor,
    segments: int,
    lag: int,
    weight: Tensor | None,
    hierarchy: Hierarchy | None,
    drop: Tensor | None,
    state: State | None,
    want_state: bool = False,
) -> tuple[Tensor, State | None]:
    """sequence_loss with the rows started from `state` (None: zeros) -> (the loss, the state
    after the last byte if `want_state`, else None)."""
    x, y = batch[:, :-1], batch[:, 1:]
    final: State | None = None
    if segments > 1:
        S = max(1, x.shape[1] // segments)
        logits, final = run_segments(
            model, x, segment_len=S, lag=lag, hierarchy=hierarchy, drop=drop, state=state,
            want_state=True,
        )  # fmt: skip
    else:
        out = model.run(x, state, None, want_state=want_state)
        logits, final = out.logits, out.state
    flat = logits.reshape(-1, logits.shape[-1]).float()
    if weight is None:
        ce = F.cross_entropy(flat, y.reshape(-1), ignore_index=PAD, reduction="sum")
        loss = ce / (y != PAD).sum().clamp(min=1)
    else:
        ce = F.cross_entropy(flat, y.reshape(-1), ignore_index=PAD, reduction="none")
        w = (weight * (y != PAD)).reshape(-1).float()
        loss = (ce * w).sum() / w.sum().clamp(min=1e-6)
    return loss, final if want_state else None


def answer_weights(answers: Tensor, weight: float) -> Tensor:
    """An answer mask (B, T + 1) of a batch -> loss weights (B, T) of its targets: `weight` on
    the answers' bytes, 1 elsewhere."""
    return 1 + (weight - 1) * answers[:, 1:].float()


class Objective(nn.Module):
    """The loss as one module call: DDP all-reduces the gradients of what its wrapper computes,
    so every forward of a step (run_segments' compressions included) goes through here. With
    `state`, rows start from it; with `want_state`, the state after the last byte, detached, is
    left in `final_state` for the next call."""

    def __init__(self, model: ByteLM, hierarchy: Hierarchy | None = None) -> None:
        super().__init__()
        self.model = model
        self.hierarchy = hierarchy
        self.final_state: State | None = None

    def forward(
        self,
        batch: Tensor,
        segments: int,
        lag: int,
        weight: Tensor | None = None,
        drop: Tensor | None = None,
        state: State | None = None,
        want_state: bool = False,
    ) -> Tensor:
        loss, final = sequence_loss_from(
            self.model, batch, segments, lag, weight, self.hierarchy, drop, state, want_state
        )
        self.final_state = None if final is None else {k: v.detach() for k, v in final.items()}
        return loss


def compile_blocks(model: ByteLM, backend: str = "inductor") -> Callable[[], None]:
    """torch.compile each mixing block in place (regional compilation: blocks of one kind share
    their compiled code, so it compiles in about a minute where the whole objective takes many).
    Fuses the elementwise chains around the recurrences: on an H100, base trains 2x faster and
    needs 40% less memory (docs/BENCHMARKS.md). -> a function undoing it."""
    from model.lm import MixBlock

    blocks = [b for b in model.blocks if isinstance(b, MixBlock)]
    for block in blocks:
        block.compile(backend=backend)

    def undo() -> None:
        for block in blocks:
            block._compiled_call_impl = None

    return undo


def enable_grad_checkpointing(model: ByteLM) -> Callable[[], None]:
    """Recompute each block's activations during backward instead of keeping them (training with
    grad enabled only; eval, prefill and decode run the blocks as they are). Results are the same;
    ByteLM is untouched but for an instance-level `forward` on each block. -> a function undoing
    it."""

    def wrap(block: nn.Module) -> Callable[..., Any]:
        forward = block.forward

        def run(*args: Any) -> Any:
            if block.training and torch.is_grad_enabled():
                return checkpoint(forward, *args, use_reentrant=False)
            return forward(*args)

        return run

    for block in model.blocks:
        block.forward = wrap(block)

    def undo() -> None:
        for block in model.blocks:
            vars(block).pop("forward", None)

    return undo


@dataclass
class StepLog:
    step: int
    loss: float
    lr: float
    bytes_per_s: float  # over all ranks, since the previous log line
    mfu: float = 0.0  # model FLOPs utilisation on the GPU (0 on the CPU)
    bytes: int = 0  # bytes trained so far, over all ranks


class TrainLoop:
    """The optimisation state and one optimizer step at a time: AdamW, the cosine schedule (over
    `horizon` steps), accumulation over the micro-batches given, clipping, autocast, DDP."""

    def __init__(self, model: ByteLM, cfg: TrainConfig, dist: Dist | None = None) -> None:
        self.model, self.cfg = model, cfg
        self.dist = dist or Dist.single()
        self.device = model.embed.weight.device
        self.bf16 = self.device.type == "cuda"
        if self.bf16:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.opt = make_optimizer(model, cfg)
        self.rng = random.Random(cfg.seed)  # lag draws: the same on every rank
        self.step = 0  # optimizer steps taken
        self.horizon = cfg.steps  # steps the cosine spans (a time budget refits it)
        self.bytes = 0  # bytes trained on, over all ranks
        self._undo = enable_grad_checkpointing(model) if cfg.grad_checkpoint else None
        compiled = cfg.compile == "blocks" or (cfg.compile == "auto" and self.device.type == "cuda")
        self._uncompile = compile_blocks(model) if compiled else None
        if cfg.hierarchy is not None:
            cfg.hierarchy.check(model.config.mem_slots, model.config.mem_levels)
        self.loss_module = Objective(model, cfg.hierarchy)
        self.objective = self.dist.wrap(self.loss_module)
        self.carry: State | None = None  # the last micro-batch's final states (state_pass)
        embed = model.embed.weight.numel()
        self.flops_per_byte = 6 * (model.num_parameters() - embed)  # 6N: forward and backward

    def lr(self) -> float:
        return lr_at(self.step, replace(self.cfg, steps=self.horizon))

    def stage(self) -> Stage:
        return stage_at(self.step, self.cfg)

    def run_step(self, micro: Sequence[Batch], segments: int | None = None) -> float:
        """One optimizer step over the micro-batches (B, T + 1) -> this rank's mean loss. A
        micro-batch may come as (batch, answer mask) (`Mixer.mix_batch`): its answer bytes then
        weigh cfg.answer_weight in the loss."""
        segs = self.stage().segments if segments is None else segments
        self.model.train()
        for g in self.opt.param_groups:
            g["lr"] = self.lr()
        total = torch.zeros((), device=self.device)
        ddp = self.dist.active and isinstance(self.objective, nn.parallel.DistributedDataParallel)
        for i, item in enumerate(micro):
            batch, weight = item if isinstance(item, tuple) else (item, None)
            if weight is not None:
                weight = answer_weights(weight, self.cfg.answer_weight).to(self.device)
            lag = self.rng.randint(0, 1) if segs > 1 else 0
            drop = self._drops(segs, batch.shape[0])
            start = self._passed(batch.shape[0])
            passing = self.cfg.state_pass > 0
            skip_sync = ddp and i < len(micro) - 1  # all-reduce once, on the last micro-batch
            with self.objective.no_sync() if skip_sync else contextlib.nullcontext():  # type: ignore[operator]
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    batch_d = batch.to(self.device, non_blocking=True)
                    loss = self.objective(batch_d, segs, lag, weight, drop, start, passing)
                    loss = loss / len(micro)
                loss.backward()
            total += loss.detach()
            if passing:
                self.carry = self.loss_module.final_state
            self.bytes += batch[:, 1:].numel() * self.dist.world
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return float(total.item())  # sync: once per optimizer step

    def _drops(self, segments: int, rows: int) -> Tensor | None:
        """(segments - 1, rows) bool: where a row's state is zeroed (cfg.state_drop), drawn from
        the loop's generator (the same on every rank; nothing drawn when state_drop is 0)."""
        if self.cfg.state_drop <= 0 or segments < 2:
            return None
        g = torch.Generator().manual_seed(self.rng.getrandbits(63))
        drop = torch.rand(segments - 1, rows, generator=g) < self.cfg.state_drop
        return drop.to(self.device)

    def _passed(self, rows: int) -> State | None:
        """The state each row starts from: with chance cfg.state_pass the final state of the same
        row of the previous micro-batch (detached: no gradient crosses batches), else zeros.
        Drawn from the loop's generator like _drops; None while nothing is carried (the first
        micro-batch, or a change of rows)."""
        if self.cfg.state_pass <= 0 or self.carry is None:
            return None
        if any(v.shape[0] != rows for v in self.carry.values()):
            return None
        g = torch.Generator().manual_seed(self.rng.getrandbits(63))
        return zero_rows(
            self.carry, (torch.rand(rows, generator=g) < self.cfg.state_pass).to(self.device)
        )

    def mfu(self, bytes_per_s: float) -> float:
        """Model FLOPs (6 N per byte) over the devices' peak; 0 off the GPU."""
        if not self.bf16:
            return 0.0
        return self.flops_per_byte * bytes_per_s / (self.cfg.peak_flops * self.dist.world)

    def mean_over_ranks(self, value: float) -> float:
        """A number averaged over the ranks (every rank must call it at the same step)."""
        return self.dist.sum([value])[0] / self.dist.world

    def state_dict(self) -> dict[str, Any]:
        return dict(
            optimizer=self.opt.state_dict(),
            step=self.step,
            horizon=self.horizon,
            bytes=self.bytes,
            rng=list(self.rng.getstate()[1]),
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.horizon, self.bytes = state["step"], state["horizon"], state["bytes"]
        self.rng.setstate((3, tuple(state["rng"]), None))

    def close(self) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None
        if self._uncompile is not None:
            self._uncompile()
            self._uncompile = None


def train(
    model: ByteLM,
    batches: Iterator[Batch],
    cfg: TrainConfig,
    *,
    on_log: Callable[[StepLog], None] | None = None,
    dist: Dist | None = None,
) -> list[StepLog]:
    """Run cfg.steps optimizer steps over `batches` (this rank's: shard the documents first);
    returns the log. Stops early if the data ends (on any rank, under DDP)."""
    loop = TrainLoop(model, cfg, dist)
    logs: list[StepLog] = []
    t0 = time.perf_counter()
    mark, mark_bytes = t0, 0
    t3 = t0
    fitted = False
    try:
        for step in range(cfg.steps):
            if step >= loop.horizon:
                break
            if step == 3:
                t3 = time.perf_counter()  # the first steps compile: the pace is taken after them
            if cfg.time_budget_s > 0 and step > 0:
                now = time.perf_counter()
                # The budget is a hard limit (any rank out of time stops them all): a pace far
                # slower than the first steps' cannot run past it unsaved.
                # Both decisions are the ranks' together: a rank that fitted alone would wait
                # in mean_over_ranks for ranks that did not.
                spent = now - t0 >= cfg.time_budget_s
                early = now - t0 >= 0.1 * cfg.time_budget_s
                if loop.dist.active:
                    n_spent, n_early = loop.dist.sum([float(spent), float(early)])
                    spent, early = n_spent > 0, n_early > 0
                if spent:
                    break
                if not fitted and step > 3 and (step >= cfg.warmup + 5 or early):
                    # Fit the cosine schedule to the steps the rest of the budget allows at the
                    # measured pace (the ranks' mean, so every rank stops at the same step); early
                    # when steps are slow, so the decay fits a short run too.
                    fitted = True
                    pace = loop.mean_over_ranks((now - t3) / (step - 3))
                    left = int((cfg.time_budget_s - (now - t0)) / pace)
                    loop.horizon = max(step + 1, min(cfg.steps, step + left))
            micro = list(_take(batches, cfg.grad_accum))
            ended = len(micro) < cfg.grad_accum
            if loop.dist.active:
                ended = loop.dist.sum([float(ended)])[0] > 0
            if ended:
                break
            loss = loop.run_step(micro, stage_at(step, cfg).segments)
            if step % cfg.log_every == 0 or step == loop.horizon - 1:
                loss = loop.mean_over_ranks(loss)
                now = time.perf_counter()
                rate = (loop.bytes - mark_bytes) / max(now - mark, 1e-9)
                mark, mark_bytes = now, loop.bytes
                lr = loop.opt.param_groups[0]["lr"]
                entry = StepLog(step, loss, lr, rate, loop.mfu(rate), loop.bytes)
                logs.append(entry)
                if on_log:
                    on_log(entry)
    finally:
        loop.close()
        model.eval()
    return logs


def _take(it: Iterator[Batch], n: int) -> Iterator[Batch]:
    for _ in range(n):
        try:
            yield next(it)
        except StopIteration:
            return


def file_documents(
    path: str | Path, doc_bytes: int = 4096, *, loop: bool = True, seed: int = 0
) -> Iterator[bytes]:
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
    ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    counts = torch.bincount(ids, minlength=256).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())
