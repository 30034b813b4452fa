"""The segment compressor: attention pooling of a closed segment's hidden states into m slots.

The same module merges an overflowing level into the next one: any number of input vectors in,
m slots out, with the target level's embedding added to the learned queries. It compresses only
when called; the model never calls it on its own.

Shapes: B batch, L input vectors (S bytes of a segment, or slots being merged), D width,
m output slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig
from model.layers import RMSNorm, SwiGLU


class SegmentCompressor(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D = cfg.d_model
        self.heads, self.slots = cfg.compress_heads, cfg.mem_slots
        self.queries = nn.Parameter(torch.randn(cfg.mem_slots, D) * 0.02)
        self.level_emb = nn.Embedding(cfg.mem_levels + 1, D)
        nn.init.normal_(self.level_emb.weight, std=0.02)
        self.norm = RMSNorm(D, cfg.norm_eps)
        self.q = nn.Linear(D, D, bias=False)
        self.kv = nn.Linear(D, 2 * D, bias=False)
        self.out = nn.Linear(D, D, bias=False)
        self.mlp_norm = RMSNorm(D, cfg.norm_eps)
        self.mlp = SwiGLU(D, 2 * D)

    def forward(self, hidden: Tensor, level: int | Tensor, mask: Tensor | None = None) -> Tensor:
        """hidden (B, L, D), target level (int or (B,)), mask (B, L) bool -> slots (B, m, D)."""
        B, L, D = hidden.shape
        H, dh = self.heads, D // self.heads
        lvl = torch.as_tensor(level, device=hidden.device).long().expand(B)
        queries = self.queries.unsqueeze(0) + self.level_emb(lvl).unsqueeze(1)  # (B, m, D)
        q = self.q(queries).view(B, self.slots, H, dh).transpose(1, 2)
        k, v = self.kv(self.norm(hidden)).chunk(2, dim=-1)
        k = k.view(B, L, H, dh).transpose(1, 2)
        v = v.view(B, L, H, dh).transpose(1, 2)
        attn_mask = None if mask is None else mask[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, m, dh)
        slots = queries + self.out(o.transpose(1, 2).reshape(B, self.slots, D))
        return slots + self.mlp(self.mlp_norm(slots))
