"""SessionMemory: one session's hierarchy of compressed memory slots, one immutable version at a
time, and the consolidation policy that keeps it bounded.

store.py owns the slots, their metadata, the policy and the byte format of a version. It never
talks to NATS and never runs the network itself: compression is a callable it is given (the
model's `compress`), so the policy is testable with any cheap function.

The policy. A closed segment gives m slots, appended to level 1. Before a level takes slots it
cannot hold, its oldest `merge_group` slots are compressed into m slots of the next level (which
may cascade); at the top level those m slots stay at the top, in the oldest place. Every level
holds at most its capacity, so a session's memory is bounded by sum(capacities) slots whatever
its context length. Spans stay ordered: the top level covers the oldest bytes, level 1 the
newest, and together they cover every byte given to them, once.

Shapes: D width, m slots per compression, C a level's capacity, G merge_group, M slots a read sees.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from memory.config import MemoryConfig
from model.config import ModelConfig
from model.memread import NAMESPACE_LEVEL, MemorySlots, age_bucket

CompressFn = Callable[[Tensor, int], Tensor]  # hidden (1, L, D), target level -> slots (1, m, D)
FORMAT = "bwr-memory/1"
AGE_BUCKETS = ModelConfig().age_buckets  # the model's default; pass the config's own to to_slots


class SequenceError(ValueError):
    """A segment applied out of order: its sequence number is not last_seq + 1."""


class MemoryFormatError(ValueError):
    """Bytes that are not a memory version this code reads."""


@dataclass(frozen=True)
class Rows:
    """Valid slots of a level (or slots in flight), oldest first. n rows."""

    slots: Tensor  # (n, D) float32
    start: Tensor  # (n,) int64: first byte of the span the slot covers
    end: Tensor  # (n,) int64: one past the last byte of the span
    segment: Tensor  # (n,) int64: newest segment whose bytes the slot covers (ages count from it)

    @property
    def n(self) -> int:
        return self.slots.shape[0]

    @classmethod
    def empty(cls, dim: int) -> Rows:
        idx = torch.zeros(0, dtype=torch.long)
        return cls(torch.zeros(0, dim), idx, idx.clone(), idx.clone())

    def split(self, k: int) -> tuple[Rows, Rows]:
        """-> (oldest k rows, the rest)."""
        head = Rows(self.slots[:k], self.start[:k], self.end[:k], self.segment[:k])
        tail = Rows(self.slots[k:], self.start[k:], self.end[k:], self.segment[k:])
        return head, tail

    def cat(self, newer: Rows) -> Rows:
        return Rows(
            torch.cat([self.slots, newer.slots]),
            torch.cat([self.start, newer.start]),
            torch.cat([self.end, newer.end]),
            torch.cat([self.segment, newer.segment]),
        )


@dataclass(frozen=True)
class Level:
    """One level of one version: a fixed buffer of `capacity` rows, allocated when the level is
    first written (zero rows before), of which the first `count` are valid, oldest first."""

    capacity: int
    count: int
    buf: Rows  # capacity rows once written, 0 before; rows >= count are zero

    @property
    def rows(self) -> Rows:
        return self.buf.split(self.count)[0]

    def with_rows(self, rows: Rows) -> Level:
        assert rows.n <= self.capacity, f"{rows.n} slots in a level of {self.capacity}"
        pad = self.capacity - rows.n
        zi = torch.zeros(pad, dtype=torch.long)
        buf = rows.cat(Rows(rows.slots.new_zeros(pad, rows.slots.shape[1]), zi, zi, zi))
        return Level(self.capacity, rows.n, buf)

    def nbytes(self) -> int:
        b = self.buf
        return sum(t.numel() * t.element_size() for t in (b.slots, b.start, b.end, b.segment))


@dataclass(frozen=True)
class SessionMemory:
    """One immutable version of a session's (or a namespace's) memory."""

    dim: int  # D
    mem_slots: int  # m: slots one compression makes
    merge_group: int  # G: oldest slots of a full level compressed together
    levels: tuple[Level, ...]  # level 1 first, top last
    version: int = 0  # 0 is the empty memory; each applied segment makes the next
    last_seq: int = -1  # sequence number of the last applied segment
    skipped: int = 0  # seqs passed over without their slots (jobs given up as failing)

    @classmethod
    def empty(
        cls, dim: int, mem_slots: int, capacities: tuple[int, ...], merge_group: int
    ) -> SessionMemory:
        m, G = mem_slots, merge_group
        if m < 1 or G % m or 2 * m > G:
            raise ValueError(
                f"merge_group {G} must be a multiple of mem_slots {m} and at least {2 * m}"
            )
        for c in capacities:
            if c % m or c < G:
                raise ValueError(
                    f"level capacity {c} must be a multiple of mem_slots {m}"
                    f" and at least merge_group {G}"
                )
        levels = tuple(Level(c, 0, Rows.empty(dim)) for c in capacities)
        return cls(dim, m, G, levels)

    @classmethod
    def for_model(cls, model: ModelConfig, config: MemoryConfig) -> SessionMemory:
        if config.levels > model.mem_levels:
            raise ValueError(
                f"{config.levels} memory levels, the model embeds at most {model.mem_levels}"
            )
        return cls.empty(
            model.d_model,
            model.mem_slots,
            config.level_capacities,
            config.group_for(model.mem_slots),
        )

    # ----- the policy -----

    def apply_segment(
        self,
        seq: int,
        slots: Tensor,
        span: tuple[int, int],
        compress: CompressFn,
        *,
        segment: int | None = None,
    ) -> SessionMemory:
        """A closed segment's m slots (m, D) covering bytes span=(start, end) -> the next version.

        seq must be last_seq + 1; segment (the session's segment index, default seq) tags the
        slots for ages. Merges call compress(hidden (1, G, D), target level) -> (1, m, D)."""
        if seq != self.last_seq + 1:
            raise SequenceError(
                f"segment seq {seq} applied to version {self.version} whose last_seq is"
                f" {self.last_seq}; expected {self.last_seq + 1}"
            )
        if tuple(slots.shape) != (self.mem_slots, self.dim):
            raise ValueError(
                f"slots of shape {tuple(slots.shape)}, expected ({self.mem_slots}, {self.dim})"
            )
        start, end = span
        if not self.newest_end <= start < end:
            raise ValueError(
                f"span {span}: must be non-empty and start at or after byte {self.newest_end}"
            )
        seg = seq if segment is None else segment
        before = [lvl.rows for lvl in self.levels]
        work = list(before)
        self._push(work, 0, self._rows(slots, start, end, seg), compress)
        levels = tuple(  # a level the segment did not reach is shared with this version
            lvl if r is b else lvl.with_rows(r)
            for lvl, r, b in zip(self.levels, work, before, strict=True)
        )
        return replace(self, levels=levels, version=self.version + 1, last_seq=seq)

    def skip(self, seq: int) -> SessionMemory:
        """The next version without segment seq's slots (its job could not be applied)."""
        if seq != self.last_seq + 1:
            raise SequenceError(
                f"skip of seq {seq} on version {self.version} whose last_seq is {self.last_seq};"
                f" expected {self.last_seq + 1}"
            )
        return replace(self, version=self.version + 1, last_seq=seq, skipped=self.skipped + 1)

    def _rows(self, slots: Tensor, start: int, end: int, segment: int) -> Rows:
        meta = torch.tensor([start, end, segment], dtype=torch.long).repeat(self.mem_slots, 1)
        slots = slots.detach().to("cpu", torch.float32).contiguous()
        return Rows(slots, meta[:, 0].clone(), meta[:, 1].clone(), meta[:, 2].clone())

    def _push(self, work: list[Rows], i: int, rows: Rows, compress: CompressFn) -> None:
        """Append rows to level i (0-based), merging its oldest G slots upward first if full."""
        top = len(work) - 1
        if work[i].n + rows.n > self.levels[i].capacity:
            old, work[i] = work[i].split(self.merge_group)
            target = min(i + 2, top + 1)  # levels are numbered from 1; the top merges into itself
            out = compress(old.slots.unsqueeze(0), target)  # (1, m, D)
            if tuple(out.shape) != (1, self.mem_slots, self.dim):
                raise ValueError(
                    f"compress returned {tuple(out.shape)},"
                    f" expected (1, {self.mem_slots}, {self.dim})"
                )
            merged = self._rows(out[0], int(old.start[0]), int(old.end[-1]), int(old.segment.max()))
            if i < top:
                self._push(work, i + 1, merged, compress)
            else:
                work[i] = merged.cat(work[i])  # the top's merged slots cover its oldest bytes
        work[i] = work[i].cat(rows)

    # ----- reads -----

    @property
    def slot_count(self) -> int:
        return sum(lvl.count for lvl in self.levels)

    @property
    def newest_end(self) -> int:
        """One past the newest byte the memory covers (0 when empty)."""
        for lvl in self.levels:
            if lvl.count:
                return int(lvl.buf.end[lvl.count - 1])
        return 0

    @property
    def newest_segment(self) -> int:
        return max((int(lvl.rows.segment.max()) for lvl in self.levels if lvl.count), default=-1)

    def spans(self) -> list[tuple[int, int, int]]:
        """(level, start, end) of each group of m slots, oldest bytes first."""
        out: list[tuple[int, int, int]] = []
        for li in range(len(self.levels), 0, -1):
            r = self.levels[li - 1].rows
            for k in range(0, r.n, self.mem_slots):
                out.append((li, int(r.start[k]), int(r.end[k])))
        return out

    def _ordered(self) -> tuple[Tensor, Tensor, Tensor]:
        """Read order: level 1 first, newest slot first within a level -> slots (n, D), level
        (n,), segment (n,). Truncating from the end drops the oldest, coarsest slots first."""
        slots, level, segment = [], [], []
        for li, lvl in enumerate(self.levels, start=1):
            r = lvl.rows
            slots.append(r.slots.flip(0))
            segment.append(r.segment.flip(0))
            level.append(torch.full((r.n,), li, dtype=torch.long))
        return torch.cat(slots), torch.cat(level), torch.cat(segment)

    def to_slots(
        self,
        capacity: int,
        current_segment: int,
        namespace: SessionMemory | None = None,
        *,
        age_buckets: int = AGE_BUCKETS,
    ) -> MemorySlots:
        """What the engine's read sees: batch 1, `capacity` slots (mask False past the valid ones),
        ages in segments since each slot's segment, bucketed. A namespace memory follows the
        session's slots as the read-only level NAMESPACE_LEVEL, aged against its own newest
        segment. More slots than capacity: the oldest, coarsest ones are left out."""
        slots, level, segment = self._ordered()
        age = (current_segment - segment).clamp(min=0)
        if namespace is not None:
            ns_slots, _, ns_segment = namespace._ordered()
            slots = torch.cat([slots, ns_slots])
            level = torch.cat([level, torch.full_like(ns_segment, NAMESPACE_LEVEL)])
            age = torch.cat([age, (namespace.newest_segment - ns_segment).clamp(min=0)])
        n = min(capacity, slots.shape[0])
        out = MemorySlots.empty(1, self.dim, capacity=capacity)
        out.slots[0, :n] = slots[:n]
        out.level[0, :n] = level[:n]
        out.age[0, :n] = age_bucket(age[:n], age_buckets)
        out.mask[0, :n] = True
        return out

    def written(self, capacity: int) -> Tensor:
        """(capacity,) long: each slot's segment in to_slots order (0 past the valid ones), for an
        engine that computes ages itself."""
        _, _, segment = self._ordered()
        out = torch.zeros(capacity, dtype=torch.long)
        n = min(capacity, segment.shape[0])
        out[:n] = segment[:n]
        return out

    def level_summaries(self) -> list[dict[str, int]]:
        """Per level: slots used, capacity, bytes covered and the byte range [start, end)."""
        out = []
        for li, lvl in enumerate(self.levels, start=1):
            r = lvl.rows
            covered = int((r.end - r.start).sum()) // self.mem_slots  # m slots share each span
            first, last = (int(r.start[0]), int(r.end[-1])) if r.n else (0, 0)
            out.append(
                dict(
                    level=li,
                    slots=r.n,
                    capacity=lvl.capacity,
                    bytes_covered=covered,
                    start=first,
                    end=last,
                )
            )
        return out

    def summary(self) -> dict[str, object]:
        levels = self.level_summaries()
        return dict(
            version=self.version,
            last_seq=self.last_seq,
            skipped=self.skipped,
            slots=self.slot_count,
            max_slots=sum(lvl.capacity for lvl in self.levels),
            bytes_covered=sum(lv["bytes_covered"] for lv in levels),
            nbytes=self.nbytes(),
            levels=levels,
        )

    def nbytes(self) -> int:
        """Bytes this version holds: each written level's fixed buffer (slots and metadata)."""
        return sum(lvl.nbytes() for lvl in self.levels)

    def same_as(self, other: SessionMemory) -> bool:
        """Bit-exact equality of two versions (every buffer, every number)."""
        head = (
            self.dim,
            self.mem_slots,
            self.merge_group,
            self.version,
            self.last_seq,
            self.skipped,
        )
        if head != (
            other.dim,
            other.mem_slots,
            other.merge_group,
            other.version,
            other.last_seq,
            other.skipped,
        ):
            return False
        if len(self.levels) != len(other.levels):
            return False
        for a, b in zip(self.levels, other.levels, strict=True):
            if (a.capacity, a.count) != (b.capacity, b.count):
                return False
            for x, y in zip(_tensors(a.buf), _tensors(b.buf), strict=True):
                if x.dtype != y.dtype or x.shape != y.shape or _raw(x) != _raw(y):
                    return False
        return True

    # ----- bytes -----

    def to_bytes(self) -> bytes:
        """safetensors bytes of this version: the valid rows of each level, numbers in metadata."""
        tensors: dict[str, Tensor] = {}
        for li, lvl in enumerate(self.levels, start=1):
            for name, t in zip(
                ("slots", "start", "end", "segment"), _tensors(lvl.rows), strict=True
            ):
                tensors[f"l{li}.{name}"] = t.contiguous()
        meta = dict(
            format=FORMAT,
            dim=self.dim,
            mem_slots=self.mem_slots,
            merge_group=self.merge_group,
            version=self.version,
            last_seq=self.last_seq,
            skipped=self.skipped,
            capacities=[lvl.capacity for lvl in self.levels],
            allocated=[lvl.buf.n > 0 for lvl in self.levels],
        )
        return st_save(tensors, metadata={"memory": json.dumps(meta)})

    @classmethod
    def from_bytes(cls, data: bytes) -> SessionMemory:
        try:
            meta = json.loads(st_metadata(data)["memory"])
            tensors = st_load(data)
            if meta.get("format") != FORMAT:
                raise MemoryFormatError(
                    f"memory format {meta.get('format')!r}, this code reads {FORMAT}"
                )
            mem = cls.empty(
                meta["dim"], meta["mem_slots"], tuple(meta["capacities"]), meta["merge_group"]
            )
            levels = []
            for li, (lvl, allocated) in enumerate(
                zip(mem.levels, meta["allocated"], strict=True), start=1
            ):
                rows = Rows(*(tensors[f"l{li}.{n}"] for n in ("slots", "start", "end", "segment")))
                levels.append(lvl.with_rows(rows) if allocated else lvl)
        except MemoryFormatError:
            raise
        except Exception as e:  # corrupt bytes surface as many kinds of error; say which
            raise MemoryFormatError(f"not a memory version ({type(e).__name__}: {e})") from None
        return replace(
            mem,
            levels=tuple(levels),
            version=meta["version"],
            last_seq=meta["last_seq"],
            skipped=meta["skipped"],
        )


def _tensors(r: Rows) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return r.slots, r.start, r.end, r.segment


def _raw(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().numpy().tobytes()


def st_metadata(data: bytes) -> dict[str, str]:
    """The __metadata__ of safetensors bytes (the torch loader drops it)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta: dict[str, str] = header.get("__metadata__", {})
    return meta
