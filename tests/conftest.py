"""Shared fixtures: a tiny CPU model (no GPU and no weights needed), and a real nats-server
per test (free loopback port, JetStream store under the test's tmp_path)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from model import ByteLM, ModelConfig
from tests.nats_server import NatsServer


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    with NatsServer(tmp_path / "nats") as server:
        yield server


@pytest.fixture
def tiny_config() -> ModelConfig:
    """The `tiny` preset: under 1M parameters, every block kind, fast on a CPU."""
    return ModelConfig.named("tiny")


@pytest.fixture
def tiny_model(tiny_config: ModelConfig) -> ByteLM:
    """`tiny` with seeded random weights, in eval mode."""
    torch.manual_seed(0)
    return ByteLM(tiny_config).eval()
