"""Checkpoints: a directory holding model.safetensors (weights) and config.json (format version,
ModelConfig, and the weights file's SHA-256). Loading checks all three and says what is wrong; it
never guesses. A checkpoint written before the checksum existed loads without that check.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from model.config import FORMAT_VERSION, ModelConfig

if TYPE_CHECKING:
    from model.lm import ByteLM

WEIGHTS, CONFIG = "model.safetensors", "config.json"
CHECKSUM = "weights_sha256"  # config.json's record of the weights file


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, of another format version, or of another shape."""


def save_checkpoint(
    model: ByteLM,
    path: str | Path,
    extra: dict[str, object] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write weights (float32, or bfloat16 to halve the file; loading casts back to float32)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(dtype).contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        tensors.pop("head.weight", None)
    tmp = out / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format_version": str(FORMAT_VERSION)})
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    tmp.replace(out / WEIGHTS)  # atomic: a reader never sees half a file
    meta = json.loads(model.config.to_json())
    meta.update(extra or {})
    meta[CHECKSUM] = digest
    (out / CONFIG).write_text(json.dumps(meta, indent=2))
    return out


def read_config(path: str | Path) -> tuple[ModelConfig, dict[str, object]]:
    p = Path(path)
    cfg_file = p / CONFIG
    if not cfg_file.is_file():
        raise CheckpointError(
            f"{p}: no {CONFIG} (a checkpoint is a directory with {WEIGHTS} and {CONFIG})"
        )
    try:
        meta = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_file}: format version {version!r}, this code reads {FORMAT_VERSION}"
        )
    try:
        config = ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: bad config ({e})") from None
    return config, meta


def load_weights(
    path: str | Path, config: ModelConfig, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Read and check the weights of a checkpoint against `config` (names and shapes)."""
    from model.lm import ByteLM

    wfile = Path(path) / WEIGHTS
    if not wfile.is_file():
        raise CheckpointError(f"{path}: no {WEIGHTS}")
    data = wfile.read_bytes()
    want = _recorded_checksum(Path(path))
    if want is not None and hashlib.sha256(data).hexdigest() != want:
        raise CheckpointError(
            f"{wfile}: damaged: its SHA-256 is not the one {CONFIG} records ({want[:16]}...);"
            " copy or fetch the checkpoint again"
        )
    try:
        tensors = {k: t.to(device) for k, t in load(data).items()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{wfile}: corrupt weights ({e})") from None
    with torch.device("meta"):
        expected = ByteLM(config).state_dict()
    if config.tie_embeddings:
        expected.pop("head.weight", None)
    missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{wfile}: weights do not match the config: missing {sorted(missing)[:5]},"
            f" unexpected {sorted(unexpected)[:5]}"
        )
    wrong = [  # in the model's own order, so the message does not depend on the file's
        f"{k} has shape {tuple(tensors[k].shape)}, config wants {tuple(e.shape)}"
        for k, e in expected.items()
        if tensors[k].shape != e.shape
    ]
    if wrong:
        raise CheckpointError(
            f"{wfile}: {len(wrong)} tensors do not fit the config: " + "; ".join(wrong[:3])
        )
    return {k: t.float() for k, t in tensors.items()}


def _recorded_checksum(path: Path) -> str | None:
    """The weights checksum config.json records; None for a checkpoint written without one."""
    try:
        meta = json.loads((path / CONFIG).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None  # read_config reports a missing or broken config.json
    value = meta.get(CHECKSUM) if isinstance(meta, dict) else None
    if value is not None and not isinstance(value, str):
        raise CheckpointError(f"{path / CONFIG}: {CHECKSUM} is not a string")
    return value


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> ByteLM:
    from model.lm import ByteLM

    config, _ = read_config(path)
    tensors = load_weights(path, config, device)
    model = ByteLM(config).to(device)
    model.load_state_dict(tensors, strict=not config.tie_embeddings)
    return model
