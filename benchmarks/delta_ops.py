"""Ops launched by the delta rule's chunked path: `python -m benchmarks.delta_ops [--json F]`.

Builds one `DeltaMixer` of a config (`base`: D 768, 12 heads of 64, chunk 64) and runs forward +
backward on random float32 inputs on the CPU (batch 2, T 1024; the state out of the last byte is
kept, as segmented training keeps it, and gets a gradient too) under `torch.profiler`, for each
variant of model.delta's switches (VARIANTS below, each setting all four): `loop` (CHUNKS "loop",
INVERSE "substitute": the defaults), `scan` (the state scan, chunks paired, the inverse by doubling:
the op cuts), and each of the scan's parts alone. Two scopes:
`mixer` (the whole DeltaMixer: projections, conv, norm, gate) and `chunked` (delta_rule_chunked
alone, on leaf q, k, v, log a, b).

What is counted (eager). An op is an `aten::` event that is not metadata only and holds no other
op (so `matmul` counts as its `bmm`, `stack` as its `cat`, `contiguous` as its `copy_`); a matmul
or a sum counts once, with nothing it runs inside it (on the CPU a strided `baddbmm_` runs one
`addmm_` per matrix and a sum starts with a `fill_`; a GPU runs one kernel). Metadata only: views
(view, reshape, transpose, select, slice, expand, as_strided, ...) and allocations without a fill
(empty, empty_like, new_empty, ...); left out too, a `copy_` into a 0-dim tensor (a Python scalar
wrapped for an op: no kernel on a GPU). Each op is about one kernel launch on a GPU.
- matmuls: mm, bmm, addmm, baddbmm, addbmm and the in-place ones (under matmul, linear, einsum,
  the backward formulas);
- copies: copy_ (clone, contiguous, reshape of a strided view, pad, to, writes into slices) and
  cat (cat, stack); copy_MB: the bytes they write, from the destination's shape for copy_ (at 4
  bytes an element: everything here is float32), the memory the op allocates for cat;
- ms: CPU wall time of forward + backward without the profiler, median of --repeat runs after one
  warm-up, on --threads threads (1 by default, for stable numbers);
- saved_MB: what autograd keeps for backward (distinct storages, inputs and weights included).
With --compiled (slow: a minute or two a row), the step compiled by inductor as the trainer
compiles its blocks (on this CPU), counted from the generated code: c_fused (fused kernels),
c_extern (extern kernels: the matmuls), c_library (library and fallback ops; each bwr::state_scan
call runs 2 n + 3 kernels of its own, its backward 2 n + 6, for n chunks).

JSON (--json): {"config", "batch", "T", "threads", "torch", "rows": [{"variant", "scope", "ops",
"matmuls", "copies", "copy_MB", "ms", "saved_MB", "top": {op: count, the ten most frequent},
and with --compiled "c_fused", "c_extern", "c_library"}]}.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.model_speed import timed
from model import delta
from model.config import ModelConfig
from model.delta import DeltaMixer, delta_rule_chunked

METADATA = {
    "empty", "empty_like", "empty_strided", "view", "_unsafe_view", "_reshape_alias", "reshape",
    "as_strided", "transpose", "t", "permute", "expand", "expand_as", "unsqueeze", "squeeze",
    "slice", "select", "narrow", "diagonal", "detach", "alias", "unflatten", "flatten", "movedim",
    "split", "split_with_sizes", "chunk", "unbind", "resolve_conj", "resolve_neg", "lift_fresh",
    "view_as", "contiguous", "numpy_T", "mT", "_to_copy", "to", "clone", "result_type",
    "new_empty", "new_empty_strided", "resize_", "scalar_tensor",
}  # fmt: skip
MATMULS = {"mm", "bmm", "addmm", "baddbmm", "addbmm", "addmm_", "baddbmm_"}
WHOLE = MATMULS | {"sum", "mean"}  # one op each, whatever the CPU runs inside them
COPIES = {"copy_", "cat"}

# Each variant sets the four switches of model.delta.
_LOOP = {"SOLVE": "inverse", "CHUNKS": "loop", "INVERSE": "substitute", "PAIR": True}
VARIANTS: dict[str, dict[str, Any]] = {
    "loop": _LOOP,  # the defaults
    "scan": {**_LOOP, "CHUNKS": "scan", "INVERSE": "doubling"},
    "scan-unpaired": {**_LOOP, "CHUNKS": "scan", "INVERSE": "doubling", "PAIR": False},
    "scan-substitute": {**_LOOP, "CHUNKS": "scan"},
    "loop-doubling": {**_LOOP, "INVERSE": "doubling"},
    "triangular": {**_LOOP, "SOLVE": "triangular"},
}


def count(fn: Callable[[], None]) -> dict[str, Any]:
    """Runs fn under the profiler; the counts defined in the module docstring."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, profile_memory=True) as p:
        fn()
    ops: Counter[str] = Counter()
    copy_bytes = 0
    for e in p.events():
        name = e.name.removeprefix("aten::")
        if name == e.name or name in METADATA or _inside_whole(e):
            continue
        if name not in WHOLE and any(map(_works, e.cpu_children)):
            continue
        if name == "copy_":
            dst = e.input_shapes[0] if e.input_shapes else []
            if not dst:
                continue  # a wrapped Python scalar
            copy_bytes += 4 * _numel(dst)
        elif name == "cat":
            copy_bytes += max(e.cpu_memory_usage, 0)
        ops[name] += 1
    return dict(
        ops=sum(ops.values()),
        matmuls=sum(n for k, n in ops.items() if k in MATMULS),
        copies=sum(n for k, n in ops.items() if k in COPIES),
        copy_MB=round(copy_bytes / 2**20, 1),
        top=dict(ops.most_common(10)),
    )


def _works(e: Any) -> bool:
    """Whether an event is, or holds, an op that is not metadata only."""
    name = e.name.removeprefix("aten::")
    return name != e.name and (name not in METADATA or any(map(_works, e.cpu_children)))


def _inside_whole(e: Any) -> bool:
    """Whether an event runs inside a matmul or a reduction (the CPU's way to do one: one addmm_
    per matrix of a strided baddbmm_, a fill_ before a sum; a GPU runs one kernel)."""
    while (e := e.cpu_parent) is not None:
        if e.name.removeprefix("aten::") in WHOLE:
            return True
    return False


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def saved_mb(fn: Callable[[], None]) -> float:
    """Megabytes autograd keeps for backward in fn's forward: distinct storages of the saved
    tensors (inputs and weights included), as the memory a training step holds."""
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        sizes[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return round(sum(sizes.values()) / 2**20, 1)


def compiled(fn: Callable[[], None]) -> dict[str, int]:
    """Compiles fn (inductor, as the trainer compiles its blocks; on the CPU here) and counts the
    calls in the generated wrappers of forward and backward: fused kernels, extern kernels
    (matmuls) and library ops (bwr::state_scan and its backward, which run 2 n + 3 and 2 n + 6
    kernels of their own; aten fallbacks such as cumsum)."""
    import torch._dynamo
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    _, codes = run_and_get_code(torch.compile(fn))
    counts = {"fused": 0, "extern": 0, "library": 0}
    for code in codes:
        for line in code[code.index("def call(") :].splitlines():
            call = CALL.match(line)
            if call:
                kind = call.group(1)
                counts["extern" if kind.startswith("extern") else
                       "library" if kind.startswith("torch.ops") else "fused"] += 1  # fmt: skip
    return counts


CALL = re.compile(
    r"\s*(?:\w+ = )?(cpp_fused_\w+|triton_\w+|extern_kernels\.\w+|torch\.ops\.\w+\.\w+)[.(]"
)


def steps(cfg: ModelConfig, batch: int, T: int) -> dict[str, Callable[[], None]]:
    """One forward + backward of each scope, on fixed random inputs and output gradients."""
    torch.manual_seed(0)
    mixer = DeltaMixer(cfg)
    x = torch.randn(batch, T, cfg.d_model, requires_grad=True)
    gy = torch.randn(batch, T, cfg.d_model)
    H, d = cfg.delta_heads, cfg.delta_head_dim
    gS = torch.randn(batch, H, d, d)
    leaves = [x, *mixer.parameters()]

    def mixer_step() -> None:
        y, new = mixer(x, None, want_state=True)
        torch.autograd.grad((y, new["S"]), leaves, (gy, gS))  # no accumulation into .grad

    with torch.no_grad():
        q, k, v, log_a, b, _ = mixer._project(x, None, step=False)
    inputs = [t.transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v, log_a, b)]
    go = torch.randn(batch, H, T, d)

    def chunked_step() -> None:
        o, S = delta_rule_chunked(*inputs, None, cfg.delta_chunk)
        torch.autograd.grad((o, S), inputs, (go, gS))

    return {"mixer": mixer_step, "chunked": chunked_step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="base")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names")
    ap.add_argument("--scopes", default="mixer,chunked")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--compiled", action="store_true", help="also count compiled launches")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ModelConfig.named(args.config)
    fns = steps(cfg, args.batch, args.T)
    rows = []
    for variant in args.variants.split(","):
        with delta.switched(**VARIANTS[variant]):
            for scope in args.scopes.split(","):
                row = dict(variant=variant, scope=scope, **count(fns[scope]))
                row["ms"] = round(1e3 * timed(fns[scope], 1, args.repeat), 1)
                row["saved_MB"] = saved_mb(fns[scope])
                rows.append(row)
    for row in rows if args.compiled else []:  # after all eager runs, which compiling perturbs
        with delta.switched(**VARIANTS[row["variant"]]):
            row |= {f"c_{k}": n for k, n in compiled(fns[row["scope"]]).items()}
    cols = ["variant", "scope", "ops", "matmuls", "copies", "copy_MB", "ms", "saved_MB"]
    if args.compiled:
        cols += ["c_fused", "c_extern", "c_library"]
    print(f"{args.config}: batch {args.batch}, T {args.T}, {args.threads} thread(s)")
    print("  ".join(f"{c:>10}" for c in cols))
    for row in rows:
        print("  ".join(f"{row[c]!s:>10}" for c in cols))
    for row in rows:
        top = ", ".join(f"{k} {n}" for k, n in row["top"].items())
        print(f"{row['variant']}/{row['scope']}: {top}")
    if args.json:
        out = dict(
            config=args.config, batch=args.batch, T=args.T, threads=args.threads,
            torch=torch.__version__, rows=rows,
        )  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
