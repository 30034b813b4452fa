"""Fused decode kernels (Triton, CUDA only): each mixer's whole recurrent step between its input
and output projections, updating the state pool in place.

- hyena_step: the short causal conv of the three branches, u = x1 * v, the modal recurrence
  s = lambda s + u, y = Re(R . s), and the gate x2 * (y + skip u);
- delta_step: the short conv of q, k, v, SiLU, L2-normalised q and k, the decay and write
  strength (sigmoids of their logits), the gated delta rule S = a S + b (v - a S k) k^T,
  o = S q, the per-head RMSNorm and the SiLU output gate;
- sample_step: a decode step's sampling (engine.sampling.sample: bans, temperature, top-k,
  top-p, the counter-based Gumbel noise) with each row's parameters gathered from its slot and
  the slot's sample counter and last id written back, one program per row.

Each program reads one slot's states straight from the pool (indexed by the slot tensor) and
writes them back once: one read and one write of the state per step, and one kernel per mixer
where the unfused step launches a dozen. They are registered as torch library ops so
torch.compile traces through them. The eager steps in hyena.py and delta.py are the reference;
benchmarks/gpu_checks.py holds them equal on the device.

Shapes: B rows this step, P pool rows, D channels, N modes, H heads, dk = dv head width, K the
short conv's width. The projections' outputs z arrive in the decode weights' dtype (float32 or
bfloat16) and the kernels compute in float32; their outputs are in z's dtype, ready for the
output projection. Without Triton or a GPU, `available()` is False and callers use the eager path.
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


# Launch shapes (benchmarks/gpu_profile.py --sweep measures alternatives on the device).
# gemv_rows: most rows a projection may have to take the GEMV kernel (0: never).
TUNING = {
    "hyena_channels": 128,
    "hyena_warps": 4,
    "delta_warps": 4,
    "gemv_rows": 1,
    "gemv_warps": 8,
}
GEMV_CTAS = 132  # programs a GEMV aims for at least: one per SM of an H100
GEMV_TILE = 8192  # most elements of w one GEMV program holds
GEMV_MAX_K = 8192  # wider inputs go to cuBLAS


def use_gemv(x: Tensor) -> bool:
    """Whether a decode projection of x (M, K) takes the GEMV kernel: a few rows on a GPU (at
    four rows cuBLAS was as fast on an H100: docs/BENCHMARKS.md), never under autograd (the
    kernel has no backward)."""
    return (
        available(x)
        and not (x.requires_grad and torch.is_grad_enabled())
        and x.dim() == 2
        and x.shape[0] <= TUNING["gemv_rows"]
        and x.shape[1] <= 2 * GEMV_MAX_K
    )


if HAVE_TRITON:

    @triton.jit
    def _conv_step(z_row, w_ptr, b_ptr, st_ptr, c, cmask, K1: tl.constexpr, KP: tl.constexpr):
        """Short causal conv of channels c for one byte: returns the conv output and writes the
        channels' new window (the last K-1 inputs) back. z_row: this row's inputs; st_ptr: this
        slot's (C, K-1) window; w (C, K), b (C)."""
        t = tl.arange(0, KP)
        x = tl.load(z_row + c, mask=cmask, other=0.0).to(tl.float32)
        win = cmask[:, None] & (t < K1)[None, :]
        old = tl.load(st_ptr + c[:, None] * K1 + t[None, :], mask=win, other=0.0)
        taps = tl.where((t == K1)[None, :], x[:, None], old)  # (C, KP): window then this input
        w = tl.load(
            w_ptr + c[:, None] * (K1 + 1) + t[None, :],
            mask=cmask[:, None] & (t <= K1)[None, :],
            other=0.0,
        )
        y = tl.sum(taps * w, axis=1) + tl.load(b_ptr + c, mask=cmask, other=0.0)
        nxt = tl.load(  # the window shifted by one: old[t + 1], then this input last
            st_ptr + c[:, None] * K1 + t[None, :] + 1,
            mask=cmask[:, None] & (t + 1 < K1)[None, :],
            other=0.0,
        )
        nxt = tl.where((t == K1 - 1)[None, :], x[:, None], nxt)
        tl.debug_barrier()  # every read of the window before it is overwritten
        tl.store(st_ptr + c[:, None] * K1 + t[None, :], nxt, mask=win)
        return y

    @triton.jit
    def _hyena_step_kernel(
        z_ptr,
        cw_ptr,
        cb_ptr,
        conv_ptr,
        lre_ptr,
        lim_ptr,
        rre_ptr,
        rim_ptr,
        sre_ptr,
        sim_ptr,
        skip_ptr,
        slots_ptr,
        y_ptr,
        D,
        N,
        K1: tl.constexpr,
        KP: tl.constexpr,
        NP: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0)
        d0 = tl.program_id(1) * BLOCK_D
        slot = tl.load(slots_ptr + b).to(tl.int64)
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        z_row = z_ptr + b * 3 * D
        st = conv_ptr + slot * 3 * D * K1
        x1 = _conv_step(z_row, cw_ptr, cb_ptr, st, d, dmask, K1, KP)
        x2 = _conv_step(z_row, cw_ptr, cb_ptr, st, D + d, dmask, K1, KP)
        v = _conv_step(z_row, cw_ptr, cb_ptr, st, 2 * D + d, dmask, K1, KP)
        u = x1 * v
        n = tl.arange(0, NP)
        mask = dmask[:, None] & (n < N)[None, :]
        dn = d[:, None] * N + n[None, :]  # (BLOCK_D, N) offsets into (D, N)
        s_off = slot * D * N + dn
        s_re = tl.load(sre_ptr + s_off, mask=mask, other=0.0)
        s_im = tl.load(sim_ptr + s_off, mask=mask, other=0.0)
        l_re = tl.load(lre_ptr + dn, mask=mask, other=0.0)
        l_im = tl.load(lim_ptr + dn, mask=mask, other=0.0)
        r_re = tl.load(rre_ptr + dn, mask=mask, other=0.0)
        r_im = tl.load(rim_ptr + dn, mask=mask, other=0.0)
        n_re = l_re * s_re - l_im * s_im + u[:, None]
        n_im = l_re * s_im + l_im * s_re
        tl.store(sre_ptr + s_off, n_re, mask=mask)
        tl.store(sim_ptr + s_off, n_im, mask=mask)
        y = tl.sum(r_re * n_re - r_im * n_im, axis=1)
        skip = tl.load(skip_ptr + d, mask=dmask, other=0.0)
        out = x2 * (y + skip * u)
        tl.store(y_ptr + b * D + d, out.to(y_ptr.dtype.element_ty), mask=dmask)

    @triton.jit
    def _delta_step_kernel(
        z_ptr,
        bias_ptr,
        cw_ptr,
        cb_ptr,
        conv_ptr,
        S_ptr,
        nw_ptr,
        slots_ptr,
        o_ptr,
        eps,
        H,
        DK,
        DKP: tl.constexpr,
        K1: tl.constexpr,
        KP: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        D = H * DK
        slot = tl.load(slots_ptr + b).to(tl.int64)
        i = tl.arange(0, DKP)  # value rows of S
        j = tl.arange(0, DKP)  # key columns of S
        im, jm = i < DK, j < DK
        z_row = z_ptr + b * (4 * D + 2 * H)  # qkv (3D), decay and write logits (2H), gate (D)
        st = conv_ptr + slot * 3 * D * K1
        q = _conv_step(z_row, cw_ptr, cb_ptr, st, h * DK + j, jm, K1, KP)
        k = _conv_step(z_row, cw_ptr, cb_ptr, st, D + h * DK + j, jm, K1, KP)
        v = _conv_step(z_row, cw_ptr, cb_ptr, st, 2 * D + h * DK + i, im, K1, KP)
        q = q * tl.sigmoid(q)
        k = k * tl.sigmoid(k)
        v = v * tl.sigmoid(v)
        q = q / tl.maximum(tl.sqrt(tl.sum(q * q, axis=0)), 1e-12)
        k = k / tl.maximum(tl.sqrt(tl.sum(k * k, axis=0)), 1e-12)
        a = tl.sigmoid(tl.load(z_row + 3 * D + h).to(tl.float32) + tl.load(bias_ptr + 3 * D + h))
        beta = tl.sigmoid(
            tl.load(z_row + 3 * D + H + h).to(tl.float32) + tl.load(bias_ptr + 3 * D + H + h)
        )
        s_off = (slot * H + h) * DK * DK + i[:, None] * DK + j[None, :]
        smask = im[:, None] & jm[None, :]
        S = tl.load(S_ptr + s_off, mask=smask, other=0.0)  # (dv, dk)
        Sk = tl.sum(S * k[None, :], axis=1)
        w = beta * (v - a * Sk)
        S = a * S + w[:, None] * k[None, :]
        tl.store(S_ptr + s_off, S, mask=smask)
        o = tl.sum(S * q[None, :], axis=1)
        o = o * tl.rsqrt(tl.sum(o * o, axis=0) / DK + eps) * tl.load(nw_ptr + i, mask=im, other=0.0)
        g = tl.load(z_row + 3 * D + 2 * H + h * DK + i, mask=im, other=0.0).to(tl.float32)
        o = o * (g * tl.sigmoid(g))
        tl.store(o_ptr + b * D + h * DK + i, o.to(o_ptr.dtype.element_ty), mask=im)

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, y_ptr, nw_ptr, res_ptr, M, N, K, x_stride, eps,
        MP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        NORM: tl.constexpr, GLU: tl.constexpr, RES: tl.constexpr,
    ):  # fmt: skip
        """y[m, n] = sum_k x[m, k] w[n, k] (+ res[m, n]) for BLOCK_N outputs n of every row
        m < M (M <= MP, K <= BLOCK_K): each program loads its BLOCK_N rows of w whole, once, in
        one round trip to memory, and reuses them for every row of x. The input row is taken
        whole too, so it can be made here: silu(gate) * up from a (gate, up) row (GLU), then
        RMS-normalised with weight nw (NORM)."""
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.arange(0, BLOCK_K)
        nm, km = n < N, k < K
        w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=nm[:, None] & km[None, :], other=0.0)
        w = w.to(tl.float32)
        if NORM:
            nw = tl.load(nw_ptr + k, mask=km, other=0.0).to(tl.float32)
        for m in tl.static_range(MP):
            rm = km & (m < M)
            x = tl.load(x_ptr + m * x_stride + k, mask=rm, other=0.0).to(tl.float32)
            if GLU:
                up = tl.load(x_ptr + m * x_stride + K + k, mask=rm, other=0.0).to(tl.float32)
                x = x * tl.sigmoid(x) * up
            if NORM:
                x = x * tl.rsqrt(tl.sum(x * x, axis=0) / K + eps) * nw
            y = tl.sum(w * x[None, :], axis=1)
            if RES:
                y += tl.load(res_ptr + m * N + n, mask=nm & (m < M), other=0.0)
            tl.store(y_ptr + m * N + n, y.to(y_ptr.dtype.element_ty), mask=nm & (m < M))

    @torch.library.triton_op("bwr::gemv", mutates_args={})
    def gemv(
        x: Tensor,
        w: Tensor,
        norm_w: Tensor | None = None,
        eps: float = 0.0,
        glu: bool = False,
        res: Tensor | None = None,
    ) -> Tensor:
        """x (M, K) @ w (N, K)^T for a few rows M -> (M, N) in w's dtype, accumulated in float32;
        with glu, x is (M, 2K) and the product takes silu(x[:, :K]) * x[:, K:]; with norm_w (K),
        the RMS norm of that row (eps); with res (M, N) float32, res + the product in float32.
        cuBLAS tiles N by 64 for one row: 36 programs for a 2,304 x 768 weight on 132 SMs, each
        streaming 96 KB, about 4.6 us; here N is cut finer (a program's tile of w at most
        GEMV_TILE elements, whole rows) so that many programs share the weight's bytes, each in
        one load; making the input row in the same program saves the launch of a kernel for the
        norm or the gate (a decode step at batch 1 is 48 projections and their glue)."""
        M = x.shape[0]
        N, K = w.shape
        x = x.contiguous()
        out_dtype = torch.float32 if res is not None else w.dtype
        y = torch.empty(M, N, dtype=out_dtype, device=x.device)
        block_k = triton.next_power_of_2(K)
        block_n = max(1, min(32, GEMV_TILE // block_k))
        while block_n > 1 and triton.cdiv(N, block_n) < GEMV_CTAS:
            block_n //= 2
        torch.library.wrap_triton(_gemv_kernel)[(triton.cdiv(N, block_n),)](
            x, w, y, w if norm_w is None else norm_w, y if res is None else res.contiguous(),
            M, N, K, x.shape[1], eps,
            MP=triton.next_power_of_2(M), BLOCK_N=block_n, BLOCK_K=block_k,
            NORM=norm_w is not None, GLU=glu, RES=res is not None,
            num_warps=TUNING["gemv_warps"],
        )  # fmt: skip
        return y

    @torch.library.triton_op("bwr::hyena_step", mutates_args={"conv", "s_re", "s_im"})
    def hyena_step(
        z: Tensor,
        conv_w: Tensor,
        conv_b: Tensor,
        conv: Tensor,
        l_re: Tensor,
        l_im: Tensor,
        r_re: Tensor,
        r_im: Tensor,
        s_re: Tensor,
        s_im: Tensor,
        skip: Tensor,
        slots: Tensor,
    ) -> Tensor:
        """z (B, 3D) the input projection; conv_w (3D, K), conv_b (3D); conv (P, 3D, K-1),
        s_re, s_im (P, D, N) pools, updated at rows slots (B,); l_*, r_* (D, N); skip (D)
        -> (B, D) in z's dtype."""
        B, D = z.shape[0], z.shape[1] // 3
        N = l_re.shape[1]
        K = conv_w.shape[1]
        NP = triton.next_power_of_2(N)
        y = torch.empty(B, D, dtype=z.dtype, device=z.device)
        block = max(1, min(TUNING["hyena_channels"], 4096 // NP))
        grid = (B, triton.cdiv(D, block))
        torch.library.wrap_triton(_hyena_step_kernel)[grid](
            z, conv_w, conv_b, conv, l_re, l_im, r_re, r_im, s_re, s_im, skip, slots, y, D, N,
            K1=K - 1, KP=triton.next_power_of_2(K), NP=NP, BLOCK_D=block,
            num_warps=TUNING["hyena_warps"],
        )  # fmt: skip
        return y

    @torch.library.triton_op("bwr::delta_step", mutates_args={"conv", "S"})
    def delta_step(
        z: Tensor,
        bias: Tensor,
        conv_w: Tensor,
        conv_b: Tensor,
        conv: Tensor,
        S: Tensor,
        norm_w: Tensor,
        eps: float,
        slots: Tensor,
    ) -> Tensor:
        """z (B, 4D + 2H) the merged input projections (q, k, v; decay and write logits; gate),
        bias (4D + 2H); conv_w (3D, K), conv_b (3D); conv (P, 3D, K-1) and S (P, H, dv, dk)
        pools, updated at rows slots (B,); norm_w (dv) -> (B, D) in z's dtype."""
        B = z.shape[0]
        H, dv, dk = S.shape[1], S.shape[2], S.shape[3]
        assert dv == dk, "the delta rule's heads are square"
        K = conv_w.shape[1]
        o = torch.empty(B, H * dv, dtype=z.dtype, device=z.device)
        torch.library.wrap_triton(_delta_step_kernel)[(B, H)](
            z, bias, conv_w, conv_b, conv, S, norm_w, slots, o, eps, H,
            dk, DKP=triton.next_power_of_2(dk), K1=K - 1, KP=triton.next_power_of_2(K),
            num_warps=TUNING["delta_warps"],
        )  # fmt: skip
        return o


if HAVE_TRITON:

    @triton.jit
    def _mix32_tl(x):
        """engine.sampling._mix32 on int64 values in [0, 2^32): the same wrapping products."""
        x = x ^ (x >> 16)
        x = (x * 0x85EBCA6B) & 0xFFFFFFFF
        x = x ^ (x >> 13)
        x = (x * 0xC2B2AE35) & 0xFFFFFFFF
        return x ^ (x >> 16)

    @triton.jit
    def _sample_kernel(
        logits_ptr,
        stride,
        slots_ptr,
        flag_ptr,
        temp_ptr,
        topk_ptr,
        topp_ptr,
        seed_ptr,
        counter_ptr,
        noeos_ptr,
        out_ptr,
        last_ptr,
        V,
        VP: tl.constexpr,
    ):
        """One row per program: engine.sampling.sample, then the step's counter and last-id writes.

        Top-k and top-p keep a prefix of the sorted logits, so the kept set is every logit at or
        above the prefix's last value: one sort of the values, no indices."""
        r = tl.program_id(0)
        slot = tl.load(slots_ptr + r).to(tl.int64)
        v = tl.arange(0, VP)
        x = tl.load(logits_ptr + r * stride + v, mask=v < V, other=float("-inf")).to(tl.float32)
        no_eos = tl.load(noeos_ptr + slot).to(tl.int32)
        banned = (v >= V) | (v == 256) | (v >= 258) | ((v == 257) & (no_eos != 0))
        x = tl.where(banned, float("-inf"), x)
        temp = tl.load(temp_ptr + slot)
        greedy = temp <= 0
        xs = x / tl.where(greedy, 1.0, temp)
        srt = tl.sort(xs, descending=True)
        p = tl.exp(srt - tl.max(srt, axis=0))
        p = p / tl.sum(p, axis=0)
        excl = tl.cumsum(p, axis=0) - p
        k = tl.load(topk_ptr + slot)
        keep = (excl < tl.load(topp_ptr + slot)) & ((k == 0) | (v < k))
        floor = tl.min(tl.where(keep, srt, float("inf")), axis=0)
        counter = tl.load(counter_ptr + slot)
        h = _mix32_tl((tl.load(seed_ptr + slot) & 0xFFFFFFFF) ^ 0x9E3779B9)
        h = _mix32_tl((h + (counter & 0xFFFFFFFF) * 0x632BE5AB) & 0xFFFFFFFF)
        h = _mix32_tl((h ^ ((v.to(tl.int64) * 0x27D4EB2F) & 0xFFFFFFFF)) & 0xFFFFFFFF)
        u = ((h >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
        score = tl.where((xs >= floor) & ~banned, xs - tl.log(-tl.log(u)), float("-inf"))
        out = tl.where(greedy, tl.argmax(x, axis=0), tl.argmax(score, axis=0)).to(tl.int64)
        tl.store(out_ptr + r, out)
        tl.store(last_ptr + slot, out)
        tl.store(counter_ptr + slot, counter + (tl.load(flag_ptr + r) & 1))


def sample_step(
    logits: Tensor,
    slots: Tensor,
    flag: Tensor,
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    seed: Tensor,
    counter: Tensor,
    no_eos: Tensor,
    last_ids: Tensor,
) -> Tensor:
    """One kernel for a decode step's sampling: logits (n, V) of rows reading pool slots (n,)
    -> ids (n,), as engine.sampling.sample with each slot's parameters (temperature ... no_eos,
    pool-sized),
    and the writes the step makes: counter[slot] += flag & 1, last_ids[slot] = id.

    Rows must name distinct slots, but for a scratch slot whose counter and last id mean nothing.
    Equal to `sample` but where two logits tie at the top-k/top-p edge (this keeps both)."""
    n, vocab = logits.shape
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    out = torch.empty(n, dtype=torch.long, device=logits.device)
    _sample_kernel[(n,)](
        logits,
        logits.stride(0),
        slots,
        flag,
        temperature,
        top_k,
        top_p,
        seed,
        counter,
        no_eos,
        out,
        last_ids,
        vocab,
        VP=triton.next_power_of_2(vocab),
        num_warps=4,
    )
    return out
