"""The fused GPU decode (one Triton kernel per mixer, model/kernels.py) against the eager
recurrent step it replaces: same logits and states over many bytes, at scattered pool rows,
rows outside the step untouched. Runs where a CUDA device and Triton exist (benchmarks/gpu_checks.py
holds the same on the benchmark machine)."""

from __future__ import annotations

import pytest
import torch

from model import ByteLM, ModelConfig, kernels
from model.decode_cache import build_decode_cache

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and kernels.HAVE_TRITON), reason="needs CUDA and Triton"
    ),
]


@pytest.fixture(autouse=True)
def _float32_matmuls() -> object:
    """Exact float32 matmuls on both sides (TF32 would blur the comparison)."""
    was = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = was


@pytest.mark.parametrize("name", ["tiny", "small"])  # small: head width 80, not a power of two
def test_fused_step_equals_the_eager_step(name: str) -> None:
    torch.manual_seed(0)
    model = ByteLM(ModelConfig.named(name)).cuda().eval()
    cache = build_decode_cache(model)
    batch, rows = 5, 9
    pool = model.allocate_state(rows, "cuda")
    for v in pool.values():
        v.normal_(0, 0.1)
    slots = torch.tensor([7, 2, 5, 0, 8], device="cuda")
    eager = {k: v.index_select(0, slots).clone() for k, v in pool.items()}
    others = [r for r in range(rows) if r not in slots.tolist()]
    before = {k: v[others].clone() for k, v in pool.items()}
    gen = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():
        for _ in range(24):
            tokens = torch.randint(0, 256, (batch,), device="cuda", generator=gen)
            fused = model.step(tokens, pool, slots, cache=cache)
            ref = model.step(tokens, eager)
            torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4)
    for k, v in eager.items():
        torch.testing.assert_close(pool[k].index_select(0, slots), v, rtol=1e-4, atol=1e-4, msg=k)
        assert torch.equal(pool[k][others], before[k]), k
