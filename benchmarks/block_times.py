"""Where a training step's time goes: `python -m benchmarks.block_times [--config base] [--json F]`.

Times forward + backward of each part of a mixing block alone, on random inputs of the
training shape (rows x bytes x D), as the trainer runs them on a GPU (bf16 autocast, TF32,
each part compiled by torch.compile as `compile_blocks` compiles the blocks; `--compile off`
for eager): the whole Hyena and delta-rule blocks (mixer, then SwiGLU MLP), each mixer alone,
the MLP alone, and Hyena's long convolution alone (filter, FFT convolution, float32) against the
same block without it (the long convolution's output replaced by zeros). With the block counts
of the config's layout, the parts add up to an estimate of the model's step without the
embedding, head, loss and optimizer, printed beside them.

`--long-conv fft,chunked,chunked-bf16` times the Hyena parts again for each path of
`model.hyena.LONG_CONV`.

Prints a table and, with --json, writes {"config", "rows", "seq", "device", "gpu", "torch",
"compile", "long_conv", "parts": [{"part", "ms", "count", "peak_GB"}], "estimate_ms"}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from model import ModelConfig, hyena
from model.hyena import HyenaMixer
from model.layers import RMSNorm
from model.lm import MixBlock


class LongConv(nn.Module):
    """Hyena's long convolution alone: the filter and the FFT convolution of u (B, T, D)."""

    def __init__(self, mixer: HyenaMixer) -> None:
        super().__init__()
        self.mixer = mixer

    def forward(self, u: Tensor) -> Tensor:
        with torch.autocast(u.device.type, enabled=False):
            y, _ = self.mixer._long_conv(u.transpose(1, 2).float(), None, False)
        return y.transpose(1, 2)


class NoLongConv(nn.Module):
    """A Hyena block with the long convolution's output replaced by zeros: the rest of its work."""

    def __init__(self, block: MixBlock) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        m = self.block.mixer
        assert isinstance(m, HyenaMixer)
        z, _ = m.short(m.in_proj(self.block.norm1(x)), None)
        x1, x2, v = z.chunk(3, dim=-1)
        u = (x1 * v).float()
        y = x2 * (torch.zeros_like(u) + m.skip * u)
        x = x + m.out_proj(y.to(x2.dtype))
        return x + self.block.mlp(self.block.norm2(x))


class Mixer(nn.Module):
    def __init__(self, block: MixBlock) -> None:
        super().__init__()
        self.norm, self.mixer = block.norm1, block.mixer

    def forward(self, x: Tensor) -> Tensor:
        return self.mixer(self.norm(x), None, False)[0]


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, block: MixBlock) -> None:
        super().__init__()
        self.norm: RMSNorm = block.norm2
        self.mlp = block.mlp

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.norm(x))


class Block(nn.Module):
    def __init__(self, block: MixBlock) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x, None, False)[0]


def time_part(
    fn: Callable[[Tensor], Tensor], x: Tensor, steps: int, warmup: int, device: str
) -> tuple[float, float]:
    """Median ms of forward + backward of fn(x) under bf16 autocast (on a GPU), peak GB."""

    def once() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            out = fn(x)
        out.float().square().mean().backward()

    for _ in range(warmup):
        once()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        once()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else 0.0
    return 1e3 * statistics.median(times), peak


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="base")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", choices=("blocks", "off"), default="blocks")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--long-conv",
        default=hyena.LONG_CONV,
        help="Hyena's long convolution paths, comma-separated: fft, chunked, chunked-bf16"
        " (model.hyena.LONG_CONV, CHUNKED_DTYPE); the first for every part, the others for the"
        " Hyena block and the long convolution again",
    )
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    dev = args.device
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = ModelConfig.named(args.config)
    torch.manual_seed(0)
    hb, db = MixBlock(cfg, "H").to(dev), MixBlock(cfg, "D").to(dev)
    assert isinstance(hb.mixer, HyenaMixer)
    n_h, n_d = cfg.layout.count("H"), cfg.layout.count("D")
    parts: list[tuple[str, nn.Module, int, int]] = [  # name, module, count in the model, width
        ("hyena block", Block(hb), n_h, cfg.d_model),
        ("hyena block without the long conv", NoLongConv(hb), 0, cfg.d_model),
        ("hyena mixer", Mixer(hb), 0, cfg.d_model),
        ("hyena long conv (filter + FFT)", LongConv(hb.mixer), 0, cfg.d_model),
        ("delta block", Block(db), n_d, cfg.d_model),
        ("delta mixer", Mixer(db), 0, cfg.d_model),
        ("SwiGLU MLP", MLP(cfg, hb), 0, cfg.d_model),
    ]
    # Each --long-conv path again for the parts that hold the long convolution.
    variants = args.long_conv.split(",")
    for variant in variants[1:]:
        parts += [
            (f"hyena block, {variant}", Block(hb), 0, cfg.d_model),
            (f"hyena long conv, {variant}", LongConv(hb.mixer), 0, cfg.d_model),
        ]
    rows = []
    print(f"{args.config}: {args.rows} x {args.seq} x {cfg.d_model}, {dev}, compile {args.compile}")
    print(f"{'part':<36} {'ms':>8} {'count':>6} {'peak GB':>8}")
    for name, mod, count, width in parts:
        variant = name.split(", ")[1] if ", " in name else variants[0]
        hyena.LONG_CONV = "fft" if variant == "fft" else "chunked"
        hyena.CHUNKED_DTYPE = "bfloat16" if variant.endswith("bf16") else "float32"
        torch._dynamo.reset()  # the switches are read when a block is traced
        fn: Callable[[Tensor], Tensor] = mod
        if args.compile == "blocks":
            fn = torch.compile(mod)
        x = torch.randn(args.rows, args.seq, width, device=dev, requires_grad=True)
        try:
            ms, peak = time_part(fn, x, args.steps, args.warmup, dev)
        except Exception as e:  # report, keep measuring the other parts
            print(f"{name:<36} {type(e).__name__}: {str(e)[:200]}")
            rows.append({"part": name, "error": f"{type(e).__name__}: {e}"[:400]})
            continue
        rows.append({"part": name, "ms": ms, "count": count, "peak_GB": peak})
        print(f"{name:<36} {ms:8.2f} {count:>6} {peak:8.1f}", flush=True)
        del x
        if dev == "cuda":
            torch.cuda.empty_cache()
    estimate = sum(r["ms"] * r["count"] for r in rows if "ms" in r)
    print(f"blocks of the layout {cfg.layout} without the read block(s): {estimate:.1f} ms")
    out = {
        "bench": "block_times",
        "config": args.config,
        "rows": args.rows,
        "seq": args.seq,
        "device": dev,
        "gpu": torch.cuda.get_device_name() if dev == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "compile": args.compile,
        "long_conv": args.long_conv,
        "date": datetime.date.today().isoformat(),
        "parts": rows,
        "estimate_ms": estimate,
    }
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
