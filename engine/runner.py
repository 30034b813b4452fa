"""runner.py executes a StepPlan on the device; it knows slots, never sessions or sockets.

It owns the pools, all allocated once with a leading slot dimension (max_slots + 1 rows; the
last row is scratch that padded graph rows write into): the model's recurrent state, the logits
of each slot's last byte, its sampling parameters and sample counter, the memory slots it reads,
and the buffer of captured hidden states of its open segment. A step is: zero newly owned slots,
one batched recurrent step for every one-byte feed (a CUDA graph per batch bucket on a GPU, the
same function eagerly elsewhere), the parallel form for prefill chunks, then one sampling pass
and one host sync for the sampled bytes.

Work for the next step is queued before that sync, behind this step's on the device: the copies
of closed segments. On a GPU the sync waits on an event recorded after the sampled ids, so it
does not wait for them; the host launches them while the device still runs the step. Memory
keys/values are computed when a version is installed; the slots' ages, which change at segment
boundaries, enter inside the step (MemoryRead adds their terms from a table).

A step is launched (`launch`: queued on the device, nothing waited for) and collected later
(`collect`: the one sync), so the engine can launch step k+1 before it collects step k. Rows of
step k+1 that feed a byte step k is still sampling (the scheduler's speculative feeds, flagged
in the plan) take it on the device from `last_ids`, each slot's last sampled id; a row whose
byte turns out to be EOS is sent to the scratch row, so the slot's state, logits and counter stay
as they were. Launches alternate between two pinned buffers for rows and for sampled ids: a
launch never writes into memory the step before it may still be reading.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import compress
from operator import itemgetter

import numpy as np
import torch
from torch import Tensor

from engine.config import EngineConfig
from engine.graphs import DecodeGraphs
from engine.sampling import sample
from engine.scheduler import Feed, StepPlan
from engine.types import SamplingParams
from model import ByteLM, MemorySlots, age_bucket, kernels
from model.decode_cache import build_decode_cache, refresh_decode_cache
from model.lm import ReadBlock

# Largest decode bucket whose compiled sampler keeps inductor's persistent reductions.
SAMPLER_PERSISTENT_ROWS = 256

# Feed's fields by position (C-level getters: the per-step loops over a thousand feeds use them).
_SLOT, _DATA, _START, _SAMPLE = (
    itemgetter(Feed._fields.index(k)) for k in ("slot", "data", "start", "sample")
)


@dataclass(frozen=True)
class ClosedSegment:
    slot: int
    index: int  # segment number in the session (0, 1, ...)
    start: int  # context offset of its first byte
    hidden: Tensor  # (S, D) captured hidden states, on the device


@dataclass
class Launched:
    """A step on the device, not yet collected."""

    plan: StepPlan
    ids: Tensor | None  # sampled ids on the device (plan.samples order; decode rows padded)
    host: Tensor | None  # their pinned host copy, ready after `ready`
    ready: torch.cuda.Event | None
    closed: list[ClosedSegment]


class Runner:
    def __init__(self, model: ByteLM, cfg: EngineConfig, *, capture_segments: bool = False) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.model = model.to(self.device).eval()
        mc = model.config
        self.S = mc.segment_len
        rows = cfg.max_slots + 1
        self.scratch = cfg.max_slots
        dev = self.device
        self.state = model.allocate_state(rows, dev)
        self.logits = torch.zeros(rows, mc.vocab, device=dev)
        self.temperature = torch.ones(rows, device=dev)
        self.top_k = torch.zeros(rows, dtype=torch.long, device=dev)
        self.top_p = torch.ones(rows, device=dev)
        self.no_eos = torch.zeros(rows, dtype=torch.bool, device=dev)
        self.seed = torch.zeros(rows, dtype=torch.long, device=dev)
        self.counter = torch.zeros(rows, dtype=torch.long, device=dev)
        self.last_ids = torch.zeros(rows, dtype=torch.long, device=dev)  # each slot's last sample
        M = cfg.memory_capacity
        self.memory = MemorySlots.empty(rows, mc.d_model, dev, capacity=M) if M else None
        self.mem_written = torch.zeros(
            rows, M, dtype=torch.long, device=dev
        )  # segment each slot came from
        # Keys and values of each slot's memory, per read block, without their age terms (the
        # read adds those from a small table at every step, MemoryRead.forward): they change only
        # when a version is installed or the weights change, so they are computed then and the
        # step only attends (instead of projecting every memory slot at every byte, or again at
        # every segment boundary as the slots age).
        self.reads = {i: b.read for i, b in enumerate(model.blocks) if isinstance(b, ReadBlock)}
        self.mem_kv: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        if M:
            for i, read in self.reads.items():
                # bfloat16 beside bfloat16 weights: each step gathers its rows' keys and values
                # (rows x heads x M+1 x head_dim, twice), the read's largest cost at many slots
                kv_dtype = torch.bfloat16 if cfg.decode_dtype == "bfloat16" else torch.float32
                self.mem_kv[i] = (
                    torch.zeros(rows, read.heads, M + 1, read.head_dim, dtype=kv_dtype, device=dev),
                    torch.zeros(rows, read.heads, M + 1, read.head_dim, dtype=kv_dtype, device=dev),
                    torch.zeros(rows, M + 1, dtype=torch.bool, device=dev),
                )
            self._refresh_kv(slice(None))  # every row an empty memory: the null slot only
        # What each slot's last decoded byte read: per read block and head, the memory slots it
        # picked (-1: the null slot), and the context offset of that byte (-1: none yet). Written
        # inside the decode step (graph-safe), read only by the inspector.
        self.picks: Tensor | None = None
        self.picks_at = torch.full((rows,), -1, dtype=torch.long, device=dev)
        # A slot's last read as it was made, kept when a new memory version is installed (the
        # picks index the old layout) until the slot decodes again.
        self._read_log: dict[int, dict[str, object]] = {}
        if M and self.reads:
            read = next(iter(self.reads.values()))
            k = min(read.topk, M + 1)
            self.picks = torch.full(
                (rows, len(self.reads), read.heads, k), -1, dtype=torch.long, device=dev
            )
        self.capture = capture_segments
        self.seg_buf = (
            torch.zeros(rows, self.S, mc.d_model, device=dev) if capture_segments else None
        )
        # The fused decode reads poles, merged projections (and bf16 weights) from this cache.
        dtype = torch.bfloat16 if cfg.decode_dtype == "bfloat16" else torch.float32
        self.cache = build_decode_cache(self.model, dtype) if self.device.type == "cuda" else None
        self._host_rows = torch.zeros(4, cfg.max_slots, dtype=torch.long)  # eager decode input
        self._host_np = self._host_rows.numpy()  # the same memory, for _rows
        # A step's sampled ids land in pinned memory; an event after them is the step's sync.
        # Two of each, used by alternate launches (two steps may be in flight).
        self._ids_host: list[Tensor] = []
        self._ids_ready: list[torch.cuda.Event] = []
        self._launches = 0
        if self.device.type == "cuda":
            self._ids_host = [torch.zeros(rows, dtype=torch.long).pin_memory() for _ in range(2)]
            self._ids_ready = [torch.cuda.Event() for _ in range(2)]  # type: ignore[no-untyped-call]
        self.graphs: DecodeGraphs | None = None
        self._model_fn: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]] = self._decode_model
        self._sample_fns: tuple[Callable[[Tensor, Tensor, Tensor], Tensor], ...] = (
            self._decode_sample,
        )
        fused = cfg.fused_sampler and kernels.available(self.last_ids)
        if fused:
            self._sample_fns = (self._fused_sample,)  # one Triton kernel, any batch size
        if cfg.compile:
            # One compiled variant per batch bucket (and per runner): past dynamo's default
            # recompile limit (8) it would silently fall back to eager.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
            mode = None if cfg.compile_mode == "default" else cfg.compile_mode
            dynamic = cfg.compile_dynamic
            self._model_fn = torch.compile(self._decode_model, dynamic=dynamic, mode=mode)
            # The sampler compiled on its own, twice: inductor's persistent reductions (one
            # program holds a row's 260 logits) win up to a few hundred rows and lose 2x at a
            # thousand (measured on an H100: docs/BENCHMARKS.md), so large buckets go without.
            if not fused:
                self._sample_fns = tuple(
                    torch.compile(
                        self._decode_sample,
                        dynamic=dynamic,
                        options={"triton.persistent_reductions": persistent},
                    )
                    for persistent in (True, False)
                )
        self._decode_fn = self._decode_rows  # graphs are captured by DecodeGraphs
        if self.device.type == "cuda" and cfg.cuda_graphs:
            self.graphs = DecodeGraphs(self._decode_rows, cfg.buckets, self.scratch, dev)

    # ----- per-slot setup -----

    def reset_slot(self, slot: int) -> None:
        for t in self.state.values():
            t[slot].zero_()
        self.logits[slot].zero_()
        self.counter[slot] = 0
        if self.memory is not None:
            self.memory.mask[slot] = False
            for _, _, valid in self.mem_kv.values():
                valid[slot, 1:] = False  # the null slot only, as an empty memory reads
        if self.picks is not None:
            self.picks[slot] = -1
            self.picks_at[slot] = -1
            self._read_log.pop(slot, None)
        if self.seg_buf is not None:
            self.seg_buf[slot].zero_()

    def set_sampling(
        self, slot: int, params: SamplingParams, seed: int, reset_counter: bool
    ) -> None:
        """Called between steps when a turn starts. An explicit seed restarts the counter (same
        seed, same bytes); otherwise the counter carries on across turns."""
        if reset_counter:
            self.counter[slot] = 0
        self.temperature[slot] = params.temperature
        self.top_k[slot] = params.top_k
        self.top_p[slot] = params.top_p
        self.no_eos[slot] = params.ignore_eos
        self.seed[slot] = seed & 0xFFFFFFFF

    def install_memory(self, slot: int, memory: MemorySlots, written: Tensor) -> None:
        """Switch a slot to a new memory version (between steps). memory has batch 1; written (M,)
        holds the segment index each slot was written at (ages are computed per step).

        Two host-to-device copies (the slots; level, mask and written packed), non-blocking from
        pinned memory on a GPU, and the slot's keys/values (queued behind them): the next step
        then has nothing to compute for it, nor has any later one until the next version."""
        assert self.memory is not None, "memory is off (memory_capacity 0)"
        if self.picks is not None:  # read in the layout it was made in, before it changes
            made = self.last_read(slot)
            if made is not None and int(self.picks_at[slot]) >= 0:
                self._read_log[slot] = {**made, "earlier_version": True}
            self.picks_at[slot] = -1
        M = self.memory.size
        n = min(M, memory.size)
        slots = memory.slots[0, :n]  # (n, D)
        meta = torch.stack(
            [memory.level[0, :n].long(), memory.mask[0, :n].long(), written[:n].long()]
        )  # (3, n)
        if self.device.type == "cuda":
            if not slots.is_cuda:
                slots = slots.pin_memory()
            if not meta.is_cuda:
                meta = meta.pin_memory()
            slots = slots.to(self.device, non_blocking=True)
            meta = meta.to(self.device, non_blocking=True)
        self.memory.mask[slot] = False
        self.memory.slots[slot, :n] = slots
        self.memory.level[slot, :n] = meta[0]
        self.memory.mask[slot, :n] = meta[1].bool()
        self.mem_written[slot, :n] = meta[2]
        self._refresh_kv(slice(slot, slot + 1))

    def _refresh_kv(self, rows: slice) -> None:
        """Recompute the memory keys/values (without age terms) of pool rows `rows` from the
        memory they hold, in one batched projection per read block."""
        if not self.mem_kv:
            return
        assert self.memory is not None
        m = self.memory
        level = m.level[rows]
        mem = MemorySlots(m.slots[rows], level, torch.zeros_like(level), m.mask[rows])
        for i, (K, V, valid) in self.mem_kv.items():
            k, v, ok, _ = self.reads[i].memory_kv(mem, mem.slots.shape[0])
            K[rows], V[rows], valid[rows] = k, v, ok

    def _to_device(self, t: Tensor) -> Tensor:
        """A host tensor onto the device without waiting for the device: on a GPU through pinned
        memory, so a step queued behind one still running does not stall the host."""
        if self.device.type != "cuda":
            return t
        return t.contiguous().pin_memory().to(self.device, non_blocking=True)

    def _ages(self, slots: Tensor, pos: Tensor) -> Tensor:
        """Age buckets (B, M) of the memory slots of pool rows `slots` read at offsets `pos`."""
        age = (pos // self.S).unsqueeze(-1) - self.mem_written[slots]  # (B, M) segments
        return age_bucket(age.clamp(min=0), self.model.config.age_buckets)

    def _memory_for(self, slots: Tensor, pos: Tensor) -> MemorySlots | None:
        if self.memory is None:
            return None
        m = self.memory
        return MemorySlots(m.slots[slots], m.level[slots], self._ages(slots, pos), m.mask[slots])

    # ----- the step -----

    def _decode_rows(self, rows: Tensor) -> Tensor:
        """rows (4, B) long: tokens, slots, positions, flags -> sampled ids (B,).

        The whole batched decode: recurrent step on the pool rows, logits and captured hidden
        written back, and a sample for every row. Flag bit 0: the sample counts (others do not
        advance their counter); bit 1: the token is the slot's last sampled id (a speculative
        feed), and if that is EOS the row goes to the scratch row instead (nothing is fed); bit
        2: feed nothing, sample from the logits the slot holds (a turn that starts without input:
        its model row goes to the scratch row)."""
        logits, slots, flag = self._model_fn(rows)
        large = len(self._sample_fns) > 1 and rows.shape[1] > SAMPLER_PERSISTENT_ROWS
        return self._sample_fns[large](logits, slots, flag)

    def _decode_model(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The model part of _decode_rows -> (logits to sample, slots that sample, flags)."""
        tokens, slots, pos, flag = rows[0], rows[1], rows[2], rows[3]
        spec = (flag & 2) > 0
        only = (flag & 4) > 0
        tokens = torch.where(spec, self.last_ids[slots], tokens)
        sampler = torch.where(spec & (tokens >= 256), self.scratch, slots)
        held = self.logits[slots]  # before this step writes them: what sample-only rows read
        slots = torch.where(only, self.scratch, sampler)
        kv = None
        if self.mem_kv:
            age = self._ages(slots, pos)
            age = torch.cat([age.new_full((age.shape[0], 1), -1), age], 1)  # the null slot: none
            kv = {i: (K[slots], V[slots], ok[slots], age) for i, (K, V, ok) in self.mem_kv.items()}
        picks: dict[int, Tensor] | None = {} if self.picks is not None else None
        logits, hidden = self.model.step(
            tokens,
            self.state,
            slots,
            None,
            return_hidden=True,
            cache=self.cache,
            memory_kv=kv,
            picks=picks,
        )
        self.logits.index_copy_(0, slots, logits)
        if self.picks is not None and picks:
            self.picks.index_copy_(0, slots, torch.stack([picks[i] for i in self.reads], 1))
            self.picks_at.index_copy_(0, slots, pos)
        if self.seg_buf is not None:
            self.seg_buf[slots, pos % self.S] = hidden
        return torch.where(only.unsqueeze(-1), held, logits), sampler, flag

    def _decode_sample(self, logits: Tensor, slots: Tensor, flag: Tensor) -> Tensor:
        """The sampling part of _decode_rows: a byte per row, counters and last ids written."""
        out = sample(
            logits,
            self.temperature[slots],
            self.top_k[slots],
            self.top_p[slots],
            self.seed[slots],
            self.counter[slots],
            self.no_eos[slots],
        )
        self.counter.index_add_(0, slots, flag & 1)
        self.last_ids.index_copy_(0, slots, out)
        return out

    def _fused_sample(self, logits: Tensor, slots: Tensor, flag: Tensor) -> Tensor:
        """_decode_sample as one kernel: the gathers, the sampler and the writes."""
        return kernels.sample_step(
            logits,
            slots,
            flag,
            self.temperature,
            self.top_k,
            self.top_p,
            self.seed,
            self.counter,
            self.no_eos,
            self.last_ids,
        )

    def _rows(
        self,
        feeds: tuple[Feed, ...],
        spec: tuple[int, ...],
        view: np.ndarray,
        only: tuple[Feed, ...] = (),
    ) -> None:
        """Write the feeds' tokens, slots, positions and flags into view[:, :n] (4 rows of
        int64: the graphs' pinned host buffer, or the eager path's). Through NumPy, the fields
        read by C-level getters and the one-byte feeds joined into one bytes object: at a
        thousand sessions this is on every step's critical path (a torch.tensor of nested lists
        costs several times more, list comprehensions a third more, zip(*feeds) twice as much)."""
        n = len(feeds)
        view[0, :n] = np.frombuffer(b"".join(map(_DATA, feeds)), dtype=np.uint8)
        view[1, :n] = np.fromiter(map(_SLOT, feeds), dtype=np.int64, count=n)
        view[2, :n] = np.fromiter(map(_START, feeds), dtype=np.int64, count=n)
        view[3, :n] = np.fromiter(map(_SAMPLE, feeds), dtype=np.int64, count=n)
        if spec:
            view[3, list(spec)] += 2
        if only:  # sample-only rows after them: no token, flags 1 (counts) | 4 (feeds nothing)
            m = len(only)
            view[0, n : n + m] = 0
            view[1, n : n + m] = np.fromiter(map(_SLOT, only), dtype=np.int64, count=m)
            view[2, n : n + m] = np.fromiter(map(_START, only), dtype=np.int64, count=m)
            view[3, n : n + m] = 5

    def execute(self, plan: StepPlan) -> tuple[list[int], list[ClosedSegment]]:
        """Run a plan -> (sampled ids in plan.samples order, segments that closed)."""
        return self.collect(self.launch(plan))

    def uncount(self, slots: list[int]) -> None:
        """Take back one counter step of each slot (a speculative sample that was void)."""
        idx = self._to_device(torch.tensor(slots))
        self.counter.index_add_(0, idx, torch.full_like(idx, -1))

    @torch.no_grad()
    def launch(self, plan: StepPlan) -> Launched:
        """Queue a plan's step on the device; waits for nothing on a GPU (on a CPU it computes)."""
        for slot in plan.reset:
            self.reset_slot(slot)
        closed: list[ClosedSegment] = []
        parts: list[Tensor] = []
        if plan.decode or plan.sample_only:
            # Sample-only rows ride in the same captured step, after the decode rows.
            n = len(plan.decode) + len(plan.sample_only)
            if self.graphs is not None:
                self._rows(plan.decode, plan.spec, self.graphs.host_rows, plan.sample_only)
                decoded = self.graphs.launch(n)  # the bucket's rows: the first n are the plan's
                parts.append(decoded if n == len(decoded) else decoded[:n])
            else:
                self._rows(plan.decode, plan.spec, self._host_np, plan.sample_only)
                parts.append(self._decode_fn(self._host_rows[:, :n].to(self.device)))
            if self.seg_buf is not None:
                S = self.S
                for f in plan.decode:
                    if (f.start + 1) % S == 0:
                        closed.append(
                            ClosedSegment(
                                f.slot, f.start // S, f.start + 1 - S, self.seg_buf[f.slot].clone()
                            )
                        )
        by_len: dict[int, list[Feed]] = {}
        for f in plan.prefill:
            by_len.setdefault(len(f.data), []).append(f)
        for group in by_len.values():
            closed += self._prefill(group)
        late = [f for f in plan.prefill if f.sample]
        if late:
            slots = self._to_device(torch.tensor([f.slot for f in late]))
            ids = sample(
                self.logits[slots],
                self.temperature[slots],
                self.top_k[slots],
                self.top_p[slots],
                self.seed[slots],
                self.counter[slots],
                self.no_eos[slots],
            )
            self.counter.index_add_(0, slots, torch.ones_like(slots))
            self.last_ids.index_copy_(0, slots, ids)
            parts.append(ids)
        out = (parts[0] if len(parts) == 1 else torch.cat(parts)) if parts else None
        host: Tensor | None = None
        ready: torch.cuda.Event | None = None
        if out is not None and self._ids_host:
            i = self._launches % 2
            self._launches += 1
            if self._ids_host[i].shape[0] < out.shape[0]:
                self._ids_host[i] = torch.zeros(out.shape[0], dtype=torch.long).pin_memory()
            host = self._ids_host[i][: out.shape[0]]
            host.copy_(out, non_blocking=True)
            ready = self._ids_ready[i]
            ready.record()
        return Launched(plan, out, host, ready, closed)

    def collect(self, step: Launched) -> tuple[list[int], list[ClosedSegment]]:
        """Wait for a launched step -> (sampled ids in plan.samples order, segments that closed).
        Steps are collected in the order they were launched."""
        if step.ids is None:
            return [], step.closed
        if step.host is not None and step.ready is not None:
            step.ready.synchronize()  # sync: the one host sync of the step (the ids only)
            ids = step.host.tolist()
        else:
            ids = step.ids.tolist()  # sync: the one host sync of the step
        decode = step.plan.decode
        n, m = len(decode), len(step.plan.sample_only)
        # ids: decode rows, sample-only rows, then prefill samples -> plan.samples order
        # (sampling decode rows, prefill, sample-only).
        out = list(compress(ids[:n], map(_SAMPLE, decode)))
        return out + ids[n + m :] + ids[n : n + m], step.closed

    def _prefill(self, feeds: list[Feed]) -> list[ClosedSegment]:
        """Prefill feeds of one length together: one parallel pass over their slots."""
        slots, starts = self._to_device(torch.tensor([(f.slot, f.start) for f in feeds]).T)
        data = b"".join(f.data for f in feeds)
        tokens = self._to_device(
            torch.frombuffer(bytearray(data), dtype=torch.uint8).view(len(feeds), -1).long()
        )  # (G, n)
        memory = self._memory_for(slots, starts)
        if not self.capture:
            last = self.model.prefill(tokens, self.state, slots, memory)
            assert isinstance(last, Tensor)
            self.logits.index_copy_(0, slots, last)
            return []
        out = self.model.prefill(tokens, self.state, slots, memory, return_hidden=True)
        assert isinstance(out, tuple)
        logits, hidden = out
        self.logits.index_copy_(0, slots, logits)
        closed = []
        for f, h in zip(feeds, hidden, strict=True):
            closed += self._capture(f.slot, f.start, h)
        return closed

    def _capture(self, slot: int, start: int, hidden: Tensor) -> list[ClosedSegment]:
        """Write hidden (n, D) for context offsets start.. into the slot's segment buffer."""
        assert self.seg_buf is not None
        closed, i, n = [], 0, hidden.shape[0]
        while i < n:
            off = (start + i) % self.S
            take = min(self.S - off, n - i)
            self.seg_buf[slot, off : off + take] = hidden[i : i + take]
            i += take
            if off + take == self.S:
                end = start + i
                closed.append(
                    ClosedSegment(slot, end // self.S - 1, end - self.S, self.seg_buf[slot].clone())
                )
        return closed

    def last_read(self, slot: int) -> dict[str, object] | None:
        """What the slot's last decoded byte read, in the inspector's terms: every head of every
        read block picks its top k slots; per memory slot picked, its level, its place in the
        level counted from the newest slot (0), and how many heads picked it; and how many heads
        picked the null slot.
        Picks of empty slots (top-k wider than the memory) weigh nothing and are left out.
        After a new memory version is installed and before the slot decodes again, the read
        made in the earlier version is returned as it was, marked `earlier_version`.
        None when memory is off."""
        if self.picks is None or self.memory is None:
            return None
        at = int(self.picks_at[slot])
        if at < 0 and slot in self._read_log:
            return self._read_log[slot]
        blocks, heads, k = self.picks.shape[1:]
        out: dict[str, object] = {
            "at": at,
            "heads": blocks * heads,
            "k": k,
            "null": 0,
            "slots": [],
            "earlier_version": False,
        }
        if at < 0:
            return out
        level = self.memory.level[slot].tolist()
        valid = self.memory.mask[slot].tolist()
        first: dict[int, int] = {}
        for j, (lv, ok) in enumerate(zip(level, valid, strict=True)):
            if ok:
                first.setdefault(lv, j)  # read order: level by level, newest slot first
        hits: dict[tuple[int, int], int] = {}
        null = 0
        for j in self.picks[slot].flatten().tolist():
            if j < 0:
                null += 1
            elif valid[j]:
                key = (level[j], j - first[level[j]])
                hits[key] = hits.get(key, 0) + 1
        out["null"] = null
        out["slots"] = [
            {"level": lv, "from_newest": r, "heads": c} for (lv, r), c in sorted(hits.items())
        ]
        return out

    # ----- weights -----

    @torch.no_grad()
    def swap_weights(self, tensors: dict[str, Tensor]) -> None:
        """Copy new weights into the live parameters in place (captured graphs stay valid)."""
        params: dict[str, Tensor] = dict(self.model.named_parameters())
        params.update(dict(self.model.named_buffers()))
        for name, t in tensors.items():
            params[name].copy_(t)
        if self.cache is not None:
            refresh_decode_cache(self.model, self.cache)
        self._refresh_kv(slice(None))  # the memory keys/values came from the old weights

    def state_rows(self, slot: int) -> dict[str, Tensor]:
        return {k: v[slot].clone() for k, v in self.state.items()}

    def restore_slot(
        self, slot: int, rows: dict[str, Tensor], logits: Tensor, seed: int, counter: int
    ) -> None:
        """Load a session's saved state into a slot (between steps)."""
        self.reset_slot(slot)
        for k, v in self.state.items():
            v[slot].copy_(rows[k])
        self.logits[slot].copy_(logits)
        self.seed[slot] = seed
        self.counter[slot] = counter
