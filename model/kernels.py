"""Fused decode kernels (Triton, CUDA only) for the two recurrences, updating the state pool in
place.

Each kernel reads one slot's state straight from the pool (indexed by the slot tensor), applies
one byte's update and writes it back: one read and one write of the state per step, where the
eager path gathers, computes in several passes and scatters. They are registered as torch
library ops so torch.compile traces through them. The eager recurrences in hyena.py and
delta.py are the reference; benchmarks/gpu_checks.py holds the two equal on the device.

Shapes: B rows this step, P pool rows, D channels, N modes, H heads, dk = dv head width.
Without Triton or a GPU, `available()` is False and callers use the eager path.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    HAVE_TRITON = False


def available(t: Tensor) -> bool:
    return HAVE_TRITON and t.is_cuda


if HAVE_TRITON:

    @triton.jit
    def _modal_step_kernel(
        u_ptr,
        lre_ptr,
        lim_ptr,
        rre_ptr,
        rim_ptr,
        sre_ptr,
        sim_ptr,
        slots_ptr,
        y_ptr,
        D,
        N,
        NP: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0)
        d0 = tl.program_id(1) * BLOCK_D
        slot = tl.load(slots_ptr + b).to(tl.int64)
        d = d0 + tl.arange(0, BLOCK_D)
        n = tl.arange(0, NP)
        dmask = d < D
        mask = dmask[:, None] & (n < N)[None, :]
        dn = d[:, None] * N + n[None, :]  # (BLOCK_D, N) offsets into (D, N)
        s_off = slot * D * N + dn
        s_re = tl.load(sre_ptr + s_off, mask=mask, other=0.0)
        s_im = tl.load(sim_ptr + s_off, mask=mask, other=0.0)
        l_re = tl.load(lre_ptr + dn, mask=mask, other=0.0)
        l_im = tl.load(lim_ptr + dn, mask=mask, other=0.0)
        r_re = tl.load(rre_ptr + dn, mask=mask, other=0.0)
        r_im = tl.load(rim_ptr + dn, mask=mask, other=0.0)
        u = tl.load(u_ptr + b * D + d, mask=dmask, other=0.0)
        n_re = l_re * s_re - l_im * s_im + u[:, None]
        n_im = l_re * s_im + l_im * s_re
        tl.store(sre_ptr + s_off, n_re, mask=mask)
        tl.store(sim_ptr + s_off, n_im, mask=mask)
        y = tl.sum(r_re * n_re - r_im * n_im, axis=1)
        tl.store(y_ptr + b * D + d, y, mask=dmask)

    @triton.jit
    def _delta_step_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        a_ptr,
        beta_ptr,
        S_ptr,
        slots_ptr,
        o_ptr,
        H,
        DV,
        DK,
        DVP: tl.constexpr,
        DKP: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        slot = tl.load(slots_ptr + b).to(tl.int64)
        i = tl.arange(0, DVP)
        j = tl.arange(0, DKP)
        im, jm = i < DV, j < DK
        mask = im[:, None] & jm[None, :]
        row = b * H + h
        k = tl.load(k_ptr + row * DK + j, mask=jm, other=0.0)
        q = tl.load(q_ptr + row * DK + j, mask=jm, other=0.0)
        v = tl.load(v_ptr + row * DV + i, mask=im, other=0.0)
        a = tl.load(a_ptr + row)
        beta = tl.load(beta_ptr + row)
        s_off = (slot * H + h) * DV * DK + i[:, None] * DK + j[None, :]
        S = tl.load(S_ptr + s_off, mask=mask, other=0.0)  # (DV, DK)
        Sk = tl.sum(S * k[None, :], axis=1)
        w = beta * (v - a * Sk)
        S = a * S + w[:, None] * k[None, :]
        tl.store(S_ptr + s_off, S, mask=mask)
        o = tl.sum(S * q[None, :], axis=1)
        tl.store(o_ptr + row * DV + i, o, mask=im)

    @torch.library.triton_op("bwr::modal_step", mutates_args={"s_re", "s_im"})
    def modal_step(
        u: Tensor,
        l_re: Tensor,
        l_im: Tensor,
        r_re: Tensor,
        r_im: Tensor,
        s_re: Tensor,
        s_im: Tensor,
        slots: Tensor,
    ) -> Tensor:
        """u (B, D); l_*, r_* (D, N); s_re, s_im (P, D, N) pool, updated at rows slots (B,)
        -> y (B, D)."""
        B, D = u.shape
        N = l_re.shape[1]
        NP = triton.next_power_of_2(N)
        y = torch.empty_like(u)
        block = max(1, min(128, 4096 // NP))
        grid = (B, triton.cdiv(D, block))
        torch.library.wrap_triton(_modal_step_kernel)[grid](
            u,
            l_re,
            l_im,
            r_re,
            r_im,
            s_re,
            s_im,
            slots,
            y,
            D,
            N,
            NP=NP,
            BLOCK_D=block,
        )
        return y

    @torch.library.triton_op("bwr::delta_step", mutates_args={"S"})
    def delta_step(
        q: Tensor, k: Tensor, v: Tensor, a: Tensor, beta: Tensor, S: Tensor, slots: Tensor
    ) -> Tensor:
        """q, k (B, H, dk); v (B, H, dv); a, beta (B, H); S (P, H, dv, dk) pool, updated at rows
        slots (B,) -> o (B, H, dv)."""
        B, H, DK = k.shape
        DV = v.shape[-1]
        o = torch.empty_like(v)
        torch.library.wrap_triton(_delta_step_kernel)[(B, H)](
            q,
            k,
            v,
            a,
            beta,
            S,
            slots,
            o,
            H,
            DV,
            DK,
            DVP=triton.next_power_of_2(DV),
            DKP=triton.next_power_of_2(DK),
            num_warps=4,
        )
        return o
