"""Small shared pieces of the network: RMSNorm, SwiGLU, and the short causal depthwise conv.

Shapes: B batch, T bytes, C channels, K kernel width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import kernels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class ShortConv(nn.Module):
    """Causal depthwise conv of width K; its recurrent state is the last K-1 inputs."""

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.weight = nn.Parameter(torch.randn(channels, kernel) / kernel**0.5)
        self.bias = nn.Parameter(torch.zeros(channels))

    def state_shape(self) -> tuple[int, int]:
        return (self.weight.shape[0], self.kernel - 1)

    def forward(self, x: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
        """x (B, T, C), state (B, C, K-1) or None for zeros -> y (B, T, C), new state.

        On a GPU or under torch.compile: K shifted multiply-adds in the (B, T, C) layout (no
        transposes; compiled, forward and backward each fuse into one kernel, where the depthwise
        conv1d and its backward took 15% of a training step of `base` on an H100). Elsewhere the
        depthwise conv1d, about 1.7x faster in eager CPU code. Both compute the same sums."""
        B, T, C = x.shape
        if state is None:
            state = x.new_zeros(B, C, self.kernel - 1)
        full = torch.cat([state.transpose(1, 2).to(x.dtype), x], dim=1)  # (B, T+K-1, C)
        shifted = x.is_cuda or torch.compiler.is_compiling()
        y = self.shifted_sums(full, T) if shifted else self.conv(full)
        return y, full[:, T:].transpose(1, 2)

    def shifted_sums(self, full: Tensor, T: int) -> Tensor:
        """full (B, T+K-1, C) -> y (B, T, C), summed in float32 (bf16 under autocast too)."""
        w = self.weight.float()
        y = full[:, 0:T].float() * w[:, 0]
        for j in range(1, self.kernel):
            y = y + full[:, j : j + T].float() * w[:, j]
        return (y + self.bias.float()).to(full.dtype)

    def conv(self, full: Tensor) -> Tensor:
        """The same as shifted_sums, as a depthwise conv1d."""
        C = full.shape[-1]
        w = self.weight.unsqueeze(1).to(full.dtype)
        y = F.conv1d(full.transpose(1, 2), w, self.bias.to(full.dtype), groups=C)
        return y.transpose(1, 2)

    def step(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, C), state (B, C, K-1) -> y (B, C), new state."""
        full = torch.cat([state, x.unsqueeze(-1)], dim=-1)  # (B, C, K)
        y = (full * self.weight).sum(-1) + self.bias
        return y, full[..., 1:]


def project(
    x: Tensor,
    w: Tensor,
    norm: RMSNorm | None = None,
    glu: bool = False,
    res: Tensor | None = None,
) -> Tensor:
    """A decode projection x (M, K) @ w.T in w's dtype (a decode cache weight); glu: x is
    (M, 2K) and silu(x[:, :K]) * x[:, K:] goes in; norm: RMS-normalised first; res: -> res + the
    product, in float32. A few rows on a GPU take the GEMV kernel, which does all of it in one
    launch (model/kernels.py); elsewhere F.linear and the pieces around it."""
    if kernels.use_gemv(x) and w.shape[1] <= kernels.GEMV_MAX_K:
        nw = None if norm is None else norm.weight
        return kernels.gemv(x, w, nw, 0.0 if norm is None else norm.eps, glu, res)
    if glu:
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate) * up
    if norm is not None:
        x = norm(x)
    y = F.linear(x.to(w.dtype), w)
    return y if res is None else res + y.float()


def linear(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ w.T computed in w's dtype (bfloat16 decode weights), result in float32."""
    y = project(x, w).float()
    return y + bias if bias is not None else y
