"""DecodeCache: what the fused decode step reads instead of recomputing it every byte.

- each Hyena layer's poles and residues (a function of the weights only, so not recomputed per
  step by the filter network);
- each delta-rule layer's input projections (q/k/v, decay/write logits, output gate) as one
  matrix, so one matmul reads them;
- optionally bfloat16 copies of the matmul weights (halving the bytes a step reads; the
  recurrent states and their updates stay float32).

Built once by the engine's runner and refreshed in place after a weight swap (captured CUDA
graphs keep pointing at the same tensors). The eager reference step never reads it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from model.delta import DeltaMixer
from model.hyena import HyenaMixer

DecodeCache = dict[str, Tensor]


def _entries(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, Tensor]:
    from model.lm import MixBlock

    out: dict[str, Tensor] = {}
    cast = (lambda w: w) if dtype == torch.float32 else (lambda w: w.detach().to(dtype))
    for i, block in enumerate(model.blocks):  # type: ignore[attr-defined]
        if not isinstance(block, MixBlock):
            continue
        mixer = block.mixer
        if isinstance(mixer, HyenaMixer):
            out[f"{i}.poles"] = torch.stack(mixer.filter.poles()).detach()  # (4, D, N)
            out[f"{i}.in"] = cast(mixer.in_proj.weight)
        elif isinstance(mixer, DeltaMixer):
            out[f"{i}.in"] = (
                torch.cat([mixer.qkv.weight, mixer.ab.weight, mixer.gate.weight]).detach().to(dtype)
            )
            zeros = torch.zeros_like(mixer.qkv.weight[:, 0])
            out[f"{i}.in_bias"] = (
                torch.cat([zeros, mixer.ab.bias, torch.zeros_like(mixer.gate.weight[:, 0])])
                .detach()
                .float()
            )
        out[f"{i}.out"] = cast(mixer.out_proj.weight)
        out[f"{i}.up"] = cast(block.mlp.up.weight)
        out[f"{i}.down"] = cast(block.mlp.down.weight)
    out["head"] = cast(model.head.weight)  # type: ignore[attr-defined]
    return out


@torch.no_grad()
def build_decode_cache(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> DecodeCache:
    cache = _entries(model, dtype)
    cache["_dtype"] = torch.empty(0, dtype=dtype)
    return cache


@torch.no_grad()
def refresh_decode_cache(model: torch.nn.Module, cache: DecodeCache) -> None:
    """Recompute every entry into the tensors already there (after weights changed in place)."""
    fresh = _entries(model, cache["_dtype"].dtype)
    for k, v in fresh.items():
        if cache[k].data_ptr() != v.data_ptr():
            cache[k].copy_(v)
