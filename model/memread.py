"""The memory read block and the slots it reads.

A read is a top-k attention from the current hidden state over the session's memory slots (all
levels), each slot tagged with a level and an age embedding, gated into the residual stream. A
learned null slot is always present, so an empty memory is valid and reads (almost) nothing.
The read looks at one position at a time, so its parallel and recurrent forms are the same code.

Shapes: B batch, T bytes, D width, M memory slots, Hr read heads, k slots picked per read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model import kernels
from model.config import ModelConfig
from model.layers import RMSNorm, project

NAMESPACE_LEVEL = 0  # level id of a read-only namespace memory; session levels are 1..L


def age_bucket(age_segments: Tensor, buckets: int) -> Tensor:
    """Age in segments -> log2 bucket in [0, buckets)."""
    return torch.floor(torch.log2(age_segments.float() + 1)).long().clamp(0, buckets - 1)


@dataclass
class MemorySlots:
    """What a read sees. slots (B, M, D); level, age (B, M) long; mask (B, M) bool (valid)."""

    slots: Tensor
    level: Tensor
    age: Tensor
    mask: Tensor

    @classmethod
    def empty(
        cls, batch: int, dim: int, device: torch.device | str | None = None, capacity: int = 0
    ) -> MemorySlots:
        """`capacity` invalid slots: valid input that reads nothing but the null slot."""
        return cls(
            slots=torch.zeros(batch, capacity, dim, device=device),
            level=torch.zeros(batch, capacity, dtype=torch.long, device=device),
            age=torch.zeros(batch, capacity, dtype=torch.long, device=device),
            mask=torch.zeros(batch, capacity, dtype=torch.bool, device=device),
        )

    @property
    def size(self) -> int:
        return self.slots.shape[1]

    def index(self, rows: Tensor) -> MemorySlots:
        return MemorySlots(self.slots[rows], self.level[rows], self.age[rows], self.mask[rows])


class MemoryRead(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D = cfg.d_model
        self.heads, self.head_dim, self.topk = cfg.read_heads, D // cfg.read_heads, cfg.read_topk
        self.norm = RMSNorm(D, cfg.norm_eps)
        self.mem_norm = RMSNorm(D, cfg.norm_eps)
        self.level_emb = nn.Embedding(cfg.mem_levels + 1, D)
        self.age_emb = nn.Embedding(cfg.age_buckets, D)
        nn.init.normal_(self.level_emb.weight, std=0.02)
        nn.init.normal_(self.age_emb.weight, std=0.02)
        self.q = nn.Linear(D, D, bias=False)
        self.kv = nn.Linear(D, 2 * D, bias=False)
        self.null_kv = nn.Parameter(torch.randn(2, D) * 0.02)
        self.out = nn.Linear(D, D, bias=False)
        self.gate = nn.Linear(D, D)
        nn.init.constant_(self.gate.bias, -2.0)  # start mostly closed: memory earns its way in

    def memory_kv(
        self, memory: MemorySlots | None, batch: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Keys and values of the slots (a null slot first) without their age terms -> keys,
        values (B, Hr, M+1, dh), valid (B, M+1), age buckets (B, M+1) (-1: the null slot, which
        has no age). A slot's key is kv(mem_norm(slot) + level + age) and the projection is
        linear, so the age term splits off: kv(age_emb) is one small table, added at read time
        (`forward`). What is left depends only on the memory version, so a server computes it
        once per version (and weights), not at every step or segment."""
        Hr, dh, D = self.heads, self.head_dim, self.heads * self.head_dim
        null = self.null_kv.view(2, 1, 1, D).expand(2, batch, 1, D)
        dev = self.null_kv.device
        if memory is None or memory.size == 0:
            keys, values = null[0], null[1]
            valid = torch.ones(batch, 1, dtype=torch.bool, device=dev)
            age = torch.full((batch, 1), -1, dtype=torch.long, device=dev)
        else:
            m = self.mem_norm(memory.slots) + self.level_emb(memory.level)
            k, v = self.kv(m).chunk(2, dim=-1)  # (B, M, D)
            keys, values = torch.cat([null[0], k], 1), torch.cat([null[1], v], 1)  # (B, M+1, D)
            valid = torch.cat([memory.mask.new_ones(batch, 1), memory.mask], 1)
            age = torch.cat([memory.age.new_full((batch, 1), -1), memory.age], 1)
        M1 = keys.shape[1]
        keys = keys.reshape(batch, M1, Hr, dh).transpose(1, 2)  # (B, Hr, M+1, dh)
        values = values.reshape(batch, M1, Hr, dh).transpose(1, 2)
        return keys, values, valid, age

    def age_kv(self) -> tuple[Tensor, Tensor]:
        """The age terms of keys and values: kv(age_emb) -> (Hr, A, dh) each, A age buckets."""
        Hr, dh = self.heads, self.head_dim
        k, v = self.kv(self.age_emb.weight).chunk(2, dim=-1)  # (A, D)
        A = k.shape[0]
        return k.view(A, Hr, dh).transpose(0, 1), v.view(A, Hr, dh).transpose(0, 1)

    def _attend(
        self, q: Tensor, keys: Tensor, values: Tensor, valid: Tensor, age: Tensor, picks: bool
    ) -> tuple[Tensor, Tensor | None]:
        """Top-k attention of q (B, Hr, T, dh) over the slots (a null slot first), their age
        terms added (see forward) -> (B, Hr, T, dh), and the picks if asked."""
        dh, M1 = self.head_dim, keys.shape[2]
        age_k, age_v = self.age_kv()  # (Hr, A, dh)
        buckets = torch.arange(age_k.shape[1], device=age.device)
        onehot = (age.unsqueeze(-1) == buckets).to(q.dtype)[:, None]  # (B, 1, M+1, A)
        scores = q @ keys.transpose(-1, -2)  # (B, Hr, T, M+1)
        scores = scores + (q @ age_k.transpose(-1, -2)) @ onehot.transpose(-1, -2)
        scores = (scores / math.sqrt(dh)).masked_fill(~valid[:, None, None, :], float("-inf"))
        k_eff = min(self.topk, M1)
        picked = None
        if k_eff < M1:  # keep the k best slots per query, drop the rest
            top, idx = scores.topk(k_eff, dim=-1)
            scores = scores.masked_fill(scores < top[..., -1:], float("-inf"))
            picked = idx - 1 if picks else None
        elif picks:
            picked = scores.argsort(dim=-1, descending=True) - 1
        attn = torch.softmax(scores, dim=-1)
        return attn @ values + (attn @ onehot) @ age_v, picked

    def forward(
        self,
        x: Tensor,
        memory: MemorySlots | None,
        return_picks: bool = False,
        kv: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """x (B, T, D) residual stream -> residual update (B, T, D), and optionally the picked
        slot indices (B, Hr, T, k) into memory (-1 = the null slot). kv: precomputed
        memory_kv(memory) with the age buckets of this read (then memory is not read).

        With one-hot ages O (B, M+1, A) and the age table Ka, Va: the keys are K + O Ka, so
        q.keys = q.K + (q Ka^T) O^T, and the output attn (V + O Va) = attn V + (attn O) Va: two
        products over A buckets instead of adding the table into every slot's key and value."""
        B, T, D = x.shape
        Hr, dh = self.heads, self.head_dim
        gemv = T == 1 and kernels.use_gemv(x[:, 0])  # decode at a row or two: the GEMV kernel
        keys, values, valid, age = self.memory_kv(memory, B) if kv is None else kv
        M1 = keys.shape[2]
        if gemv:  # the norm made inside each projection's kernel
            g = (project(x[:, 0], self.gate.weight, norm=self.norm) + self.gate.bias).view(B, T, D)
        else:
            h = self.norm(x)
            g = self.gate(h)
        if M1 == 1 and not torch.is_grad_enabled():
            # the null slot alone takes all the attention: no query needed (under autograd the
            # query stays in the graph, with its zero gradient, for DDP's sake)
            o = values.to(x.dtype).expand(B, Hr, T, dh)
            picks = torch.full((B, Hr, T, 1), -1, device=x.device) if return_picks else None
        else:
            q = project(x[:, 0], self.q.weight, norm=self.norm).view(B, T, D) if gemv else self.q(h)
            q = q.view(B, T, Hr, dh).transpose(1, 2)  # (B, Hr, T, dh)
            # a server may cache keys and values in bfloat16
            kq, vq = keys.to(q.dtype), values.to(q.dtype)
            o, picks = self._attend(q, kq, vq, valid, age, return_picks)
        o = o.transpose(1, 2).reshape(B, T, D)
        y = project(o[:, 0], self.out.weight).view(B, T, D) if gemv else self.out(o)
        return y * torch.sigmoid(g), picks
