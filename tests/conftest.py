"""Shared fixtures: a tiny CPU model, no GPU and no weights needed."""

from __future__ import annotations

import pytest
import torch

from model import ByteLM, ModelConfig


@pytest.fixture
def tiny_config() -> ModelConfig:
    """The `tiny` preset: under 1M parameters, every block kind, fast on a CPU."""
    return ModelConfig.named("tiny")


@pytest.fixture
def tiny_model(tiny_config: ModelConfig) -> ByteLM:
    """`tiny` with seeded random weights, in eval mode."""
    torch.manual_seed(0)
    return ByteLM(tiny_config).eval()
