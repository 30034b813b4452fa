"""The eval path guarded end to end: a tiny model trained here, on the CPU, on one-digit pass
keys at 96 bytes, then scored through the engine runner (real sessions, greedy decoding).

Chance is 10% (one digit); the test asks for more than 50%. It guards the generator, the engine
path and the scoring together, not long-context ability.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import torch

from gateway.evals import evaluate
from model import ByteLM, ModelConfig
from model.evals.tasks import passkey
from model.train import TrainConfig, train

LENGTH = 96
CONFIG = ModelConfig(
    d_model=64,
    layout="D",
    filter_order=8,
    filter_features=16,
    filter_hidden=32,
    delta_heads=2,
    read_heads=2,
    compress_heads=2,
    delta_chunk=32,
    segment_len=128,
    prefill_chunk=512,
)


def batches(batch_size: int) -> Iterator[torch.Tensor]:
    """One case per row, (B, LENGTH + 1): the prompt and its one-byte answer. Seeds from 1000
    up, apart from the eval's seeds (0..)."""
    i = 1000
    while True:
        rows = []
        for _ in range(batch_size):
            c = passkey(LENGTH, (i % 10) / 10, seed=i, digits=1)
            rows.append(list(c.prompt + c.answer))
            i += 1
        yield torch.tensor(rows)


@pytest.mark.slow
def test_trained_tiny_model_finds_the_pass_key() -> None:
    torch.manual_seed(0)
    model = ByteLM(CONFIG)
    cfg = TrainConfig(
        steps=400, batch_size=8, seq_len=LENGTH, lr=3e-3, warmup=10, time_budget_s=20, log_every=100
    )
    train(model, batches(cfg.batch_size), cfg)
    report = asyncio.run(evaluate(model, "passkey", [LENGTH], [0.1, 0.5, 0.9], 7, digits=1))
    cells = report.cells
    correct = sum(c.correct for c in cells)
    turns = sum(c.turns for c in cells)
    assert turns == 21
    assert correct / turns > 0.5, [c.samples for c in cells]
