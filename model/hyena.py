"""The Hyena block with an implicit long filter in modal form.

Each channel d has a causal filter h_d(t) = Re sum_n R_{d,n} lambda_{d,n}^t, |lambda| < 1, whose
poles and residues come from a small filter network over learned per-channel features. The same
function is computed two ways:

- parallel (training, prefill): by chunks of CHUNK bytes, a Toeplitz matrix of h within each
  chunk and the modal state carried across chunks, as batched matmuls (chunked_modal_conv; or,
  switch LONG_CONV, h materialised over the piece and convolved by FFT, O(T log T)), plus the
  contribution of the incoming modal state;
- recurrent (decode): s_t = lambda * s_{t-1} + u_t, y_t = Re(R . s_t), O(1) per byte.

The filter is defined for every t >= 0: there is no maximum length and no position table.

Shapes: B batch, T bytes, D channels, N modes. Complex numbers are kept as (re, im) pairs of
real tensors so the decode step stays friendly to CUDA graphs and compilers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import kernels
from model.config import ModelConfig
from model.layers import RMSNorm, ShortConv, linear, project

State = dict[str, Tensor]

# How the parallel form computes the long convolution: "fft" (h over the whole piece, convolved
# by FFT, float32) or "chunked" (the modal form by chunks of CHUNK bytes: a Toeplitz matrix of h
# within each chunk and the modal state carried across chunks, all as batched matmuls; pieces
# whose length is not a multiple of CHUNK take the FFT). CHUNKED_DTYPE: what those matmuls read,
# "float32" (TF32 on a GPU where allowed) or "bfloat16" (the carried state stays float32).
LONG_CONV = "chunked"
CHUNK = 64
CHUNKED_DTYPE = "float32"


class ModalFilter(nn.Module):
    """Filter network: per-channel features -> N poles and residues per channel."""

    def __init__(self, channels: int, order: int, features: int, hidden: int) -> None:
        super().__init__()
        self.order = order
        self.features = nn.Parameter(torch.randn(channels, features))
        self.net = nn.Sequential(
            nn.Linear(features, hidden), nn.SiLU(), nn.Linear(hidden, 4 * order)
        )
        nn.init.normal_(self.net[2].weight, std=0.02)
        nn.init.zeros_(self.net[2].bias)
        # Log-spaced decay rates from about 1 byte to about 10^4 bytes, jittered per channel,
        # so the filters start with a spread of timescales (as S4D-style inits do).
        base = torch.linspace(math.log(1e-4), math.log(1.0), order)
        self.log_rate = nn.Parameter(base + 0.1 * torch.randn(channels, order))
        self.angle = nn.Parameter(torch.randn(channels, order) * 1.5)
        self.residue = nn.Parameter(torch.randn(channels, order, 2) / order)

    def forward(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """-> log|lambda| (D, N) (negative), arg lambda (D, N), residue re and im (D, N)."""
        out = self.net(self.features).view(-1, self.order, 4)  # (D, N, 4)
        rate = torch.exp((self.log_rate + out[..., 0]).clamp(max=3.0)) + 1e-6  # -log|lambda| > 0
        theta = math.pi * torch.sigmoid(self.angle + out[..., 1])
        res = self.residue + out[..., 2:]  # (D, N, 2)
        return -rate, theta, res[..., 0], res[..., 1]

    def poles(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """-> lambda re and im, residue re and im, each (D, N): what the recurrence needs."""
        log_mag, theta, r_re, r_im = self()
        mag = torch.exp(log_mag)
        return mag * torch.cos(theta), mag * torch.sin(theta), r_re, r_im


def modal_powers(
    log_mag: Tensor, theta: Tensor, length: int, stride: int = 1
) -> tuple[Tensor, Tensor]:
    """lambda^(stride t) for t = 0..length-1 -> re, im each (D, N, length).

    The phase theta * stride * t is formed in float64 and reduced mod 2 pi before the cosine, so
    long chunks keep the same accuracy as short ones.
    """
    t = torch.arange(length, device=log_mag.device, dtype=torch.float64) * stride
    phase = torch.remainder(theta.double().unsqueeze(-1) * t, 2 * math.pi).to(log_mag.dtype)
    mag = torch.exp(log_mag.double().unsqueeze(-1) * t).to(log_mag.dtype)
    return mag * torch.cos(phase), mag * torch.sin(phase)


def chunked_modal_conv(
    u: Tensor,
    log_mag: Tensor,
    theta: Tensor,
    r_re: Tensor,
    r_im: Tensor,
    state: State | None,
    want_state: bool,
    chunk: int,
) -> tuple[Tensor, State]:
    """The long convolution of HyenaMixer._long_conv by chunks: u (B, D, T), T a multiple of
    chunk -> (B, D, T) and the new modal state, the same function as the FFT path.

    With C = chunk and n = T / C chunks, per channel: within a chunk y = Hc u, Hc the (C, C)
    lower-triangular Toeplitz matrix of h_0..h_{C-1}; each chunk's input adds e_c = sum_j
    lambda^{C-1-j} u_{c,j} to the modal state, carried as s_{c+1} = lambda^C s_c + e_c (in closed
    form: a lower-triangular (n + 1, n) matrix of powers of lambda^C, complex); the state at a
    chunk's start adds Re(R lambda^{i+1} s_c) at its i-th byte. Only lambda^0..lambda^C and the
    powers of lambda^C are formed, not h over all of T."""
    B, D, T = u.shape
    C = chunk
    n = T // C
    N = log_mag.shape[-1]
    dt = torch.bfloat16 if CHUNKED_DTYPE == "bfloat16" else u.dtype
    p_re, p_im = modal_powers(log_mag, theta, C + 1)  # lambda^0..lambda^C, (D, N, C + 1)
    h = torch.einsum("dn,dnt->dt", r_re, p_re[..., :C]) - torch.einsum(
        "dn,dnt->dt", r_im, p_im[..., :C]
    )
    i = torch.arange(C, device=u.device)
    lag = i.unsqueeze(1) - i.unsqueeze(0)  # (C, C): i - j
    Hc = torch.where(lag >= 0, h[:, lag.clamp(min=0)], 0.0)  # (D, C, C)
    uc = u.reshape(B, D, n, C)
    y = torch.einsum("dij,bdcj->bdci", Hc.to(dt), uc.to(dt)).to(u.dtype)
    # e_c, re and im side by side: (B, D, n, 2N)
    rev = torch.cat([p_re[..., :C].flip(-1), p_im[..., :C].flip(-1)], 1)  # (D, 2N, C)
    e = torch.einsum("dkj,bdcj->bdck", rev.to(dt), uc.to(dt)).to(u.dtype)
    e_re, e_im = e[..., :N], e[..., N:]
    # s_c = sum_{c' < c} (lambda^C)^{c - 1 - c'} e_c' (+ (lambda^C)^c s0), c = 0..n
    L_re, L_im = modal_powers(log_mag, theta, n + 1, C)  # (D, N, n + 1)
    c = torch.arange(n + 1, device=u.device)
    gap = c.unsqueeze(1) - 1 - c[:n].unsqueeze(0)  # (n + 1, n): c - 1 - c'
    M_re = torch.where(gap >= 0, L_re[..., gap.clamp(min=0)], 0.0)  # (D, N, n + 1, n)
    M_im = torch.where(gap >= 0, L_im[..., gap.clamp(min=0)], 0.0)
    s_re = torch.einsum("dncq,bdqn->bdcn", M_re, e_re) - torch.einsum("dncq,bdqn->bdcn", M_im, e_im)
    s_im = torch.einsum("dncq,bdqn->bdcn", M_re, e_im) + torch.einsum("dncq,bdqn->bdcn", M_im, e_re)
    if state is not None:
        s0_re, s0_im = state["s_re"].unsqueeze(2), state["s_im"].unsqueeze(2)  # (B, D, 1, N)
        Lt_re, Lt_im = L_re.transpose(1, 2), L_im.transpose(1, 2)  # (D, n + 1, N)
        s_re = s_re + Lt_re * s0_re - Lt_im * s0_im
        s_im = s_im + Lt_re * s0_im + Lt_im * s0_re
    # Re(R lambda^{i+1} s_c) = sum_n G_re s_re - G_im s_im, G = R lambda^{i+1}, (D, N, C)
    g_re = r_re.unsqueeze(-1) * p_re[..., 1:] - r_im.unsqueeze(-1) * p_im[..., 1:]
    g_im = r_re.unsqueeze(-1) * p_im[..., 1:] + r_im.unsqueeze(-1) * p_re[..., 1:]
    G = torch.cat([g_re, -g_im], 1)  # (D, 2N, C)
    S = torch.cat([s_re[:, :, :n], s_im[:, :, :n]], -1)  # (B, D, n, 2N)
    y = y + torch.einsum("dki,bdck->bdci", G.to(dt), S.to(dt)).to(u.dtype)
    new: State = {"s_re": s_re[:, :, n], "s_im": s_im[:, :, n]} if want_state else {}
    return y.reshape(B, D, T), new


def fft_causal_conv(u: Tensor, h: Tensor) -> Tensor:
    """u (B, D, T), h (D, T) -> (B, D, T): y_t = sum_{s <= t} h_{t-s} u_s."""
    T = u.shape[-1]
    n = 2 * T
    y = torch.fft.irfft(torch.fft.rfft(u.float(), n=n) * torch.fft.rfft(h.float(), n=n), n=n)
    return y[..., :T].to(u.dtype)


def direct_causal_conv(u: Tensor, h: Tensor) -> Tensor:
    """Reference for fft_causal_conv, O(T^2): used by tests."""
    T = u.shape[-1]
    kernel = h.flip(-1).unsqueeze(1)  # (D, 1, T)
    return F.conv1d(F.pad(u, (T - 1, 0)), kernel, groups=u.shape[1])


class HyenaMixer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D = cfg.d_model
        self.d = D
        self.order = cfg.filter_order
        self.in_proj = nn.Linear(D, 3 * D, bias=False)
        self.short = ShortConv(3 * D, cfg.short_kernel)
        self.filter = ModalFilter(D, cfg.filter_order, cfg.filter_features, cfg.filter_hidden)
        self.skip = nn.Parameter(torch.ones(D))
        self.out_proj = nn.Linear(D, D, bias=False)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            "conv": self.short.state_shape(),
            "s_re": (self.d, self.order),
            "s_im": (self.d, self.order),
        }

    def forward(self, x: Tensor, state: State | None, want_state: bool) -> tuple[Tensor, State]:
        """Parallel form. x (B, T, D) -> y (B, T, D) and the state after the last byte."""
        _B, _T, _D = x.shape
        z, conv = self.short(self.in_proj(x), None if state is None else state["conv"])
        x1, x2, v = z.chunk(3, dim=-1)
        with torch.autocast(x.device.type, enabled=False):  # the long convolution in float32
            y, new = self._long_conv(
                (x1 * v).transpose(1, 2).float(), state, want_state
            )  # (B, D, T)
        u = (x1 * v).float()
        y = x2 * (y.transpose(1, 2) + self.skip * u)
        return self.out_proj(y.to(x2.dtype)), {**new, "conv": conv} if want_state else {}

    def _long_conv(self, u: Tensor, state: State | None, want_state: bool) -> tuple[Tensor, State]:
        """u (B, D, T) -> h conv u plus the incoming state's part (B, D, T), and the new state."""
        T = u.shape[-1]
        log_mag, theta, r_re, r_im = self.filter()
        if LONG_CONV == "chunked" and T % CHUNK == 0:
            return chunked_modal_conv(u, log_mag, theta, r_re, r_im, state, want_state, CHUNK)
        p_re, p_im = modal_powers(log_mag, theta, T + 1)  # (D, N, T+1)
        h = torch.einsum("dn,dnt->dt", r_re, p_re[..., :T]) - torch.einsum(
            "dn,dnt->dt", r_im, p_im[..., :T]
        )
        y = fft_causal_conv(u, h)  # (B, D, T)
        new: State = {}
        if state is not None:
            # Incoming modal state s0 contributes Re(R lambda^{t+1} s0) at position t.
            s_re, s_im = state["s_re"], state["s_im"]  # (B, D, N)
            c_re = r_re * s_re - r_im * s_im
            c_im = r_re * s_im + r_im * s_re
            y = (
                y
                + torch.einsum("bdn,dnt->bdt", c_re, p_re[..., 1:])
                - torch.einsum("bdn,dnt->bdt", c_im, p_im[..., 1:])
            )
        if want_state:
            # s_T = lambda^T s0 + sum_t lambda^{T-1-t} u_t
            rev_re, rev_im = p_re[..., :T].flip(-1), p_im[..., :T].flip(-1)
            n_re = torch.einsum("bdt,dnt->bdn", u, rev_re)
            n_im = torch.einsum("bdt,dnt->bdn", u, rev_im)
            if state is not None:
                l_re, l_im = p_re[..., T], p_im[..., T]  # lambda^T (D, N)
                n_re = n_re + l_re * s_re - l_im * s_im
                n_im = n_im + l_re * s_im + l_im * s_re
            new = {"s_re": n_re, "s_im": n_im}
        return y, new

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
        projections fold both in). Fused on the GPU (the conv, the modal recurrence and the gate
        in one kernel, one pass over the states; weights from the decode cache), eager
        elsewhere."""
        if slots is None or cache is None or not kernels.available(x):
            cur = {k: v if slots is None else v.index_select(0, slots) for k, v in pool.items()}
            y, new = self.step(x if norm is None else norm(x), cur)
            for k, v in pool.items():
                v.copy_(new[k]) if slots is None else v.index_copy_(0, slots, new[k])
            return y if res is None else res + y
        w = cache[key + "in"]
        z = project(x, w, norm=norm)  # (B, 3D) in the decode weights' dtype
        l_re, l_im, r_re, r_im = cache[key + "poles"].unbind(0)
        y = kernels.hyena_step(
            z, self.short.weight, self.short.bias, pool["conv"], l_re, l_im, r_re, r_im,
            pool["s_re"], pool["s_im"], self.skip, slots,
        )  # fmt: skip
        out = cache[key + "out"]
        return linear(y, out) if res is None else project(y, out, res=res)

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """Recurrent form. x (B, D) -> y (B, D) and the next state."""
        z, conv = self.short.step(self.in_proj(x), state["conv"])
        x1, x2, v = z.chunk(3, dim=-1)
        u = x1 * v  # (B, D)
        l_re, l_im, r_re, r_im = self.filter.poles()  # (D, N)
        s_re, s_im = state["s_re"], state["s_im"]
        n_re = l_re * s_re - l_im * s_im + u.unsqueeze(-1)
        n_im = l_re * s_im + l_im * s_re
        y = (r_re * n_re - r_im * n_im).sum(-1)  # (B, D)
        y = x2 * (y + self.skip * u)
        return self.out_proj(y), {"conv": conv, "s_re": n_re, "s_im": n_im}
