"""Shared fixtures: a tiny CPU model (no GPU and no weights needed), the micro model of the
ingest and training tests, a real nats-server per test (free loopback port, JetStream store under
the test's tmp_path), and one torch thread for every test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from model import ByteLM, ModelConfig
from tests.nats_server import NatsServer


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Every test runs torch on one thread. The suite shares two cores with the servers and
    browsers it starts, and two torch threads on busy cores spin against each other: a small
    training run measured 150 times slower (15 steps in 44 s against 400 in 9 s on one thread)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def micro_model() -> ByteLM:
    """The micro model (tests/ingest/conftest.py MICRO) with seeded weights, in eval mode."""
    from tests.ingest.conftest import MICRO

    torch.manual_seed(0)
    return ByteLM(MICRO).eval()


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
