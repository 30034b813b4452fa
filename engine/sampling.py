"""Sampling on the device: temperature, top-k, top-p and a per-session seed, for a whole batch
in a fixed sequence of tensor ops (no host sync, no data-dependent branch: CUDA-graph safe).

Randomness is counter-based: the noise for a row depends only on (session seed, how many bytes
the session has sampled, byte value), never on which other sessions share the batch, so batching
changes nothing a user can see.

`model.kernels.sample_step` is the same sampler as one Triton kernel on a GPU (the runner's
decode step takes it there).

Shapes: n rows (sessions sampling this step), V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor

BANNED = (256, 258, 259)  # BOS, PAD, SEP are never generated; EOS (257) ends a turn
EOS = 257
_M32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """murmur3's finaliser on values in [0, 2^32) held in int64 (products wrap, low bits exact)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def uniform_noise(seed: Tensor, counter: Tensor, vocab: int) -> Tensor:
    """(n,) seeds and counters -> (n, V) uniforms in (0, 1), a pure function of its inputs.

    The top 23 bits make the uniform, so every value is exact in float32 and never rounds to 0
    or 1 (a 1 would make an infinite Gumbel and turn a masked -inf logit into NaN)."""
    v = torch.arange(vocab, device=seed.device, dtype=torch.int64)
    h = _mix32((seed & _M32) ^ 0x9E3779B9)
    h = _mix32((h + (counter & _M32) * 0x632BE5AB) & _M32)
    h = _mix32((h.unsqueeze(-1) ^ ((v * 0x27D4EB2F) & _M32)) & _M32)  # (n, V)
    return ((h >> 9).float() + 0.5) * (1.0 / 2.0**23)


def sample(
    logits: Tensor,
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    seed: Tensor,
    counter: Tensor,
    no_eos: Tensor | None = None,
) -> Tensor:
    """logits (n, V); temperature, top_p (n,) float; top_k, seed, counter (n,) long; no_eos (n,)
    bool, rows that may not end their turn -> ids (n,).

    temperature 0 is greedy; top_k 0 keeps all; top_p 1 keeps all."""
    logits = logits.float().clone()
    logits[:, BANNED[0]] = float("-inf")  # slices, not an index list: no host copy in a graph
    logits[:, BANNED[1] :] = float("-inf")
    if no_eos is not None:
        logits[:, EOS] = logits[:, EOS].masked_fill(no_eos, float("-inf"))
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature)
    x = logits / t.unsqueeze(-1)
    srt, idx = x.sort(dim=-1, descending=True)
    rank = torch.arange(x.shape[-1], device=x.device)
    keep = (top_k.unsqueeze(-1) == 0) | (rank < top_k.unsqueeze(-1))
    probs = torch.softmax(srt, dim=-1)
    keep &= (probs.cumsum(-1) - probs) < top_p.unsqueeze(-1)  # the most likely always stays
    srt = srt.masked_fill(~keep, float("-inf"))
    x = torch.full_like(x, float("-inf")).scatter(-1, idx, srt)
    gumbel = -torch.log(-torch.log(uniform_noise(seed, counter, x.shape[-1])))
    choice = (x + gumbel).masked_fill(x == float("-inf"), float("-inf")).argmax(-1)
    return torch.where(greedy, logits.argmax(-1), choice)
