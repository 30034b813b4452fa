"""Checkpoints: a round trip gives the same function; every broken checkpoint is refused with a
CheckpointError that says what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model import ByteLM, ModelConfig
from model.checkpoint import (
    CHECKSUM,
    CONFIG,
    WEIGHTS,
    CheckpointError,
    load_checkpoint,
    read_config,
    save_checkpoint,
)
from model.config import FORMAT_VERSION

SMALL = ModelConfig(
    d_model=32,
    layout="HDR",
    filter_order=2,
    filter_features=8,
    filter_hidden=16,
    delta_heads=2,
    read_heads=2,
    compress_heads=2,
    delta_chunk=8,
)


def make(cfg: ModelConfig = SMALL, seed: int = 0) -> ByteLM:
    torch.manual_seed(seed)
    return ByteLM(cfg).eval()


@pytest.fixture
def saved(tmp_path: Path) -> tuple[ByteLM, Path]:
    model = make()
    path = tmp_path / "ckpt"
    model.save(str(path))
    return model, path


def logits_of(model: ByteLM) -> torch.Tensor:
    tokens = torch.arange(0, 260, 7).view(1, -1)
    with torch.no_grad():
        return model(tokens)


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_gives_identical_logits(tmp_path: Path, tie: bool) -> None:
    model = make(SMALL.replace(tie_embeddings=tie))
    model.save(str(tmp_path / "c"))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted([WEIGHTS, CONFIG])
    loaded = ByteLM.load(str(tmp_path / "c")).eval()
    assert loaded.config == model.config
    assert torch.equal(logits_of(loaded), logits_of(model))
    if tie:
        assert loaded.head.weight is loaded.embed.weight
    # The recurrent form comes back too.
    s1, s2 = model.allocate_state(1), loaded.allocate_state(1)
    tok = torch.tensor([65])
    assert torch.equal(model.step(tok, s1), loaded.step(tok, s2))


def test_bfloat16_weights_load_as_float32(tmp_path: Path) -> None:
    model = make()
    model.save(str(tmp_path / "c"), dtype=torch.bfloat16)
    full = tmp_path / "full"
    model.save(str(full))
    assert (tmp_path / "c" / WEIGHTS).stat().st_size < 0.6 * (full / WEIGHTS).stat().st_size
    loaded = ByteLM.load(str(tmp_path / "c"))
    for name, p in loaded.state_dict().items():
        assert p.dtype == torch.float32, name
        assert torch.equal(p, model.state_dict()[name].to(torch.bfloat16).float()), name


def test_save_overwrites_and_keeps_extra_metadata(tmp_path: Path) -> None:
    save_checkpoint(make(seed=1), tmp_path / "c")
    model = make(seed=2)
    save_checkpoint(model, tmp_path / "c", extra={"step": 300, "note": "resumed"})
    config, meta = read_config(tmp_path / "c")
    assert config == SMALL and meta["step"] == 300 and meta["note"] == "resumed"
    assert meta["format_version"] == FORMAT_VERSION
    assert torch.equal(logits_of(load_checkpoint(tmp_path / "c")), logits_of(model))
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "c").iterdir())


# ----- refusals -----


def refuse(path: Path, *fragments: str) -> None:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_missing_directory(tmp_path: Path) -> None:
    refuse(tmp_path / "nowhere", "nowhere", f"no {CONFIG}", "a checkpoint is a directory")


def test_missing_weights(saved: tuple[ByteLM, Path]) -> None:
    _, path = saved
    (path / WEIGHTS).unlink()
    refuse(path, f"no {WEIGHTS}")


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda b: b[: len(b) // 2], id="truncated"),
        pytest.param(lambda b: b[:5], id="truncated-header"),
        pytest.param(lambda b: b"", id="empty"),
        pytest.param(lambda b: bytes(range(256)) * 8, id="garbage"),
        pytest.param(lambda b: b[:8] + b"\xff" * 32 + b[40:], id="garbage-in-header"),
    ],
)
def test_corrupt_weights(saved: tuple[ByteLM, Path], damage) -> None:
    _, path = saved
    wfile = path / WEIGHTS
    wfile.write_bytes(damage(wfile.read_bytes()))
    refuse(path, str(wfile), "damaged", "SHA-256")
    # a checkpoint from before the checksum: the parser still refuses what it cannot read
    meta = json.loads((path / CONFIG).read_text())
    del meta[CHECKSUM]
    (path / CONFIG).write_text(json.dumps(meta))
    refuse(path, str(wfile), "corrupt weights")


def test_a_flipped_bit_inside_tensor_data_is_refused(saved: tuple[ByteLM, Path]) -> None:
    """The safetensors header still parses, the shapes still match: only the checksum sees it."""
    _, path = saved
    wfile = path / WEIGHTS
    data = bytearray(wfile.read_bytes())
    data[-100] ^= 0x01
    wfile.write_bytes(bytes(data))
    refuse(path, str(wfile), "damaged", CONFIG)
    meta = json.loads((path / CONFIG).read_text())
    assert len(meta[CHECKSUM]) == 64
    del meta[CHECKSUM]  # without the record the flip would load silently
    (path / CONFIG).write_text(json.dumps(meta))
    load_checkpoint(path)


def test_config_not_json(saved: tuple[ByteLM, Path]) -> None:
    _, path = saved
    (path / CONFIG).write_text("{format_version: 1")
    refuse(path, CONFIG, "not valid JSON")


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 0, "1", None])
def test_wrong_format_version(saved: tuple[ByteLM, Path], version: object) -> None:
    _, path = saved
    meta = json.loads((path / CONFIG).read_text())
    meta["format_version"] = version
    (path / CONFIG).write_text(json.dumps(meta))
    refuse(path, f"format version {version!r}", f"this code reads {FORMAT_VERSION}")


def test_unknown_config_key(saved: tuple[ByteLM, Path]) -> None:
    _, path = saved
    meta = json.loads((path / CONFIG).read_text())
    meta["config"]["attention_sinks"] = 4
    (path / CONFIG).write_text(json.dumps(meta))
    refuse(path, "bad config", "unknown config fields", "attention_sinks")


def test_invalid_config_value(saved: tuple[ByteLM, Path]) -> None:
    _, path = saved
    meta = json.loads((path / CONFIG).read_text())
    meta["config"]["layout"] = "HXD"
    (path / CONFIG).write_text(json.dumps(meta))
    refuse(path, "bad config", "HXD")


def test_config_without_config_section(saved: tuple[ByteLM, Path]) -> None:
    _, path = saved
    (path / CONFIG).write_text(json.dumps({"format_version": FORMAT_VERSION}))
    refuse(path, "bad config")


def other_config_checkpoint(path: Path, other: ModelConfig) -> None:
    meta = json.loads((path / CONFIG).read_text())
    meta["config"] = other.to_dict()
    (path / CONFIG).write_text(json.dumps(meta))


def test_weights_of_another_width(saved: tuple[ByteLM, Path]) -> None:
    _, path = saved
    other_config_checkpoint(path, SMALL.replace(d_model=64))
    refuse(path, str(path / WEIGHTS), "tensors do not fit", "embed.weight has shape (260, 32)")
    refuse(path, "config wants (260, 64)")


def test_weights_of_another_layout(saved: tuple[ByteLM, Path]) -> None:
    _, path = saved
    other_config_checkpoint(path, SMALL.replace(layout="HDRD"))
    refuse(path, "weights do not match the config", "missing", "blocks.3.")


def test_weights_of_another_order(saved: tuple[ByteLM, Path]) -> None:
    _, path = saved
    other_config_checkpoint(path, SMALL.replace(filter_order=4))
    refuse(path, "blocks.0.mixer.filter", "has shape", "config wants")


def test_checkpoint_error_is_a_value_error() -> None:
    assert issubclass(CheckpointError, ValueError)


def test_replacing_the_layout_derives_the_capture_block_again() -> None:
    from model import ModelConfig

    assert ModelConfig.named("tiny").replace(layout="H").capture_layer == 0
    assert ModelConfig.named("tiny").replace(layout="HDDR").capture_layer == 2
    assert ModelConfig.named("tiny").replace(layout="HDDR", capture_layer=1).capture_layer == 1
