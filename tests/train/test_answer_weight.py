"""--answer-weight: the loss weighs answer bytes (as the mixer marks them) and nothing else."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import ByteLM
from model.codec import PAD
from model.train import TrainConfig, TrainLoop, answer_weights, sequence_loss
from tests.ingest.conftest import MICRO


def batch_and_answers() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    batch = torch.randint(0, 256, (3, 41))
    batch[2, 30:] = PAD  # PAD targets stay out, weighted or not
    answers = torch.zeros(batch.shape, dtype=torch.bool)
    answers[0, 35:40] = True
    answers[1, 10:12] = True
    return batch, answers


def test_weighted_loss_is_the_weighted_mean_of_the_targets() -> None:
    model = ByteLM(MICRO).eval()
    batch, answers = batch_and_answers()
    x, y = batch[:, :-1], batch[:, 1:]
    with torch.no_grad():
        ce = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
        keep, ans = (y != PAD).float(), answers[:, 1:].float()
        for w in (0.0, 1.0, 7.0):
            got = sequence_loss(model, batch, 1, 0, answer_weights(answers, w))
            want = (ce * keep * (1 + (w - 1) * ans)).sum() / (keep * (1 + (w - 1) * ans)).sum()
            torch.testing.assert_close(got, want)
        plain = sequence_loss(model, batch, 1, 0)
        torch.testing.assert_close(
            sequence_loss(model, batch, 1, 0, answer_weights(answers, 1)), plain
        )


def test_answer_weight_changes_the_step_exactly_through_answer_bytes() -> None:
    """A row whose last byte is its answer: at weight 0 the step ignores that byte's value
    (nothing reads it); at weight 1 with the mask it equals the plain step; at 5 it differs."""
    batch, _ = batch_and_answers()
    answers = torch.zeros(batch.shape, dtype=torch.bool)
    answers[:, -1] = True
    other = batch.clone()
    other[:, -1] = (other[:, -1] + 1) % 256

    def step(item: object, weight: float) -> torch.Tensor:
        torch.manual_seed(1)
        model = ByteLM(MICRO)
        loop = TrainLoop(model, TrainConfig(steps=2, warmup=1, answer_weight=weight))
        loop.run_step([item])  # type: ignore[list-item]
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(step((batch, answers), 0.0), step((other, answers), 0.0))
    assert not torch.equal(step((batch, answers), 1.0), step((other, answers), 1.0))
    torch.testing.assert_close(step((batch, answers), 1.0), step(batch, 1.0))
    assert not torch.allclose(step((batch, answers), 5.0), step(batch, 5.0))


def test_answer_weight_is_not_negative() -> None:
    with pytest.raises(ValueError):
        TrainConfig(answer_weight=-1)
