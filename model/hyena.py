"""The Hyena block with an implicit long filter in modal form.

Each channel d has a causal filter h_d(t) = Re sum_n R_{d,n} lambda_{d,n}^t, |lambda| < 1, whose
poles and residues come from a small filter network over learned per-channel features. The same
function is computed two ways:

- parallel (training, prefill): materialise h over the chunk and convolve by FFT, O(T log T),
  plus the contribution of the incoming modal state;
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


def modal_powers(log_mag: Tensor, theta: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """lambda^t for t = 0..length-1 -> re, im each (D, N, length).

    The phase theta * t is formed in float64 and reduced mod 2 pi before the cosine, so long
    chunks keep the same accuracy as short ones.
    """
    t = torch.arange(length, device=log_mag.device, dtype=torch.float64)
    phase = torch.remainder(theta.double().unsqueeze(-1) * t, 2 * math.pi).to(log_mag.dtype)
    mag = torch.exp(log_mag.double().unsqueeze(-1) * t).to(log_mag.dtype)
    return mag * torch.cos(phase), mag * torch.sin(phase)


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
