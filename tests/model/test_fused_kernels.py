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
@pytest.mark.parametrize("batch", [1, 3, 5])  # up to TUNING["gemv_rows"] rows: GEMV projections
def test_fused_step_equals_the_eager_step(name: str, batch: int) -> None:
    torch.manual_seed(0)
    model = ByteLM(ModelConfig.named(name)).cuda().eval()
    cache = build_decode_cache(model)
    rows = 9
    pool = model.allocate_state(rows, "cuda")
    for v in pool.values():
        v.normal_(0, 0.1)
    slots = torch.tensor([7, 2, 5, 0, 8][:batch], device="cuda")
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("n, k", [(2304, 768), (768, 2048), (4096, 768), (260, 768), (37, 100)])
def test_gemv_equals_a_float64_product(dtype: torch.dtype, rows: int, n: int, k: int) -> None:
    """Every output of every row, ragged N and K included, within the weight dtype's rounding."""
    gen = torch.Generator(device="cuda").manual_seed(n * k + rows)
    x = torch.randn(rows, k, device="cuda", generator=gen)
    w = (torch.randn(n, k, device="cuda", generator=gen) / k**0.5).to(dtype)
    got = kernels.gemv(x, w)
    assert got.shape == (rows, n) and got.dtype == dtype
    want = x.to(dtype).double() @ w.double().T
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "norm, glu, res", [(True, False, False), (False, True, True), (True, False, True)]
)
def test_gemv_makes_its_input_and_adds_the_residual(
    dtype: torch.dtype, norm: bool, glu: bool, res: bool
) -> None:
    """What the fused decode asks of it: the RMS norm of the row (in-projections, the head), the
    SwiGLU gate of an up-projection's output (down-projection), the residual added in float32."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    n, k = 2304, 768
    x = torch.randn(1, 2 * k if glu else k, device="cuda", generator=gen)
    w = (torch.randn(n, k, device="cuda", generator=gen) / k**0.5).to(dtype)
    nw = torch.rand(k, device="cuda", generator=gen) + 0.5
    r = torch.randn(1, n, device="cuda", generator=gen)
    got = kernels.gemv(x, w, nw if norm else None, 1e-6, glu, r if res else None)
    h = x.double()
    if glu:
        h = torch.nn.functional.silu(h[:, :k]) * h[:, k:]
    if norm:
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * nw.double()
    want = h @ w.double().T + (r.double() if res else 0)
    assert got.dtype == (torch.float32 if res else dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_gemv_under_compile_in_a_graph() -> None:
    """The op traces under torch.compile and replays in a CUDA graph, reading its input anew:
    the replay gives what the op gives called directly on the new input."""
    w = torch.randn(768, 320, device="cuda").to(torch.bfloat16)
    nw = torch.rand(320, device="cuda") + 0.5
    x = torch.randn(1, 320, device="cuda")
    fn = torch.compile(lambda t: kernels.gemv(t * 2, w, nw, 1e-6).float())
    fn(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(x)
    x.copy_(torch.randn(1, 320, device="cuda"))
    graph.replay()
    want = kernels.gemv(x * 2, w, nw, 1e-6).float()
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
