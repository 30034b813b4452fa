"""Fixtures of the memory tests: a fast MemoryConfig. The nats-server, the tiny model and one
torch thread (workers run the compressor from threads) come from tests/conftest.py."""

from __future__ import annotations

import pytest

from memory.config import MemoryConfig


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
