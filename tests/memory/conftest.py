"""Fixtures of the memory tests: a real nats-server per test, a fast MemoryConfig, one torch
thread (the tiny compressor is fastest single-threaded, and workers run it from threads)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from memory.config import MemoryConfig
from model import ByteLM, ModelConfig


@pytest.fixture
def mem_config() -> MemoryConfig:
    """Small levels (16 slots, groups of 8) so a few segments cascade to the top; short waits."""
    return MemoryConfig(
        level_capacities=(16, 16, 16),
        merge_group=8,
        ack_wait_s=1.0,
        max_redeliveries=3,
        order_nak_delay_s=0.02,
        fetch_timeout_s=0.2,
        reconnect_wait_s=0.05,
        submit_timeout_s=20.0,
        request_timeout_s=1.0,
    )


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_model() -> ByteLM:
    """`tiny` with seeded random weights, in eval mode (the compressor the workers run)."""
    torch.manual_seed(0)
    return ByteLM(ModelConfig.named("tiny")).eval()
