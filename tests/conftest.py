"""Shared fixtures: a tiny CPU model (no GPU and no weights needed), the micro model of the
ingest and training tests, a real nats-server per test (free loopback port, JetStream store under
the test's tmp_path), and one torch thread for the suites whose work runs in worker threads."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from model import ByteLM, ModelConfig
from tests.nats_server import NatsServer

# The delta rule and the compressor on a CPU are far slower with two busy threads, and these
# suites run them from worker threads beside the event loop.
ONE_THREAD_SUITES = frozenset({"ingest", "memory", "train"})


@pytest.fixture(autouse=True)
def one_torch_thread(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.path.parent.name not in ONE_THREAD_SUITES:
        yield
        return
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
