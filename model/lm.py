"""ByteLM: the byte-level recurrent language model, in its parallel and recurrent forms.

Glossary of shapes:
    B  batch (sessions, or slots of the state pool)
    T  bytes in a chunk
    D  width (d_model)
    V  vocabulary, 260
    N  modes of a Hyena channel's modal filter
    H  heads of a delta-rule block; dk = dv = D / H
    M  memory slots a read sees; m slots per compression
    S  bytes per memory segment

The contract: `forward(tokens)` over T bytes and T calls of `step` give the same logits, and
`prefill(chunk)` leaves the state exactly as stepping the chunk byte by byte would. Memory is an
input: forward, prefill and step read only the slots they are given and never compress on their
own; `compress` is called explicitly (by the training routine and by memory workers).

State is a dict of named tensors with a leading batch/slot dimension, allocated once by
`allocate_state` and updated in place by `prefill` and `step`; `slots` picks the rows of a
larger pool to advance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model.compressor import SegmentCompressor
from model.config import ModelConfig
from model.decode_cache import DecodeCache
from model.delta import DeltaMixer
from model.hyena import HyenaMixer
from model.layers import RMSNorm, SwiGLU, project
from model.memread import MemoryRead, MemorySlots

State = dict[str, Tensor]


class MixBlock(nn.Module):
    """Pre-norm residual block: a sequence mixer (Hyena or delta rule), then a SwiGLU MLP."""

    def __init__(self, cfg: ModelConfig, kind: str) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer: HyenaMixer | DeltaMixer = HyenaMixer(cfg) if kind == "H" else DeltaMixer(cfg)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden)

    def forward(self, x: Tensor, state: State | None, want_state: bool) -> tuple[Tensor, State]:
        y, new = self.mixer(self.norm1(x), state, want_state)
        x = x + y
        return x + self.mlp(self.norm2(x)), new

    def step(
        self, x: Tensor, pool: State, slots: Tensor | None, cache: DecodeCache | None, key: str
    ) -> Tensor:
        if cache is None or slots is None or not x.is_cuda:
            x = x + self.mixer.step_pool(self.norm1(x), pool, slots, cache, key)
            return x + self.mlp(self.norm2(x))
        # Fused: each projection makes its own input (norm, gate) and adds the residual.
        x = self.mixer.step_pool(x, pool, slots, cache, key, norm=self.norm1, res=x)
        up = project(x, cache[key + "up"], norm=self.norm2)  # (B, 2 hidden): gate, up
        return project(up, cache[key + "down"], glu=True, res=x)


class ReadBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.read = MemoryRead(cfg)

    def forward(
        self, x: Tensor, memory: MemorySlots | None, kv: tuple[Tensor, Tensor, Tensor] | None = None
    ) -> Tensor:
        return x + self.read(x, memory, kv=kv)[0]


@dataclass
class RunOutput:
    logits: Tensor  # (B, T, V), or (B, 1, V) with last_only
    capture: Tensor  # (B, T, D) residual stream after block capture_layer: what memory compresses
    state: State  # state after the last byte (empty unless asked for)


class ByteLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        D = config.d_model
        self.embed = nn.Embedding(config.vocab, D)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(
            ReadBlock(config) if k == "R" else MixBlock(config, k) for k in config.layout
        )
        self.norm = RMSNorm(D, config.norm_eps)
        self.head = nn.Linear(D, config.vocab, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        self.compressor = SegmentCompressor(config)
        self._scale_residual_outputs()

    def _scale_residual_outputs(self) -> None:
        # GPT-2 style: shrink each residual branch's last projection by depth.
        std = 0.02 / (2 * self.config.n_layers) ** 0.5
        for name, p in self.named_parameters():
            if name.endswith(("out_proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, std=std)

    # ----- state -----

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for i, block in enumerate(self.blocks):
            if isinstance(block, MixBlock):
                for name, shape in block.mixer.state_shapes().items():
                    shapes[f"{i}.{name}"] = shape
        return shapes

    def allocate_state(self, batch: int, device: torch.device | str | None = None) -> State:
        """Zeroed recurrent state for `batch` rows (float32), allocated once."""
        if device is None:
            device = self.embed.weight.device
        return {k: torch.zeros(batch, *s, device=device) for k, s in self.state_shapes().items()}

    def state_bytes_per_row(self) -> int:
        return sum(4 * int(torch.Size(s).numel()) for s in self.state_shapes().values())

    # ----- parallel form -----

    def run(
        self,
        tokens: Tensor,
        state: State | None = None,
        memory: MemorySlots | None = None,
        *,
        want_state: bool = False,
        last_only: bool = False,
    ) -> RunOutput:
        """Functional parallel pass (differentiable): tokens (B, T) from `state` (None = zeros)."""
        x = self.embed(tokens)  # (B, T, D)
        new: State = {}
        capture = x
        for i, block in enumerate(self.blocks):
            if isinstance(block, ReadBlock):
                x = block(x, memory)
            else:
                sub = None if state is None else _sub(state, i)
                x, ns = block(x, sub, want_state)
                new.update({f"{i}.{k}": v for k, v in ns.items()})
            if i == self.config.capture_layer:
                capture = x
        if last_only:
            x = x[:, -1:]
        return RunOutput(self.head(self.norm(x)), capture, new)

    def forward(self, tokens: Tensor, memory: MemorySlots | None = None) -> Tensor:
        """tokens (B, T) long -> logits (B, T, V), from an empty state."""
        return self.run(tokens, None, memory).logits

    @torch.no_grad()
    def prefill(
        self,
        tokens: Tensor,
        state: State,
        slots: Tensor | None = None,
        memory: MemorySlots | None = None,
        *,
        return_hidden: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Advance `state` (rows `slots`, or all) over tokens (B, T) as if each byte had been
        stepped; -> logits of the last position (B, V) (and the captured hidden (B, T, D))."""
        cur = _gather(state, slots)
        captures, logits = [], None
        for piece in tokens.split(self.config.prefill_chunk, dim=1):
            out = self.run(piece, cur, memory, want_state=True, last_only=True)
            cur, logits = out.state, out.logits[:, -1]
            if return_hidden:
                captures.append(out.capture)
        _scatter(state, slots, cur)
        assert logits is not None, "prefill needs at least one byte"
        return (logits, torch.cat(captures, 1)) if return_hidden else logits

    # ----- recurrent form -----

    @torch.no_grad()
    def step(
        self,
        tokens: Tensor,
        state: State,
        slots: Tensor | None = None,
        memory: MemorySlots | None = None,
        *,
        return_hidden: bool = False,
        cache: DecodeCache | None = None,
        memory_kv: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] | None = None,
        picks: dict[int, Tensor] | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """One byte per row: tokens (B,) -> logits (B, V) (and captured hidden (B, D)); `state`
        rows `slots` (or all rows) are updated in place. With a decode cache (see
        decode_cache.py) and slots on a GPU, the fused path runs. memory_kv: per read block,
        keys/values/valid/ages as its memory_kv returns them (then `memory` is not read). picks: a
        dict that receives, per read block, the memory slots each head picked (B, Hr, k), -1 for
        the null slot (what an inspector shows as "the last read")."""
        x = self.embed(tokens)  # (B, D)
        capture = x
        for i, block in enumerate(self.blocks):
            if isinstance(block, ReadBlock):
                kv = None if memory_kv is None else memory_kv[i]
                y, picked = block.read(x.unsqueeze(1), memory, picks is not None, kv)
                x = x + y.squeeze(1)
                if picks is not None and picked is not None:
                    picks[i] = picked[:, :, 0]
            else:
                x = block.step(
                    x, _sub(state, i), slots, cache, f"{i}."
                )  # updates the pool rows in place
            if i == self.config.capture_layer:
                capture = x
        fused = cache is not None and slots is not None and x.is_cuda
        if fused:
            logits = project(x, cache["head"], norm=self.norm).float()
        else:
            logits = self.head(self.norm(x))
        return (logits, capture) if return_hidden else logits

    # ----- memory -----

    def compress(self, hidden: Tensor, level: int | Tensor, mask: Tensor | None = None) -> Tensor:
        """hidden (B, L, D) -> (B, m, D) slots for `level` (segment -> level 1, level i -> i+1)."""
        return self.compressor(hidden, level, mask)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ----- checkpoints -----

    def save(self, path: str, dtype: torch.dtype = torch.float32) -> None:
        from model.checkpoint import save_checkpoint

        save_checkpoint(self, path, dtype=dtype)

    @classmethod
    def load(cls, path: str, device: torch.device | str = "cpu") -> ByteLM:
        from model.checkpoint import load_checkpoint

        return load_checkpoint(path, device)


def _sub(state: State, layer: int) -> State:
    prefix = f"{layer}."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _gather(state: State, slots: Tensor | None) -> State:
    return dict(state) if slots is None else {k: v.index_select(0, slots) for k, v in state.items()}


def _scatter(state: State, slots: Tensor | None, new: State) -> None:
    for k, v in state.items():
        if slots is None:
            v.copy_(new[k])
        else:
            v.index_copy_(0, slots, new[k])
