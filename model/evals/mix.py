"""mix.py: eval tasks mixed into training batches. A chosen fraction of the rows of each batch is
replaced by a generated eval case of exactly the row's length, answers included (prompt, answer,
next prompt, next answer, ...), so a model trained on the mix learns to answer the questions the
evals ask.

Cases are seeded from TRAIN_SEED up, far above the eval runner's seeds (seed + i for i < n), so
no case the eval scores is trained on. Depths are drawn uniformly. The mix never changes a row's
shape or any row it does not replace; it knows nothing about the optimiser.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from model.evals.tasks import TASKS, Case, filler

TRAIN_SEED = 1 << 30  # first training case seed; `bwr eval` uses --seed (default 0) .. + n
HEADROOM = 64  # bytes kept free for answers and later turns; filled by leading filler


Options = dict[str, dict[str, tuple[int, int]]]  # task -> generator keyword -> [lo, hi]


def task_options(task: str) -> list[str]:
    """The keywords a task's generator takes beyond (length, depth, seed): MQAR's pairs and
    queries, the pass key's digits, the facts' n_facts."""
    params = inspect.signature(TASKS[task]).parameters
    return [k for k in params if k not in ("length", "depth", "seed")]


def parse_mix_spec(text: str) -> tuple[dict[str, float], Options]:
    """ "passkey=0.3,mqar=0.2:pairs=2-8:queries=2" -> ({"passkey": 0.3, "mqar": 0.2},
    {"mqar": {"pairs": (2, 8), "queries": (2, 2)}}). Each task is TASK=FRACTION, optionally
    followed by :KEYWORD=N or :KEYWORD=LO-HI for its generator (a range is drawn uniformly per
    case); fractions sum to at most 1."""
    out: dict[str, float] = {}
    options: Options = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        head, *opts = part.split(":")
        name, _, frac = head.partition("=")
        if name not in TASKS:
            raise ValueError(f"--mix {part!r}: unknown task {name!r}; known: {sorted(TASKS)}")
        try:
            out[name] = float(frac)
        except ValueError:
            raise ValueError(f"--mix {part!r}: want TASK=FRACTION, e.g. passkey=0.3") from None
        if not 0 <= out[name] <= 1:
            raise ValueError(f"--mix {part!r}: a fraction lies in [0, 1]")
        for opt in opts:
            key, _, value = opt.partition("=")
            if key not in task_options(name):
                raise ValueError(f"--mix {part!r}: {name} takes {task_options(name)}, not {key!r}")
            lo, _, hi = value.partition("-")
            try:
                bounds = (int(lo), int(hi or lo))
            except ValueError:
                raise ValueError(f"--mix {part!r}: want {key}=N or {key}=LO-HI") from None
            if not 1 <= bounds[0] <= bounds[1]:
                raise ValueError(f"--mix {part!r}: want 1 <= LO <= HI in {key}={value}")
            options.setdefault(name, {})[key] = bounds
    if sum(out.values()) > 1 + 1e-9:
        raise ValueError(f"--mix {text!r}: fractions sum to {sum(out.values()):g} > 1")
    return out, options


def case_bytes(case: Case) -> bytes:
    """A case as one training sequence: every turn's prompt followed by its answer."""
    return b"".join(p + a for p, a in case.turns)


def case_row(task: str, length: int, depth: float, seed: int, **task_args: Any) -> bytes:
    """Exactly `length` bytes: a case of `task` generated `HEADROOM` bytes short, led by filler
    up to the length (the answers stay last, after their questions). `task_args` go to the
    generator (MQAR's pairs and queries, say)."""
    return case_spans(task, length, depth, seed, **task_args)[0]


def case_spans(
    task: str, length: int, depth: float, seed: int, **task_args: Any
) -> tuple[bytes, list[tuple[int, int]]]:
    """case_row's bytes and the [start, end) of each answer in them."""
    case = TASKS[task](length - HEADROOM, depth, seed, **task_args)
    data = case_bytes(case)
    if len(data) > length:
        raise ValueError(f"a {task} case of {len(data)} bytes does not fit a {length}-byte row")
    at, spans = length - len(data), []
    for prompt, answer in case.turns:
        at += len(prompt)
        spans.append((at, at + len(answer)))
        at += len(answer)
    return filler(length - len(data), seed) + data, spans


class Mixer:
    """Replaces rows of (B, T + 1) batches by eval cases, each row with probability of its task's
    fraction; seeded, so the same batches and seed give the same mix. A row too short to hold a
    case of the task drawn for it (a curriculum's first stages, say) stays text and is counted in
    `too_short`: the run goes on, and mixes that task in once its rows are long enough.

    case_len > 0 fills a replaced row with as many cases of case_len bytes as fit (filler leads
    the remainder), each with its own depth and seed: more answers per byte trained. `mix`
    returns, beside the batch, where the answers are, so the loss can weight them.

    options (parse_mix_spec's) set a task's generator keywords, each drawn per case from its
    [lo, hi] (MQAR with 2 to 8 pairs, say); a task without options takes its defaults."""

    def __init__(
        self,
        mix: dict[str, float],
        seed: int = 0,
        case_len: int = 0,
        options: Options | None = None,
    ) -> None:
        self.mix = {k: v for k, v in mix.items() if v > 0}
        self.case_len = case_len
        self.options = options or {}
        self.rng = random.Random(f"mix/{seed}")
        self.next_seed = TRAIN_SEED + seed * (1 << 20)  # disjoint per training seed
        self.replaced: dict[str, int] = dict.fromkeys(self.mix, 0)
        self.too_short: dict[str, int] = dict.fromkeys(self.mix, 0)
        self.rows = 0

    def pick(self) -> str | None:
        r = self.rng.random()
        for task, frac in self.mix.items():
            if r < frac:
                return task
            r -= frac
        return None

    def __call__(self, batch: Tensor) -> Tensor:
        return self.mix_batch(batch)[0]

    def mix_batch(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        """-> (the mixed batch, a bool mask of its shape marking the bytes of answers)."""
        out, answers = batch.clone(), torch.zeros(batch.shape, dtype=torch.bool)
        width = out.shape[1]
        for i in range(out.shape[0]):
            self.rows += 1
            task = self.pick()
            if task is None:
                continue
            size = self.case_len if 0 < self.case_len < width else width
            k = width // size
            parts, spans, at = [filler(width - k * size, self.next_seed)], [], width - k * size
            try:
                for _ in range(k):
                    depth, seed = self.rng.random(), self.next_seed
                    self.next_seed += 1
                    kw = {
                        k: self.rng.randint(lo, hi)
                        for k, (lo, hi) in self.options.get(task, {}).items()
                    }
                    row, sp = case_spans(task, size, depth, seed, **kw)
                    parts.append(row)
                    spans += [(at + a, at + b) for a, b in sp]
                    at += size
            except ValueError:  # the row cannot hold this task's items and question
                self.too_short[task] += 1
                continue
            out[i] = torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8).long()
            for a, b in spans:
                answers[i, a:b] = True
            self.replaced[task] += 1
        return out, answers

    def batches(
        self, batches: Iterator[Tensor], answers: bool = False
    ) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        """The mixed batches; with answers=True, (batch, answer mask) pairs for the loss."""
        for b in batches:
            yield self.mix_batch(b) if answers else self(b)
