"""The associative-memory block: a gated delta rule per head.

    S_t = a_t S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T,   o_t = S_t q_t

with k and q L2-normalised, a (decay) and b (write strength) from sigmoids. Two forms:

- chunkwise-parallel (training, prefill): within a chunk of C bytes the writes are solved as a
  unit-lower-triangular system (the WY form), across chunks the state is carried; pure PyTorch,
  runs on the CPU;
- recurrent (decode): one rank-one update per byte.

Shapes: B batch, T bytes, H heads, C chunk, dk = dv = D / H. The state S is (B, H, dv, dk).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import kernels
from model.config import ModelConfig
from model.layers import RMSNorm, ShortConv, linear

State = dict[str, Tensor]


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


def _chunked(
    q: Tensor, k: Tensor, v: Tensor, log_a: Tensor, b: Tensor, S: Tensor | None, chunk: int
) -> tuple[Tensor, Tensor]:
    B, H, T, dk = k.shape
    dv = v.shape[-1]
    if S is None:
        S = k.new_zeros(B, H, dv, dk)
    pad = (-T) % chunk
    if pad:  # padding writes nothing (b = 0) and keeps the state (a = 1)
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        log_a, b = F.pad(log_a, (0, pad)), F.pad(b, (0, pad))
    n = (T + pad) // chunk
    q, k, v = (x.reshape(B, H, n, chunk, -1) for x in (q, k, v))  # (B, H, n, C, d)
    log_a, b = log_a.reshape(B, H, n, chunk), b.reshape(B, H, n, chunk)
    lg = log_a.cumsum(-1)  # log gamma_i within the chunk, (B, H, n, C)
    diff = lg.unsqueeze(-1) - lg.unsqueeze(-2)  # log(gamma_i / gamma_j), (B, H, n, C, C)
    strict = torch.ones(chunk, chunk, dtype=torch.bool, device=k.device).tril(-1)
    incl = torch.ones(chunk, chunk, dtype=torch.bool, device=k.device).tril()
    decay_strict = torch.where(strict, diff, float("-inf")).exp()
    decay_incl = torch.where(incl, diff, float("-inf")).exp()
    # (I + A) W = b V - b gamma K S0^T, A_ij = b_i gamma_i / gamma_j (k_i . k_j) for j < i.
    A = b.unsqueeze(-1) * decay_strict * (k @ k.transpose(-1, -2))
    eye = torch.eye(chunk, device=k.device, dtype=k.dtype)
    L = eye + A
    gamma = lg.exp()
    U = torch.linalg.solve_triangular(L, b.unsqueeze(-1) * v, upper=False, unitriangular=True)
    Wk = torch.linalg.solve_triangular(
        L, (b * gamma).unsqueeze(-1) * k, upper=False, unitriangular=True
    )
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
    ) -> Tensor:
        """Recurrent form on a state pool: rows `slots` (all if None) advance one byte in place.
        x (B, D) -> y (B, D). Fused on the GPU (one matmul for all input projections from the
        decode cache, then the conv, the delta rule, the norm and the gate in one kernel, one pass
        over S), eager elsewhere."""
        if slots is None or cache is None or not kernels.available(x):
            cur = {k: v if slots is None else v.index_select(0, slots) for k, v in pool.items()}
            y, new = self.step(x, cur)
            for k, v in pool.items():
                v.copy_(new[k]) if slots is None else v.index_copy_(0, slots, new[k])
            return y
        w = cache[key + "in"]
        z = F.linear(x.to(w.dtype), w)  # (B, 4D + 2H): q, k, v, decay and write logits, gate
        o = kernels.delta_step(
            z, cache[key + "in_bias"], self.short.weight, self.short.bias, pool["conv"],
            pool["S"], self.out_norm.weight, self.out_norm.eps, slots,
        )  # fmt: skip
        return linear(o, cache[key + "out"])

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """Recurrent form. x (B, D) -> y (B, D) and the next state."""
        q, k, v, log_a, b, conv = self._project(x, state["conv"], step=True)
        o, S = delta_rule_step(q, k, v, log_a.exp(), b, state["S"])
        return self._output(x, o), {"conv": conv, "S": S}
