"""ModelConfig: every knob of the network, with named presets.

config.py owns the shape of the model and nothing else: it never touches tensors.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

VOCAB = 260  # 256 byte values + BOS, EOS, PAD, SEP
FORMAT_VERSION = 1  # bump when the meaning of a saved config or weight name changes

BLOCK_KINDS = {"H": "hyena", "D": "delta", "R": "read"}


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 128  # residual width D
    layout: str = "HDRHD"  # one letter per block: H hyena, D delta rule, R memory read
    vocab: int = VOCAB  # byte vocabulary (fixed by the codec)
    mlp_mult: float = 8 / 3  # SwiGLU hidden = round(mlp_mult * D), rounded to 16
    short_kernel: int = 4  # short causal depthwise conv width (Hyena and delta projections)
    filter_order: int = 16  # N: modes of each channel's modal long filter
    filter_features: int = 32  # learned per-channel features feeding the filter network
    filter_hidden: int = 64  # hidden width of the filter network
    delta_heads: int = 4  # H: heads of the gated delta-rule block
    delta_chunk: int = 64  # chunk length of the chunkwise-parallel delta rule
    read_heads: int = 4  # heads of the memory read block
    read_topk: int = 16  # k: slots each read attends to
    segment_len: int = 512  # S: bytes per memory segment
    mem_slots: int = 8  # m: slots one compression produces
    mem_levels: int = 4  # levels of the hierarchy (level embeddings; +1 for a namespace level)
    age_buckets: int = 16  # log2 buckets of a slot's age in segments
    capture_layer: int = -1  # block whose output is compressed into memory (-1: before first R)
    compress_heads: int = 4  # heads of the attention-pooling compressor
    prefill_chunk: int = 1024  # longest piece the parallel form handles at once with state
    norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_embeddings: bool = False  # share the input embedding with the output head
    name: str = field(default="custom", compare=False)  # preset this came from (informational)

    def __post_init__(self) -> None:
        bad = set(self.layout) - set(BLOCK_KINDS)
        if bad or not self.layout:
            raise ValueError(f"layout {self.layout!r}: letters must be from {sorted(BLOCK_KINDS)}")
        if self.d_model % self.delta_heads or self.d_model % self.read_heads:
            raise ValueError("d_model must divide by delta_heads and read_heads")
        if self.d_model % self.compress_heads:
            raise ValueError("d_model must divide by compress_heads")
        if self.vocab != VOCAB:
            raise ValueError(f"vocab is fixed at {VOCAB} by the byte codec")
        if self.capture_layer == -1:
            first_read = self.layout.find("R")
            object.__setattr__(
                self, "capture_layer", max(first_read - 1, 0) if first_read > 0 else 0
            )
        if not 0 <= self.capture_layer < len(self.layout):
            raise ValueError(
                f"capture_layer {self.capture_layer} outside the {len(self.layout)} blocks"
            )

    @property
    def n_layers(self) -> int:
        return len(self.layout)

    @property
    def mlp_hidden(self) -> int:
        return round(self.mlp_mult * self.d_model / 16) * 16

    @property
    def delta_head_dim(self) -> int:
        return self.d_model // self.delta_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps({"format_version": FORMAT_VERSION, "config": self.to_dict()}, indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}")
        return cls(**data)

    def compatible(self, other: ModelConfig) -> bool:
        """Same shapes everywhere: weights of one load into the other and states carry over."""
        a, b = self.to_dict(), other.to_dict()
        a.pop("name"), b.pop("name")
        return a == b

    def replace(self, **changes: Any) -> ModelConfig:
        if "layout" in changes and "capture_layer" not in changes:
            changes["capture_layer"] = -1  # derived from the layout: derive it again
        return dataclasses.replace(self, **changes)

    @classmethod
    def named(cls, name: str) -> ModelConfig:
        try:
            preset = PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown model {name!r}; known: {sorted(PRESETS)}") from None
        return cls(name=name, **preset)


PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests: under 1M parameters.
    "tiny": dict(
        d_model=96,
        layout="HDRHD",
        filter_order=8,
        filter_features=16,
        filter_hidden=32,
        delta_heads=2,
        read_heads=2,
        read_topk=8,
        segment_len=128,
        mem_slots=4,
        compress_heads=2,
        delta_chunk=32,
        prefill_chunk=512,
    ),
    # CPU demo: about 10M parameters.
    "small": dict(
        d_model=320,
        layout="HDHRDHD",
        filter_order=16,
        delta_heads=4,
        read_heads=4,
        read_topk=16,
        segment_len=512,
        mem_slots=8,
    ),
    # GPU: about 100M parameters, width 768, 12 mixing layers.
    "base": dict(
        d_model=768,
        layout="HDHDHDRHDHDHD",
        filter_order=16,
        filter_features=64,
        filter_hidden=128,
        delta_heads=12,
        read_heads=12,
        read_topk=32,
        segment_len=1024,
        mem_slots=16,
        compress_heads=12,
        prefill_chunk=2048,
    ),
}
