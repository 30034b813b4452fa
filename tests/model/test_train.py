"""Training: `tiny` learns English from a small text file, and `bwr train` / `bwr model info` work
end to end. The text is tests/data/english.txt (plain English prose written for these tests)."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gateway.cli import build_parser, text_train_config
from gateway.cli import main as bwr
from model import ByteLM, ModelConfig
from model.codec import EOS
from model.train import TrainConfig, file_documents, lr_at, pack, train, unigram_entropy

TEXT = Path(__file__).parent.parent / "data" / "english.txt"


def test_unigram_entropy() -> None:
    assert unigram_entropy(b"aaaa") == 0.0
    assert math.isclose(unigram_entropy(bytes(range(256)) * 3), math.log(256), rel_tol=1e-9)
    assert math.isclose(unigram_entropy(b"abab"), math.log(2), rel_tol=1e-9)


def test_pack_streams_documents_with_eos() -> None:
    docs = [b"hello", b"world!", b"xy"] * 10
    batches = list(pack(iter(docs), batch_size=2, seq_len=7))
    flat = torch.cat([torch.tensor([*d, EOS]) for d in docs])
    assert all(b.shape == (2, 8) for b in batches)
    assert len(batches) == flat.numel() // 16
    assert torch.equal(torch.cat([b.flatten() for b in batches]), flat[: 16 * len(batches)])


def test_lr_schedule() -> None:
    cfg = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    assert lr_at(1000, cfg) == pytest.approx(0.1)


def test_time_budget_ends_training_early() -> None:
    """A budget spent by the first step ends training after it."""
    torch.manual_seed(0)
    model = ByteLM(ModelConfig.named("tiny"))
    cfg = TrainConfig(
        steps=1000, batch_size=2, seq_len=16, warmup=2, log_every=1, time_budget_s=1e-9
    )
    logs = train(model, pack(file_documents(TEXT, doc_bytes=256), 2, 16), cfg)
    assert [e.step for e in logs] == [0]


def test_slow_steps_stop_at_the_budget_with_the_schedule_fitted() -> None:
    """Slow steps: the cosine schedule is fitted to the steps the budget allows (the learning
    rate ends near its floor, not near its peak as 1,000 steps would leave it), and the run
    stops at the budget."""
    torch.manual_seed(0)
    model = ByteLM(ModelConfig.named("tiny"))
    cfg = TrainConfig(
        steps=1000, batch_size=2, seq_len=16, warmup=2, log_every=1, time_budget_s=1.5
    )

    def slow() -> Iterator[torch.Tensor]:
        for batch in pack(file_documents(TEXT, doc_bytes=256), 2, 16):
            time.sleep(0.1)
            yield batch

    t0 = time.perf_counter()
    logs = train(model, slow(), cfg)
    assert 4 < len(logs) < 40  # about 1.5 s of 0.1-s steps; 1,000 without the budget
    assert logs[-1].lr < 0.5 * cfg.lr
    assert time.perf_counter() - t0 < 1.5 + 5  # one step past the budget at most, and set-up


@pytest.mark.slow
def test_tiny_learns_english() -> None:
    """300 steps take the loss well below what a model that ignores context can reach."""
    data = TEXT.read_bytes()
    entropy = unigram_entropy(data)  # about 2.9 nats for English prose
    torch.manual_seed(0)
    model = ByteLM(ModelConfig.named("tiny"))
    cfg = TrainConfig(steps=300, batch_size=8, seq_len=128, log_every=50)
    logs = train(
        model, pack(file_documents(TEXT, doc_bytes=1024), cfg.batch_size, cfg.seq_len), cfg
    )
    assert logs[0].loss > entropy  # starts near log(260), ignorant
    assert logs[-1].step == cfg.steps - 1
    assert logs[-1].loss < 0.6 * entropy, [(e.step, round(e.loss, 3)) for e in logs]
    assert not model.training

    # The same holds over the whole text, not only the last batch.
    ids = torch.tensor(list(data[: (len(data) // 1025) * 1025])).view(-1, 1025)
    with torch.no_grad():
        logits = model(ids[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()
    assert loss < 0.6 * entropy


def test_bwr_train_writes_a_loadable_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ckpt"
    rc = bwr(
        [
            "train",
            "--text",
            str(TEXT),
            "--config",
            "tiny",
            "--steps",
            "5",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert re.search(r"step\s+4\s+loss \d+\.\d+", printed), printed
    assert f"saved {out}" in printed

    model = ByteLM.load(str(out))
    assert model.config == ModelConfig.named("tiny")
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([list(b"The river")]))).all()

    assert bwr(["model", "info", str(out)]) == 0
    assert f"{model.num_parameters():,}" in capsys.readouterr().out


def test_bwr_train_text_honours_every_trainer_flag() -> None:
    """The --text path reads the same trainer flags as the DOCS consumer (a flag that parses
    must not be ignored): curriculum, compilation, checkpointing, warmup, logging; --minutes is
    the time budget."""
    argv = ["train", "--text", str(TEXT), "--out", "x", "--steps", "40", "--minutes", "0.5"]
    argv += ["--curriculum", "0:32x1,0.5:64x2", "--train-compile", "off", "--grad-checkpoint"]
    argv += ["--warmup", "3", "--log-every", "7", "--batch-size", "4", "--seq-len", "64"]
    cfg = text_train_config(build_parser().parse_args(argv))
    assert cfg.curriculum == ((0.0, 32, 1), (0.5, 64, 2))
    assert (cfg.compile, cfg.grad_checkpoint, cfg.warmup, cfg.log_every) == ("off", True, 3, 7)
    assert (cfg.steps, cfg.batch_size, cfg.seq_len, cfg.time_budget_s) == (40, 4, 64, 30.0)
    plain = text_train_config(build_parser().parse_args(["train", "--text", str(TEXT)]))
    assert plain == TrainConfig(lr=3e-3)  # no flags: the library's defaults


def test_bwr_train_needs_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bwr(["train", "--out", str(tmp_path / "x")]) == 2
    assert "give --text FILE --out DIR, or --nats-url URL" in capsys.readouterr().err


def test_bwr_model_info(capsys: pytest.CaptureFixture[str]) -> None:
    assert bwr(["model", "info"]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines()[1:]:
        name, params, width, layout = line.split()[:4]
        rows[name] = (int(params.replace(",", "")), int(width), layout)
    assert list(rows) == ["tiny", "small", "base"]
    for name, (_, width, layout) in rows.items():
        cfg = ModelConfig.named(name)
        assert (width, layout) == (cfg.d_model, cfg.layout)
    assert rows["tiny"][0] < 1_000_000
    assert 5_000_000 < rows["small"][0] < 20_000_000
    assert 50_000_000 < rows["base"][0] < 200_000_000
