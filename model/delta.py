"""The associative-memory block: a gated delta rule per head.

    S_t = a_t S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T,   o_t = S_t q_t

with k and q L2-normalised, a (decay) and b (write strength) from sigmoids. Two forms:

- chunkwise-parallel (training, prefill): within a chunk of C bytes the writes are solved as a
  unit-lower-triangular system (the WY form), by the system's inverse built from blocks,
  batched over all chunks; across chunks the state is carried by a loop of matmuls, or (switch
  CHUNKS) by a scan of two kernels a chunk (`state_scan`, a library op) with the rest batched
  again; pure PyTorch, runs on the CPU;
- recurrent (decode): one rank-one update per byte.

Shapes: B batch, T bytes, H heads, C chunk, dk = dv = D / H. The state S is (B, H, dv, dk).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from model import kernels
from model.config import ModelConfig
from model.layers import RMSNorm, ShortConv, linear, project

State = dict[str, Tensor]

# How the chunked form solves its unit-lower-triangular systems: "inverse" (unit_lower_inverse,
# then matmuls; backward two matmuls) or "triangular" (torch.linalg.solve_triangular, the former
# path, kept to compare the two in one process).
SOLVE = "inverse"
# How the chunked form carries the state across chunks: "loop" (a per-chunk loop of matmuls under
# autograd) or "scan" (state_scan: the state update as g S - S W + K, one matmul a chunk each way,
# the rest batched over chunks: a quarter of the ops, but on an H100 training base about 2% slower
# with 6 GB more memory, docs/BENCHMARKS.md, so not the default).
CHUNKS = "loop"
# Whether the scan pairs chunks up first (_carry: half the sequential steps, two batched matmuls
# more; under torch.compile about a quarter fewer launches, in eager code about as many ops).
PAIR = True
# How the solve inverts: "substitute" (substitution over 16-row blocks, then rounds joined by
# torch.cat) or "doubling" (unit_lower_inverse from 1 x 1 blocks, in place: fewer ops, but about
# 3% slower on an H100, so not the default).
INVERSE = "substitute"


@contextmanager
def switched(**settings: str | bool) -> Iterator[None]:
    """The switches above set for a block (SOLVE="triangular", CHUNKS="loop", ...), restored
    after: A/B runs of the paths in one process."""
    was = {k: globals()[k] for k in settings}
    globals().update(settings)
    try:
        yield
    finally:
        globals().update(was)


def delta_rule_recurrent(
    q: Tensor, k: Tensor, v: Tensor, log_a: Tensor, b: Tensor, S: Tensor
) -> tuple[Tensor, Tensor]:
    """Reference: one byte at a time. q, k (B, H, T, dk), v (B, H, T, dv), log_a, b (B, H, T),
    S (B, H, dv, dk) -> o (B, H, T, dv), final S."""
    outs = []
    for t in range(q.shape[2]):
        S = delta_rule_step(
            q[:, :, t], k[:, :, t], v[:, :, t], log_a[:, :, t].exp(), b[:, :, t], S
        )[1]
        outs.append(torch.einsum("bhvk,bhk->bhv", S, q[:, :, t]))
    return torch.stack(outs, dim=2), S


def delta_rule_step(
    q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, S: Tensor
) -> tuple[Tensor, Tensor]:
    """q, k (B, H, dk), v (B, H, dv), a, b (B, H), S (B, H, dv, dk) -> o (B, H, dv), next S."""
    a, b = a.unsqueeze(-1), b.unsqueeze(-1)
    Sk = (S @ k.unsqueeze(-1)).squeeze(-1)  # (B, H, dv)
    w = b * (v - a * Sk)  # what this byte writes
    S = torch.addcmul(a.unsqueeze(-1) * S, w.unsqueeze(-1), k.unsqueeze(-2))  # a S + w k^T
    return (S @ q.unsqueeze(-1)).squeeze(-1), S


def delta_rule_chunked(
    q: Tensor, k: Tensor, v: Tensor, log_a: Tensor, b: Tensor, S: Tensor | None, chunk: int
) -> tuple[Tensor, Tensor]:
    """Chunkwise-parallel gated delta rule; same arguments and result as delta_rule_recurrent
    (S None means zeros). Computes in float32 whatever autocast says: the triangular solve and
    the carried state need it."""
    with torch.autocast(q.device.type, enabled=False):
        q, k, v, log_a, b = (t.float() for t in (q, k, v, log_a, b))
        return _chunked(q, k, v, log_a, b, None if S is None else S.float(), chunk)


def _in_chunks(
    q: Tensor, k: Tensor, v: Tensor, log_a: Tensor, b: Tensor, chunk: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int]:
    """Cut (B, H, T, .) into n chunks of C: q, k, v (B, H, n, C, d), b and the cumulated log decay
    lg = log gamma_i within each chunk (B, H, n, C), and the padding added to T (padding writes
    nothing, b = 0, and keeps the state, a = 1)."""
    B, H, T, _ = k.shape
    pad = (-T) % chunk
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        log_a, b = F.pad(log_a, (0, pad)), F.pad(b, (0, pad))
    n = (T + pad) // chunk
    q, k, v = (x.reshape(B, H, n, chunk, -1) for x in (q, k, v))
    lg = log_a.reshape(B, H, n, chunk).cumsum(-1)
    return q, k, v, b.reshape(B, H, n, chunk), lg, pad


def _chunked(
    q: Tensor, k: Tensor, v: Tensor, log_a: Tensor, b: Tensor, S: Tensor | None, chunk: int
) -> tuple[Tensor, Tensor]:
    if CHUNKS == "loop":
        return _chunked_loop(q, k, v, log_a, b, S, chunk)
    B, H, T, dk = k.shape
    dv = v.shape[-1]
    q, k, v, b, lg, pad = _in_chunks(q, k, v, log_a, b, chunk)
    n = q.shape[2]
    incl = torch.ones(chunk, chunk, dtype=torch.bool, device=k.device).tril()
    # gamma_i / gamma_j for j <= i, else 0, (B, H, n, C, C)
    decay = torch.where(incl, lg.unsqueeze(-1) - lg.unsqueeze(-2), float("-inf")).exp()
    # P = (Q K^T) * decay and (K K^T) * decay by one matmul, (B, H, n, C, C) each.
    QK = (torch.cat([q, k], -2) @ k.transpose(-1, -2)).unflatten(-2, (2, chunk))
    P, KK = (QK * decay.unsqueeze(-3)).unbind(-3)
    # (I + A) W = b V - b gamma K S0^T, A_ij = b_i gamma_i / gamma_j (k_i . k_j) for j < i (the
    # solve reads nothing on or above the diagonal, so the decay there may be anything).
    A = b.unsqueeze(-1) * KK
    gamma = lg.exp()
    # One solve for both right-hand sides (values, decayed keys): UW = [U | Wk], (B, H, n, C, dv+dk)
    # (b times each part, not the cat: a product by b would keep the cat for backward)
    rhs = torch.cat([b.unsqueeze(-1) * v, (b * gamma).unsqueeze(-1) * k], -1)
    UW = solve_unit_lower(A, rhs)
    # Within a chunk W = U - Wk S^T for the state S entering it, so
    #   o = Qg S^T + P W = P U + (Qg - P Wk) S^T,
    #   S' = gamma_C S + W^T K_end = gamma_C S - S Wk^T K_end + U^T K_end,
    # with K_end_i = gamma_C / gamma_i k_i: everything but the last line's S terms batched over
    # all chunks.
    PU, PWk = (P @ UW).split([dv, dk], -1)
    to_end = (lg[..., -1:] - lg).exp().unsqueeze(-1) * k  # (B, H, n, C, dk)
    KW = UW.transpose(-1, -2) @ to_end  # [U^T K_end; Wk^T K_end], (B, H, n, dv + dk, dk)
    Sp, S = _carry(S, gamma[..., -1], KW, dv)  # Sp: the state entering each chunk
    Qe = gamma.unsqueeze(-1) * q - PWk
    o = torch.baddbmm(  # P U + (Qg - P Wk) Sp^T as (B H n) batched matrices
        PU.flatten(0, 2), Qe.flatten(0, 2), Sp.flatten(0, 2).transpose(-1, -2)
    ).reshape(B, H, n * chunk, dv)
    return (o[:, :, :T] if pad else o), S


def _carry(S0: Tensor | None, g: Tensor, KW: Tensor, dv: int) -> tuple[Tensor, Tensor]:
    """The state entering each chunk (B, H, n, dv, dk) and the last (B, H, dv, dk) from
    S_{c+1} = g_c S_c - S_c W_c + K_c, g (B, H, n), KW = [K; W] (B, H, n, dv + dk, dk). Chunks
    pair up first (n even, 4 or more): two steps as one,
        S_{c+2} = g_c g_{c+1} S_c - S_c (g_{c+1} W_c + g_c W_{c+1} - W_c W_{c+1})
                  + g_{c+1} K_c - K_c W_{c+1} + K_{c+1},
    batched over the pairs (one matmul), so the scan takes n / 2 steps; the states inside the
    pairs follow from those before them, batched again (one matmul). Under TF32 as the scan
    itself: only products with a W are rounded."""
    n, dk = g.shape[-1], KW.shape[-1]
    if n % 2 or n < 4 or not PAIR:
        K, W = KW.split([dv, dk], -2)
        return state_scan(S0, g, W, K)
    # chunks 0, 2, ... and 1, 3, ...: (B, H, n / 2) and (B, H, n / 2, dv + dk, dk)
    g0, g1 = g.unflatten(-1, (n // 2, 2)).unbind(-1)
    KW0, KW1 = KW.unflatten(2, (n // 2, 2)).unbind(3)
    K0, W0 = KW0.split([dv, dk], -2)
    K1, W1 = KW1.split([dv, dk], -2)
    g0, g1, g01 = g0[..., None, None], g1[..., None, None], g0 * g1
    Kp, Wp = (g1 * KW0 - KW0 @ W1).split([dv, dk], -2)  # g1 K0 - K0 W1, g1 W0 - W0 W1
    Se, S_end = state_scan(S0, g01, Wp + g0 * W1, Kp + K1)  # S_0, S_2, ...
    So = g0 * Se - Se @ W0 + K0  # S_1, S_3, ...
    return torch.stack([Se, So], 3).flatten(2, 3), S_end


@torch.library.custom_op("bwr::state_scan", mutates_args=())
def state_scan(S0: Tensor | None, g: Tensor, W: Tensor, K: Tensor) -> tuple[Tensor, Tensor]:
    """The states between chunks: S_{c+1} = g_c S_c - S_c W_c + K_c from S_0 (B, H, dv, dk) or
    None (zeros), g (B, H, n), W (B, H, n, dk, dk), K (B, H, n, dv, dk) -> S_0 .. S_{n-1}
    (B, H, n, dv, dk) and S_n (B, H, dv, dk). A library op, opaque to torch.compile (traced, its
    in-place writes would become a matmul, a copy of its bias and a copy into the buffer); the
    work is _scan's."""
    return _scan(S0, g, W, K)


def _scan(S0: Tensor | None, g: Tensor, W: Tensor, K: Tensor) -> tuple[Tensor, Tensor]:
    """state_scan's forward: two kernels a chunk, in place, into a buffer holding the K already:
    g_c S_c elementwise, then - S_c W_c by one batched matmul. Not S_c (g_c I - W_c) in one: a
    TF32 matmul (the trainer's) would round all of the state to 10 stored mantissa bits every
    chunk, and with weak writes and slow decay the error grows over the chunks (3e-2 relative
    after 64 chunks where the per-chunk loop kept 1e-3); here, as there, only the correction
    S_c W_c is rounded."""
    B, H, n, dv, dk = K.shape
    Sp = K.new_empty(B, H, n, dv, dk)
    S_end = K[:, :, -1].clone(memory_format=torch.contiguous_format)  # as the fake kernel says
    Sp[:, :, 1:] = K[:, :, :-1]
    if S0 is None:
        Sp[:, :, 0] = 0
    else:
        Sp[:, :, 0] = S0
    gs = g[..., None, None]
    for c in range(n):
        S, nxt = Sp[:, :, c], (Sp[:, :, c + 1] if c + 1 < n else S_end)
        nxt.addcmul_(S, gs[:, :, c])
        nxt.flatten(0, 1).baddbmm_(S.flatten(0, 1), W[:, :, c].flatten(0, 1), alpha=-1)
    return Sp, S_end


@state_scan.register_fake
def _(S0: Tensor | None, g: Tensor, W: Tensor, K: Tensor) -> tuple[Tensor, Tensor]:
    B, H, n, dv, dk = K.shape
    return K.new_empty(B, H, n, dv, dk), K.new_empty(B, H, dv, dk)


@torch.library.custom_op("bwr::state_scan_backward", mutates_args=())
def _scan_backward(
    Sp: Tensor, g: Tensor, W: Tensor, g_Sp: Tensor | None, g_end: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of state_scan from its saved states Sp, g and W and the outputs' gradients
    (None: zeros) -> dS_0, dg, dW, dK. With R_c = dL/dS_{c+1}: R_{n-1} = g_end and
    R_{c-1} = G_c + g_c R_c - R_c W_c^T (G the gradient of Sp; two kernels a chunk, in place, as
    forward), dS_0 likewise, dK = R, and over all chunks at once dW_c = -S_c^T R_c,
    dg_c = sum(S_c * R_c)."""
    n = Sp.shape[2]
    R = torch.empty_like(Sp)  # R[c] = dL/dS_{c+1}
    G = torch.zeros_like(Sp) if g_Sp is None else g_Sp
    R[:, :, -1] = 0 if g_end is None else g_end
    R[:, :, :-1] = G[:, :, 1:]
    gs, Wt = g[..., None, None], W.transpose(-1, -2)
    for c in range(n - 1, 0, -1):
        R[:, :, c - 1].addcmul_(R[:, :, c], gs[:, :, c])
        R[:, :, c - 1].flatten(0, 1).baddbmm_(
            R[:, :, c].flatten(0, 1), Wt[:, :, c].flatten(0, 1), alpha=-1
        )
    # contiguous, as the fake kernel says (G, the incoming gradient, may come in any layout,
    # and addcmul follows it: Inductor on a GPU checks the strides)
    g_S0 = torch.addcmul(G[:, :, 0], R[:, :, 0], gs[:, :, 0]).contiguous()
    g_S0.flatten(0, 1).baddbmm_(R[:, :, 0].flatten(0, 1), Wt[:, :, 0].flatten(0, 1), alpha=-1)
    g_W = (Sp.transpose(-1, -2) @ R).neg_().contiguous()
    return g_S0, (Sp * R).sum((-1, -2)), g_W, R


@_scan_backward.register_fake
def _(
    Sp: Tensor, g: Tensor, W: Tensor, g_Sp: Tensor | None, g_end: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    B, H, _, dv, dk = Sp.shape
    return (
        Sp.new_empty(B, H, dv, dk),
        g.new_empty(g.shape),
        W.new_empty(W.shape),
        torch.empty_like(Sp),
    )


def _scan_setup(
    ctx, inputs: tuple[Tensor | None, Tensor, Tensor, Tensor], output: tuple[Tensor, Tensor]
) -> None:  # type: ignore[no-untyped-def]
    # W alone: a view of a larger product (W and K) would keep all of it for backward
    ctx.save_for_backward(output[0], inputs[1], inputs[2].contiguous())
    ctx.initial = inputs[0] is not None


def _scan_grad(ctx, g_Sp: Tensor | None, g_end: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[no-untyped-def]
    Sp, g, W = ctx.saved_tensors
    g_S0, g_g, g_W, g_K = _scan_backward(Sp, g, W, g_Sp, g_end)
    return (g_S0 if ctx.initial else None), g_g, g_W, g_K


state_scan.register_autograd(_scan_grad, setup_context=_scan_setup)


def solve_unit_lower(A: Tensor, rhs: Tensor) -> Tensor:
    """(I + A)^-1 rhs for A (..., C, C) strictly lower triangular (only the entries below the
    diagonal are read), rhs (..., C, r) -> (..., C, r). By SOLVE: the block inverse and a matmul
    (backward: two matmuls), or torch.linalg.solve_triangular."""
    if SOLVE == "triangular":
        L = torch.eye(A.shape[-1], device=A.device, dtype=A.dtype) + A
        return torch.linalg.solve_triangular(L, rhs, upper=False, unitriangular=True)
    return _InverseSolve.apply(A, rhs)


class _InverseSolve(torch.autograd.Function):
    """U = X rhs with X = (I + A)^-1 from unit_lower_inverse. Backward as for any triangular
    solve: g_rhs = X^T g_U, g_A = -(g_rhs U^T) below the diagonal; saves X and U. Once
    differentiable."""

    @staticmethod
    def forward(ctx, A: Tensor, rhs: Tensor) -> Tensor:  # type: ignore[override]
        X = _inverse_by_cat(A) if INVERSE == "substitute" else unit_lower_inverse(A)
        U = X @ rhs
        ctx.save_for_backward(X, U)
        return U

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        X, U = ctx.saved_tensors
        g_rhs = X.transpose(-1, -2) @ g
        return -(g_rhs @ U.transpose(-1, -2)).tril(-1), g_rhs


def unit_lower_inverse(A: Tensor, block: int = 1, split: bool | None = None) -> Tensor:
    """(I + A)^-1 for A (..., C, C) strictly lower triangular (only the entries below the
    diagonal are read) -> (..., C, C), lower triangular with a unit diagonal. Any C.

    Blocks pair up, doubling in size from `block` rows until C (C padded with identity to
    block * 2^k): [[L11, 0], [L21, L22]] has the inverse [[X11, 0], [-X22 L21 X11, X22]]. From
    1 x 1 blocks (block 1, the default) that is log2(C) rounds; a larger block inverts its diagonal
    blocks first by forward substitution (block - 1 steps). Each round writes its new blocks into
    one preallocated inverse, in place; its products are broadcast products and sums for blocks up
    to _BROADCAST rows, of any size under torch.compile (no copies of the strided blocks, exact
    float32 whatever TF32 says), matmuls above. No power series of A, whose terms can be large
    where the inverse is not: each entry comes from products of inverses, to float32 accuracy
    (2e-7 relative at worst on keys like the model's, as torch.linalg.solve_triangular; from
    1 x 1 blocks as from 16).

    Precision relied on: float32 products in the rounds between blocks. Where float32 matmuls run
    in TF32 (the trainer on a GPU) plain products -X22 L21 X11 would round their inputs to 10
    stored mantissa bits, and with the cancellation inside them (parallel keys, strong writes,
    slow decay) the inverse would be only 1e-3 relative good, two to four times one TF32 matmul's
    error, passed on to every later round. `split` (None: float32 on a GPU with
    torch.backends.cuda.matmul.allow_tf32) computes the matmul rounds as split products
    (_split_product, three times the work of these small products), which keeps the inverse
    within 1e-6 under TF32; a solve with it (X @ rhs, one TF32 matmul) is then as good as any
    TF32 matmul. tests/model/test_tril_inverse.py measures both with TF32 emulated."""
    C = A.shape[-1]
    if split is None:
        split = A.is_cuda and A.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    product = _split_product if split else torch.matmul
    size = block << ((C - 1) // block).bit_length()  # block * 2^k >= C
    if size != C:  # [[L, 0], [0, I]]: the inverse's top-left C x C is L^-1
        A = F.pad(A, (0, size - C, 0, size - C))
    X = torch.zeros_like(A)  # (..., size, size); grows by its blocks below the diagonal
    if block == 1:
        X.diagonal(dim1=-2, dim2=-1).fill_(1)
    else:
        _diag_blocks(X, block).copy_(_substitute(_diag_blocks(A, block)))
    nA = -A
    recording = torch.is_grad_enabled() and A.requires_grad
    broadcast = size if torch.compiler.is_compiling() else _BROADCAST
    s = block
    while s < size:
        # Under autograd the products read a copy: what they save must not be written after.
        V = _diag_blocks(X.clone() if recording else X, 2 * s)  # (..., size / 2s, 2s, 2s)
        X11, X22 = V[..., :s, :s], V[..., s:, s:]
        X21 = _diag_blocks(X, 2 * s)[..., s:, :s]  # a view into X, written below
        nL21 = _diag_blocks(nA, 2 * s)[..., s:, :s]  # -L21
        if s == 1:  # X11 = X22 = 1
            X21.copy_(nL21)
        elif s <= broadcast:
            XL = (X22.unsqueeze(-1) * nL21.unsqueeze(-3)).sum(-2)
            _sum_into(X21, XL.unsqueeze(-1) * X11.unsqueeze(-3))
        else:
            X21.copy_(product(product(X22, nL21), X11))
        s *= 2
    return X[..., :C, :C]


# Blocks up to this many rows multiply by broadcast products (see above) in eager code, where
# the products are materialised (N C s^2 / 2 floats for N matrices); compiled, all do: the
# compiler fuses each product and its sum into one reduction, with no matmul and no split.
_BROADCAST = 8


def _sum_into(dst: Tensor, x: Tensor) -> None:
    """dst = x.sum(-2) for dst a strided view: by the sum itself (out=), or copied where autograd
    records it (out= is not differentiable) or torch.compile traces it (a strided out= would
    break the graph; the compiler fuses the sum and the copy)."""
    if (torch.is_grad_enabled() and x.requires_grad) or torch.compiler.is_compiling():
        dst.copy_(x.sum(-2))
    else:
        torch.sum(x, -2, out=dst)


def _inverse_by_cat(A: Tensor, block: int = 16) -> Tensor:
    """The former unit_lower_inverse (INVERSE = "substitute"), to compare in one process: forward
    substitution over 16-row diagonal blocks, then rounds that assemble X with torch.cat."""
    C = A.shape[-1]
    if block >= C:  # a single block
        return _substitute(A)
    split = A.is_cuda and A.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    product = _split_product if split else torch.matmul
    size = block << ((C - 1) // block).bit_length()  # block * 2^k >= C
    if size != C:
        A = F.pad(A, (0, size - C, 0, size - C))
    X = _substitute(_diag_blocks(A, block))  # (..., size / s, s, s): inverses of diagonal blocks
    s = block
    while s < size:
        L21 = _diag_blocks(A, 2 * s)[..., s:, :s]  # (..., size / 2s, s, s)
        X11, X22 = X[..., 0::2, :, :], X[..., 1::2, :, :]
        X21 = -product(product(X22, L21), X11)
        top = torch.cat([X11, torch.zeros_like(X11)], -1)
        X = torch.cat([top, torch.cat([X21, X22], -1)], -2)
        s *= 2
    return X.squeeze(-3)[..., :C, :C]


def _split_product(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for float32 a (..., m, k), b (..., k, n), accurate to about 2^-20 relative also where
    matmuls round float32 inputs to TF32. With a = ah + al, ah a's leading 11 significant bits
    (exact in TF32, so ah bh is exact) and |al| < 2^-10 |a| (likewise b): ah bh + ah bl + al bh
    as one matmul of three times the inner size; al bl, below 2^-20 |a| |b|, is left out. The
    heads are cut with a bit mask, not a round trip through a narrower dtype, which a compiler
    may drop."""
    ah, bh = _tf32_head(a), _tf32_head(b)
    return torch.cat([ah, ah, a - ah], -1) @ torch.cat([bh, b - bh, bh], -2)


def _tf32_head(x: Tensor) -> Tensor:
    """float32 x with the low 13 of its 23 stored mantissa bits cleared: exact in TF32."""
    return (x.view(torch.int32) & -(1 << 13)).view(torch.float32)


def _substitute(A: Tensor) -> Tensor:
    """(I + A)^-1 by forward substitution, row i from the rows above it: A (..., n, n) strictly
    lower (the rest is not read) -> (..., n, n). n - 1 steps: for small blocks."""
    n = A.shape[-1]
    eye = torch.eye(n, device=A.device, dtype=A.dtype)
    rows = [eye[0].expand(*A.shape[:-2], n)]
    for i in range(1, n):
        above = torch.stack(rows, -2)  # (..., i, n): rows 0..i-1 of the inverse
        rows.append(eye[i] - (A[..., i, :i, None] * above).sum(-2))
    return torch.stack(rows, -2)


def _diag_blocks(M: Tensor, s: int) -> Tensor:
    """The diagonal s x s blocks of M (..., C, C) (C a multiple of s) -> (..., C / s, s, s)."""
    m = M.shape[-1] // s
    blocks = M.unflatten(-1, (m, s)).unflatten(-3, (m, s))  # (..., m, s, m, s)
    return blocks.diagonal(dim1=-4, dim2=-2).movedim(-1, -3)


def _chunked_loop(
    q: Tensor, k: Tensor, v: Tensor, log_a: Tensor, b: Tensor, S: Tensor | None, chunk: int
) -> tuple[Tensor, Tensor]:
    """The former inter-chunk recurrence (CHUNKS = "loop"): a matmul loop over the chunks."""
    B, H, T, dk = k.shape
    dv = v.shape[-1]
    if S is None:
        S = k.new_zeros(B, H, dv, dk)
    q, k, v, b, lg, _ = _in_chunks(q, k, v, log_a, b, chunk)
    n = q.shape[2]
    diff = lg.unsqueeze(-1) - lg.unsqueeze(-2)  # log(gamma_i / gamma_j), (B, H, n, C, C)
    strict = torch.ones(chunk, chunk, dtype=torch.bool, device=k.device).tril(-1)
    incl = torch.ones(chunk, chunk, dtype=torch.bool, device=k.device).tril()
    decay_strict = torch.where(strict, diff, float("-inf")).exp()
    decay_incl = torch.where(incl, diff, float("-inf")).exp()
    # (I + A) W = b V - b gamma K S0^T, A_ij = b_i gamma_i / gamma_j (k_i . k_j) for j < i.
    A = b.unsqueeze(-1) * decay_strict * (k @ k.transpose(-1, -2))
    gamma = lg.exp()
    # One solve for both right-hand sides (values and decayed keys).
    rhs = torch.cat([b.unsqueeze(-1) * v, (b * gamma).unsqueeze(-1) * k], -1)
    U, Wk = solve_unit_lower(A, rhs).split([dv, dk], -1)
    P = (q @ k.transpose(-1, -2)) * decay_incl  # (B, H, n, C, C)
    Qg = gamma.unsqueeze(-1) * q
    to_end = (lg[..., -1:] - lg).exp().unsqueeze(-1) * k  # gamma_C / gamma_i * k_i
    outs = []
    for c in range(n):
        St = S.transpose(-1, -2)  # (B, H, dk, dv)
        W = U[:, :, c] - Wk[:, :, c] @ St  # (B, H, C, dv)
        outs.append(Qg[:, :, c] @ St + P[:, :, c] @ W)
        S = gamma[:, :, c, -1, None, None] * S + W.transpose(-1, -2) @ to_end[:, :, c]
    o = torch.stack(outs, dim=2).reshape(B, H, n * chunk, dv)[:, :, :T]
    return o, S


class DeltaMixer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D, H = cfg.d_model, cfg.delta_heads
        self.heads, self.head_dim, self.chunk = H, cfg.delta_head_dim, cfg.delta_chunk
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.short = ShortConv(3 * D, cfg.short_kernel)
        self.ab = nn.Linear(D, 2 * H)
        with torch.no_grad():  # start with slow decay (a ~ 0.99) and moderate writes (b ~ 0.5)
            self.ab.bias[:H] = 4.6
            self.ab.bias[H:] = 0.0
        self.gate = nn.Linear(D, D, bias=False)
        self.out_norm = RMSNorm(self.head_dim, cfg.norm_eps)
        self.out_proj = nn.Linear(D, D, bias=False)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        d = self.head_dim
        return {"conv": self.short.state_shape(), "S": (self.heads, d, d)}

    def _project(self, x: Tensor, conv: Tensor | None, step: bool) -> tuple[Tensor, ...]:
        z = self.qkv(x)
        z, conv = self.short.step(z, conv) if step else self.short(z, conv)
        q, k, v = F.silu(z).chunk(3, dim=-1)
        shape = (*x.shape[:-1], self.heads, self.head_dim)
        q = F.normalize(q.reshape(shape), dim=-1)
        k = F.normalize(k.reshape(shape), dim=-1)
        v = v.reshape(shape)
        a_logit, b_logit = self.ab(x).chunk(2, dim=-1)
        return q, k, v, F.logsigmoid(a_logit), torch.sigmoid(b_logit), conv

    def _output(self, x: Tensor, o: Tensor) -> Tensor:
        o = self.out_norm(o).flatten(-2)  # (..., D)
        return self.out_proj(o * F.silu(self.gate(x)))

    def forward(self, x: Tensor, state: State | None, want_state: bool) -> tuple[Tensor, State]:
        """Parallel form. x (B, T, D) -> y (B, T, D) and the state after the last byte."""
        q, k, v, log_a, b, conv = self._project(
            x, None if state is None else state["conv"], step=False
        )
        tr = lambda t: t.transpose(1, 2)  # (B, T, H, ...) -> (B, H, T, ...)  # noqa: E731
        o, S = delta_rule_chunked(
            tr(q), tr(k), tr(v), tr(log_a), tr(b), None if state is None else state["S"], self.chunk
        )
        new = {"conv": conv, "S": S} if want_state else {}
        return self._output(x, o.transpose(1, 2)), new

    def step_pool(
        self,
        x: Tensor,
        pool: State,
        slots: Tensor | None,
        cache: dict[str, Tensor] | None = None,
        key: str = "",
        norm: RMSNorm | None = None,
        res: Tensor | None = None,
    ) -> Tensor:
        """Recurrent form on a state pool: rows `slots` (all if None) advance one byte in place.
        x (B, D) -> y (B, D); with norm, x is normalised first, with res, -> res + y (the fused
        projections fold both in). Fused on the GPU (one matmul for all input projections from the
        decode cache, then the conv, the delta rule, the norm and the gate in one kernel, one pass
        over S), eager elsewhere."""
        if slots is None or cache is None or not kernels.available(x):
            cur = {k: v if slots is None else v.index_select(0, slots) for k, v in pool.items()}
            y, new = self.step(x if norm is None else norm(x), cur)
            for k, v in pool.items():
                v.copy_(new[k]) if slots is None else v.index_copy_(0, slots, new[k])
            return y if res is None else res + y
        w = cache[key + "in"]
        z = project(x, w, norm=norm)  # (B, 4D + 2H): q, k, v, decay and write logits, gate
        o = kernels.delta_step(
            z, cache[key + "in_bias"], self.short.weight, self.short.bias, pool["conv"],
            pool["S"], self.out_norm.weight, self.out_norm.eps, slots,
        )  # fmt: skip
        out = cache[key + "out"]
        return linear(o, out) if res is None else project(o, out, res=res)

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """Recurrent form. x (B, D) -> y (B, D) and the next state."""
        q, k, v, log_a, b, conv = self._project(x, state["conv"], step=True)
        o, S = delta_rule_step(q, k, v, log_a.exp(), b, state["S"])
        return self._output(x, o), {"conv": conv, "S": S}
