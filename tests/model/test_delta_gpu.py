"""The chunked delta rule on a GPU (model/delta.py), where the CPU tests can only emulate it: real
TF32 tensor-core matmuls, cuBLAS batched products and Inductor's Triton code.

At the base config's head size (64) and chunk (64), float32 inputs, TF32 matmuls on as the trainer
sets them:
(a) every path (benchmarks/delta_ops.py's variants: the per-chunk loop, the scan, paired or not;
    the inverse by substitution, by doubling, the triangular solve) stays within float32-and-TF32
    error of the float64 recurrence, outputs, final state and gradients, the scan within 1.5x the
    loop;
(b) torch.compile (Inductor, fullgraph) computes what the eager code does, forward and backward,
    by the scan paired or not;
(c) the state scan is a sound library op on CUDA tensors (opcheck).
Needs a GPU (skipped without one)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from benchmarks.delta_ops import VARIANTS
from model import delta
from model.delta import delta_rule_chunked, delta_rule_recurrent

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

B, H, T, DK, CHUNK = 2, 4, 1000, 64, 64  # 16 chunks, the last padded

PATHS = VARIANTS


def inputs(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(generator=gen, dtype=torch.float64)
    q = F.normalize(torch.randn(B, H, T, DK, **f64), dim=-1)
    k = F.normalize(torch.randn(B, H, T, DK, **f64), dim=-1)
    v = torch.randn(B, H, T, DK, **f64)
    log_a = F.logsigmoid(torch.randn(B, H, T, **f64) + 4)
    b = torch.rand(B, H, T, **f64)
    S = 0.1 * torch.randn(B, H, DK, DK, **f64)
    return [x.to("cuda", dtype).requires_grad_() for x in (q, k, v, log_a, b, S)]


def loss(o: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    return o.square().sum() + S.square().sum()


def relative(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm()).item()


@pytest.fixture
def tf32() -> Iterator[None]:
    was = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32 = was


def test_every_path_is_accurate_under_tf32(tf32: None) -> None:
    ref_in = inputs(torch.float64)
    o_ref, S_ref = delta_rule_recurrent(*ref_in)
    refs = (o_ref, S_ref, *torch.autograd.grad(loss(o_ref, S_ref), ref_in))
    errors: dict[str, list[float]] = {}
    for name, switches in PATHS.items():
        x = inputs(torch.float32)
        with delta.switched(**switches):
            o, S = delta_rule_chunked(*x, CHUNK)
            got = (o, S, *torch.autograd.grad(loss(o, S), x))
        errors[name] = [relative(g, r) for g, r in zip(got, refs, strict=True)]
    for name, errs in errors.items():
        assert max(errs) < 1e-2, (name, errs)
    for scan, loop in zip(errors["scan"], errors["loop"], strict=True):
        assert scan <= 1.5 * loop + 1e-6, errors


# Dynamo instantiates autograd Functions (_InverseSolve) as it traces them, and warns.
@pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning")
@pytest.mark.parametrize("pair", [True, False])
def test_inductor_compiles_the_chunked_form_and_agrees(pair: bool) -> None:
    """Compiled and eager code both within float32 error of the float64 recurrence, outputs and
    gradients, the compiled no further from it than twice the eager (Inductor may reassociate
    sums, but not lose accuracy)."""
    ref_in = inputs(torch.float64, seed=1)
    o_ref, S_ref = delta_rule_recurrent(*ref_in)
    refs = (o_ref, S_ref, *torch.autograd.grad(loss(o_ref, S_ref), ref_in))
    errors = {}
    with delta.switched(**{**VARIANTS["scan"], "PAIR": pair}):
        compiled = torch.compile(delta_rule_chunked, fullgraph=True)
        for name, fn in (("eager", delta_rule_chunked), ("compiled", compiled)):
            x = inputs(torch.float32, seed=1)
            o, S = fn(*x, CHUNK)
            got = (o, S, *torch.autograd.grad(loss(o, S), x))
            errors[name] = [relative(g, r) for g, r in zip(got, refs, strict=True)]
    print(errors)
    assert max(errors["eager"]) < 1e-3, errors
    for c, e in zip(errors["compiled"], errors["eager"], strict=True):
        assert c <= 2 * e + 1e-6, errors


def test_state_scan_is_a_sound_library_op_on_cuda() -> None:
    gen = torch.Generator().manual_seed(0)
    n, dv, dk = 5, 8, 8
    for initial in (True, False):
        S0 = torch.randn(2, 3, dv, dk, generator=gen) if initial else None
        g = torch.rand(2, 3, n, generator=gen)
        W = 0.5 * torch.randn(2, 3, n, dk, dk, generator=gen)
        K = torch.randn(2, 3, n, dv, dk, generator=gen)
        args = [None if t is None else t.cuda().requires_grad_() for t in (S0, g, W, K)]
        torch.library.opcheck(delta.state_scan, tuple(args))
