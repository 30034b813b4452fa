"""GPU correctness checks that go with the GPU benchmarks (python -m benchmarks.gpu_checks).

- CUDA-graph decode equals eager decode (sampled bytes and logits) for several batch buckets,
  also with torch.compile;
- the model's parallel form equals its recurrent form on the GPU (float32).
Prints one line per check and exits non-zero on a failure.
"""

from __future__ import annotations

import sys

import torch

from engine import EngineConfig
from engine.runner import Runner
from engine.scheduler import Feed, StepPlan
from model import ByteLM, ModelConfig
from model.decode_cache import build_decode_cache


def graph_vs_eager(name: str, batches: list[int], steps: int = 6, compile: bool = False) -> bool:
    torch.manual_seed(0)
    model = ByteLM(ModelConfig.named(name)).cuda().eval()
    ok = True
    for batch in batches:
        runners = [
            Runner(model, EngineConfig(max_slots=batch, device="cuda", cuda_graphs=False)),
            Runner(
                model,
                EngineConfig(max_slots=batch, device="cuda", cuda_graphs=True, compile=compile),
            ),
        ]
        init = {k: torch.randn_like(v) * 0.1 for k, v in runners[0].state.items()}
        for r in runners:
            for k, v in r.state.items():
                v.copy_(init[k])
            for slot in range(batch):
                r.seed[slot] = 1000 + slot
        gen = torch.Generator().manual_seed(batch)
        ids: list[list[list[int]]] = [[], []]
        for _ in range(steps):
            toks = torch.randint(0, 256, (batch,), generator=gen).tolist()
            plan = StepPlan(
                (),
                tuple(Feed(f"s{i}", i, bytes([t]), 10, True) for i, t in enumerate(toks)),
                (),
                (),
            )
            for j, r in enumerate(runners):
                ids[j].append(r.execute(plan)[0])
        diff = (runners[0].logits[:batch] - runners[1].logits[:batch]).abs().max().item()
        sdiff = max(
            (runners[0].state[k][:batch] - runners[1].state[k][:batch]).abs().max().item()
            for k in init
        )
        same = ids[0] == ids[1]
        ok &= same and diff < 1e-3 and sdiff < 1e-3
        label = "compiled graph" if compile else "graph"
        print(
            f"{label} vs eager {name} batch {batch:>4}: sampled equal {same}, max logit diff {diff:.2e}, state diff {sdiff:.2e}"
        )
    return ok


def parallel_vs_recurrent(name: str, T: int = 300) -> bool:
    torch.manual_seed(0)
    model = ByteLM(ModelConfig.named(name)).cuda().eval()
    tokens = torch.randint(0, 256, (2, T), device="cuda")
    with torch.no_grad():
        full = model(tokens)
        state = model.allocate_state(2)
        steps = torch.stack([model.step(tokens[:, t], state) for t in range(T)], 1)
    diff = (full - steps).abs().max().item()
    print(f"parallel vs recurrent {name} T={T}: max logit diff {diff:.2e}")
    return diff < 1e-3


def fused_vs_eager(
    name: str, batch: int = 8, steps: int = 20, dtype: torch.dtype = torch.float32
) -> bool:
    """The Triton step kernels (used when slots are given on CUDA) against the eager recurrences."""
    torch.manual_seed(0)
    model = ByteLM(ModelConfig.named(name)).cuda().eval()
    cache = build_decode_cache(model, dtype)
    pool_f = model.allocate_state(batch + 3)
    for v in pool_f.values():
        v.normal_(0, 0.1)
    slots = torch.tensor([batch + 2 - i for i in range(batch)], device="cuda")  # scattered rows
    pool_e = {k: v.index_select(0, slots).clone() for k, v in pool_f.items()}
    worst = 0.0
    with torch.no_grad():
        for _ in range(steps):
            tok = torch.randint(0, 256, (batch,), device="cuda")
            lf = model.step(tok, pool_f, slots, cache=cache)
            le = model.step(tok, pool_e)
            worst = max(worst, (lf - le).abs().max().item())
    sdiff = max((pool_f[k].index_select(0, slots) - pool_e[k]).abs().max().item() for k in pool_e)
    print(
        f"fused vs eager step {name} batch {batch} {dtype}: max logit diff {worst:.2e}, state diff {sdiff:.2e}"
    )
    if dtype != torch.float32:
        return True  # bf16 weights compute another function: reported, not held to float32's bound
    return worst < 1e-3 and sdiff < 1e-3


def main() -> int:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ok = parallel_vs_recurrent("tiny") & parallel_vs_recurrent("base", 200)
    ok &= (
        fused_vs_eager("tiny")
        & fused_vs_eager("base")
        & fused_vs_eager("base", dtype=torch.bfloat16)
    )
    ok &= graph_vs_eager("tiny", [1, 3, 8, 16]) & graph_vs_eager("base", [1, 16])
    if "--compile" in sys.argv:
        ok &= graph_vs_eager("base", [4], compile=True)
    print("gpu checks:", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
