"""The chunked delta rule's unit-lower-triangular solve by a block inverse (model/delta.py).

On matrices drawn like the chunked form's A = b_i gamma_i / gamma_j (k_i . k_j) below the diagonal
(b in (0, 1), decays in (0, 1], L2-normalised keys, from independent to nearly parallel):

(a) unit_lower_inverse equals torch.linalg.inv to float64 rounding in float64, and in float32 is
    as close to the float64 inverse as torch.linalg.solve_triangular (any C, any block, from
    1 x 1 blocks, the default, as from the former path's 16-row substitution);
(b) under emulated TF32 matmuls (inputs cut to 10 stored mantissa bits) its split products keep
    it at float32 accuracy, where plain products lose about 1e-3;
(c) solve_unit_lower and its backward agree with torch.linalg.solve_triangular, and pass
    gradcheck in float64, as does unit_lower_inverse itself;
(d) delta_rule_chunked equals delta_rule_recurrent by either solve, by the state scan and by the
    former per-chunk loop, outputs and gradients; the scan passes gradcheck.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

from model import delta
from model.delta import (
    delta_rule_chunked,
    delta_rule_recurrent,
    solve_unit_lower,
    unit_lower_inverse,
)

SETTINGS = settings(max_examples=60, deadline=None)
F32_TOL = 2e-6  # relative error of a float32 inverse (measured: at most 2e-7, as the trsm's)


@st.composite
def systems(draw: st.DrawFn, max_chunk: int = 64) -> dict[str, Any]:
    """How to draw a batch of A: chunk, key width, how parallel the keys are, ranges of b, a."""
    return dict(
        chunk=draw(st.integers(1, max_chunk)),
        dk=draw(st.sampled_from([2, 4, 16, 64])),
        shared=draw(st.sampled_from([0.0, 1.0, 3.0, 10.0])),  # weight of a direction all keys share
        b_min=draw(st.sampled_from([0.0, 0.5, 0.9, 0.99])),
        a_min=draw(st.sampled_from([0.1, 0.5, 0.9, 0.999, 1.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def strict_lower(
    chunk: int, dk: int, shared: float, b_min: float, a_min: float, seed: int, batch: int = 8
) -> torch.Tensor:
    """A (batch, chunk, chunk) in float64 as _chunked builds it: b_i gamma_i / gamma_j k_i . k_j
    for j < i, zero elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(generator=gen, dtype=torch.float64)
    k = torch.randn(batch, chunk, dk, **f64) + shared * torch.randn(batch, 1, dk, **f64)
    k = F.normalize(k, dim=-1)
    b = b_min + (1 - b_min) * torch.rand(batch, chunk, **f64)
    a = a_min + (1 - a_min) * torch.rand(batch, chunk, **f64)
    lg = a.log().cumsum(-1)
    below = torch.ones(chunk, chunk, dtype=torch.bool).tril(-1)
    decay = torch.where(below, lg.unsqueeze(-1) - lg.unsqueeze(-2), float("-inf")).exp()
    return b.unsqueeze(-1) * decay * (k @ k.transpose(-1, -2))


def rel_error(X: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest relative error (Frobenius) over the batch."""
    X, ref = X.double(), ref.double()
    return ((X - ref).norm(dim=(-2, -1)) / ref.norm(dim=(-2, -1))).max().item()


def inverse(A: torch.Tensor) -> torch.Tensor:
    return torch.linalg.inv(torch.eye(A.shape[-1], dtype=A.dtype) + A)


def solve(mode: str, **switches: str | bool) -> AbstractContextManager[None]:
    """model.delta's switches: SOLVE = mode, and any others (CHUNKS, INVERSE, PAIR) as given."""
    return delta.switched(SOLVE=mode, **switches)


class TF32(TorchFunctionMode):
    """Matmuls as TF32 tensor cores do them: float32 inputs cut to 10 stored mantissa bits
    (truncated, the worse of the two roundings), products accumulated in float32."""

    MATMULS = (torch.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.__matmul__)
    ADD_MATMULS = (torch.baddbmm, torch.Tensor.baddbmm, torch.Tensor.baddbmm_)  # (C, A, B)

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        if func in self.MATMULS:
            args = tuple(self.cut(a) for a in args)
        elif func in self.ADD_MATMULS:  # the added term is not a product's input
            args = (args[0], *(self.cut(a) for a in args[1:3]), *args[3:])
        return func(*args, **(kwargs or {}))

    @staticmethod
    def cut(a: Any) -> Any:
        if isinstance(a, torch.Tensor) and a.dtype == torch.float32:
            return (a.view(torch.int32) & -(1 << 13)).view(torch.float32)
        return a


# ----- (a) accuracy -----


@SETTINGS
@given(case=systems(), block=st.sampled_from([1, 2, 4, 8, 16]))
def test_inverse_matches_inv_and_is_as_accurate_as_the_triangular_solve(
    case: dict[str, Any], block: int
) -> None:
    A = strict_lower(**case)
    ref = inverse(A)
    assert rel_error(unit_lower_inverse(A, block), ref) <= 1e-12
    C = case["chunk"]
    eye = torch.eye(C).expand(A.shape[0], C, C)
    trsm = torch.linalg.solve_triangular(
        torch.eye(C) + A.float(), eye, upper=False, unitriangular=True
    )
    for split in (False, True):
        X = unit_lower_inverse(A.float(), block, split=split)
        assert X.dtype == torch.float32
        assert torch.equal(X.triu(1), torch.zeros_like(X))
        assert torch.equal(X.diagonal(dim1=-2, dim2=-1), torch.ones(A.shape[0], C))
        assert rel_error(X, ref) <= max(F32_TOL, 10 * rel_error(trsm, ref))


@pytest.mark.parametrize("chunk", [1, 2, 3, 16, 24, 64, 100])
def test_inverse_from_single_entries_matches_the_former_path(chunk: int) -> None:
    """The default (doubling from 1 x 1 blocks, written in place) and the former path
    (substitution over 16-row blocks, rounds joined by torch.cat) give the same inverse."""
    A = strict_lower(chunk, 16, 3.0, 0.5, 0.9, seed=chunk)
    assert rel_error(unit_lower_inverse(A), delta._inverse_by_cat(A)) <= 1e-13
    A32 = A.float()
    assert rel_error(unit_lower_inverse(A32), delta._inverse_by_cat(A32)) <= F32_TOL


def test_inverse_writes_the_same_with_and_without_autograd() -> None:
    """Rounds of broadcast products write their sums in place (out=) without autograd and copy
    them in with it: the same numbers."""
    A = strict_lower(64, 8, 1.0, 0.5, 0.9, seed=3)
    with torch.no_grad():
        plain = unit_lower_inverse(A)
    recorded = unit_lower_inverse(A.clone().requires_grad_())
    assert recorded.requires_grad
    assert torch.equal(recorded.detach(), plain)


def test_inverse_reads_only_below_the_diagonal() -> None:
    A = strict_lower(40, 8, 1.0, 0.5, 0.9, seed=1)
    noise = torch.randn(A.shape, dtype=A.dtype).triu()
    assert torch.equal(unit_lower_inverse(A + noise), unit_lower_inverse(A))


# ----- (b) TF32 -----


@SETTINGS
@given(case=systems())
def test_split_products_keep_float32_accuracy_under_tf32(case: dict[str, Any]) -> None:
    A = strict_lower(**case)
    with TF32():
        X = unit_lower_inverse(A.float(), split=True)
    assert rel_error(X, inverse(A)) <= 5e-6  # measured: at most 7e-7


def test_plain_products_under_tf32_lose_accuracy() -> None:
    """Why the split exists: with parallel keys, strong writes and slow decay the products between
    blocks cancel, and TF32 inputs leave the inverse 1e-3 off, several TF32 roundings."""
    A = strict_lower(64, 64, 3.0, 0.9, 0.99, seed=0, batch=64)
    with TF32():
        plain = rel_error(unit_lower_inverse(A.float(), split=False), inverse(A))
        split = rel_error(unit_lower_inverse(A.float(), split=True), inverse(A))
    assert plain > 2e-4
    assert split < 2e-6


# ----- (c) the solve and gradients -----


SOLVES = [("inverse", "doubling"), ("inverse", "substitute"), ("triangular", "substitute")]


@SETTINGS
@given(case=systems(), width=st.integers(1, 9))
def test_solve_matches_solve_triangular(case: dict[str, Any], width: int) -> None:
    A = strict_lower(**case)
    gen = torch.Generator().manual_seed(case["seed"])
    rhs = torch.randn(*A.shape[:-1], width, generator=gen, dtype=A.dtype)
    L = torch.eye(A.shape[-1], dtype=A.dtype) + A
    ref = torch.linalg.solve_triangular(L, rhs, upper=False, unitriangular=True)
    for mode, inverse in SOLVES:
        with solve(mode, INVERSE=inverse):
            assert rel_error(solve_unit_lower(A, rhs), ref) <= 1e-12
            assert rel_error(solve_unit_lower(A.float(), rhs.float()), ref) <= F32_TOL * 10


@pytest.mark.parametrize("chunk", [1, 5, 16, 20, 33])
@pytest.mark.parametrize(("mode", "inverse"), SOLVES)
def test_solve_gradcheck(chunk: int, mode: str, inverse: str) -> None:
    A = strict_lower(chunk, 4, 1.0, 0.5, 0.9, seed=chunk, batch=2)
    A = (A + torch.randn(A.shape, dtype=A.dtype).triu()).requires_grad_()  # upper part: not read
    rhs = torch.randn(2, chunk, 3, dtype=torch.float64, requires_grad=True)
    with solve(mode, INVERSE=inverse):
        assert torch.autograd.gradcheck(solve_unit_lower, (A, rhs))


@pytest.mark.parametrize(
    ("chunk", "block"), [(1, 4), (4, 4), (7, 4), (13, 4), (24, 8), (1, 1), (6, 1), (19, 1)]
)
def test_inverse_gradcheck(chunk: int, block: int) -> None:
    """unit_lower_inverse is differentiable as it stands (the solve has its own backward)."""
    A = strict_lower(chunk, 4, 1.0, 0.5, 0.9, seed=chunk, batch=2).requires_grad_()
    assert torch.autograd.gradcheck(lambda A: unit_lower_inverse(A, block), (A,))


# ----- (d) the chunked form -----

PATHS = [  # SOLVE, CHUNKS, INVERSE: the scan, the triangular solve, the defaults
    ("inverse", "scan", "doubling"),
    ("triangular", "scan", "doubling"),
    ("inverse", "loop", "substitute"),
]


def scan_inputs(
    initial: bool, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    B, H, n, dv, dk = 2, 3, 4, 3, 2
    S0 = torch.randn(B, H, dv, dk, generator=gen, dtype=dtype) if initial else None
    g = torch.rand(B, H, n, generator=gen, dtype=dtype)
    W = 0.5 * torch.randn(B, H, n, dk, dk, generator=gen, dtype=dtype)
    K = torch.randn(B, H, n, dv, dk, generator=gen, dtype=dtype)
    return S0, g, W, K


@pytest.mark.parametrize("initial", [True, False])
def test_state_scan_gradcheck(initial: bool) -> None:
    S0, g, W, K = (None if x is None else x.requires_grad_() for x in scan_inputs(initial))
    assert torch.autograd.gradcheck(delta.state_scan, (S0, g, W, K))
    Sp, S_end = delta.state_scan(S0, g, W, K)
    S = torch.zeros_like(S_end) if S0 is None else S0
    for c in range(g.shape[2]):  # the recurrence it computes, one chunk at a time
        assert torch.allclose(Sp[:, :, c], S, atol=1e-12)
        S = g[:, :, c, None, None] * S - S @ W[:, :, c] + K[:, :, c]
    assert torch.allclose(S_end, S, atol=1e-12)


@pytest.mark.parametrize("n", [4, 5, 8])
def test_paired_chunks_carry_the_same_states(n: int) -> None:
    """_carry pairs chunks up before the scan (n even): the same states as the scan over every
    chunk, and gradients that pass gradcheck."""
    gen = torch.Generator().manual_seed(n)
    f64 = dict(generator=gen, dtype=torch.float64)
    B, H, dv, dk = 2, 2, 3, 2
    S0 = torch.randn(B, H, dv, dk, **f64)
    g = torch.rand(B, H, n, **f64)
    KW = 0.5 * torch.randn(B, H, n, dv + dk, dk, **f64)
    K, W = KW.split([dv, dk], -2)
    want = delta.state_scan(S0, g, W, K)
    for got, ref in zip(delta._carry(S0, g, KW, dv), want, strict=True):
        assert (got - ref).abs().max() <= 1e-12
    inputs = [x.requires_grad_() for x in (S0, g, KW)]
    assert torch.autograd.gradcheck(lambda S0, g, KW: delta._carry(S0, g, KW, dv), inputs)


def test_state_scan_under_tf32_rounds_only_the_corrections() -> None:
    """Weak writes and slow decay keep a state over many chunks. Under TF32 matmuls the chunked
    form with the scan (its body run where the emulation sees it) loses no more than the former
    per-chunk loop, outputs and state (measured: 5e-4 and 1e-3 relative both); one matmul by
    g I - W a chunk would round the whole state each time and lose 3e-2."""
    gen = torch.Generator().manual_seed(0)
    f64 = dict(generator=gen, dtype=torch.float64)
    B, H, T, dk, chunk = 2, 2, 1024, 16, 16
    q = F.normalize(torch.randn(B, H, T, dk, **f64), dim=-1)
    k = F.normalize(torch.randn(B, H, T, dk, **f64), dim=-1)
    v = torch.randn(B, H, T, dk, **f64)
    log_a = F.logsigmoid(torch.randn(B, H, T, **f64) + 9)
    b = 0.02 * torch.rand(B, H, T, **f64)
    S = torch.randn(B, H, dk, dk, **f64)
    refs = delta_rule_recurrent(q, k, v, log_a, b, S)
    errors = {}
    for chunks in ("scan", "loop"):
        inverse = "doubling" if chunks == "scan" else "substitute"
        with solve("inverse", CHUNKS=chunks, INVERSE=inverse), TF32():
            was, delta.state_scan = delta.state_scan, delta._scan  # type: ignore[assignment]
            try:
                got = delta_rule_chunked(q, k, v, log_a, b, S, chunk)
            finally:
                delta.state_scan = was
        errors[chunks] = [
            ((x - r).norm() / r.norm()).item() for x, r in zip(got, refs, strict=True)
        ]
    assert max(errors["loop"]) < 3e-3
    for scan, loop in zip(errors["scan"], errors["loop"], strict=True):
        assert scan <= 1.5 * loop


def test_state_scan_is_a_sound_library_op() -> None:
    """Schema, fake (meta) shapes, autograd registration and tracing, as torch.compile needs."""
    for initial in (True, False):
        S0, g, W, K = (
            None if x is None else x.requires_grad_() for x in scan_inputs(initial, torch.float32)
        )
        torch.library.opcheck(delta.state_scan, (S0, g, W, K))


@SETTINGS
@given(
    T=st.integers(1, 150),
    chunk=st.sampled_from([1, 3, 16, 24, 32, 40, 64]),
    dk=st.sampled_from([2, 8]),
    state=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_chunked_equals_recurrent_by_either_solve(
    T: int, chunk: int, dk: int, state: bool, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(generator=gen, dtype=torch.float64)
    B, H = 2, 2
    q = F.normalize(torch.randn(B, H, T, dk, **f64), dim=-1)
    k = F.normalize(torch.randn(B, H, T, dk, **f64), dim=-1)
    v = torch.randn(B, H, T, dk, **f64)
    log_a = F.logsigmoid(torch.randn(B, H, T, **f64) + 3)
    b = torch.rand(B, H, T, **f64)
    S = torch.randn(B, H, dk, dk, **f64) * state  # zeros without a state
    inputs = [x.requires_grad_() for x in (q, k, v, log_a, b, S)]
    o_ref, S_ref = delta_rule_recurrent(q, k, v, log_a, b, S)
    grads_ref = torch.autograd.grad((o_ref.sum() + S_ref.square().sum()), inputs)
    for mode, chunks, inverse in PATHS:
        with solve(mode, CHUNKS=chunks, INVERSE=inverse):
            # float32 inside (delta_rule_chunked casts), float64 reference
            o, S_end = delta_rule_chunked(q, k, v, log_a, b, S if state else None, chunk)
            assert (o - o_ref).abs().max() <= 1e-4
            assert (S_end - S_ref).abs().max() <= 1e-4
            o, S_end = delta._chunked(q, k, v, log_a, b, S, chunk)  # float64 throughout
            assert (o - o_ref).abs().max() <= 1e-10
            assert (S_end - S_ref).abs().max() <= 1e-10
            grads = torch.autograd.grad((o.sum() + S_end.square().sum()), inputs)
            for g, g_ref in zip(grads, grads_ref, strict=True):
                assert (g - g_ref).abs().max() <= 1e-9 * max(1.0, g_ref.abs().max().item())


# Dynamo itself instantiates autograd Functions (_InverseSolve) as it traces them, and warns.
@pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning")
def test_chunked_compiles_in_one_graph_and_agrees() -> None:
    """torch.compile traces the chunked form whole (the scan is a library op; compiled, every
    round of the inverse takes broadcast products, chunk 32 has one above _BROADCAST) and
    computes what eager code does, outputs and gradients, chunks paired or not."""
    gen = torch.Generator().manual_seed(5)
    B, H, T, dk, chunk = 2, 2, 100, 8, 32  # 4 chunks (paired), the last padded
    q = F.normalize(torch.randn(B, H, T, dk, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, H, T, dk, generator=gen), dim=-1)
    v = torch.randn(B, H, T, dk, generator=gen)
    log_a = F.logsigmoid(torch.randn(B, H, T, generator=gen) + 3)
    b = torch.rand(B, H, T, generator=gen)
    S = torch.randn(B, H, dk, dk, generator=gen)
    inputs = [x.requires_grad_() for x in (q, k, v, log_a, b, S)]
    for pair in (True, False):
        with solve("inverse", CHUNKS="scan", INVERSE="doubling", PAIR=pair):
            compiled = torch.compile(delta_rule_chunked, backend="aot_eager", fullgraph=True)
            results = []
            for fn in (delta_rule_chunked, compiled):
                o, S_end = fn(*inputs, chunk)
                grads = torch.autograd.grad(o.square().sum() + S_end.square().sum(), inputs)
                results.append((o, S_end, *grads))
        for got, want in zip(results[1], results[0], strict=True):
            assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())
