"""MemoryConfig: the knobs of the memory hierarchy, the consolidation workers and the bus names.

config.py owns numbers and names only: it never touches tensors or the network. Entry points
build one from flags (the hierarchy's two are declared here, for every command that
consolidates); nothing here reads the environment.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryConfig:
    # ----- the hierarchy -----
    level_capacities: tuple[int, ...] = (64, 64, 64)  # slots per level, level 1 first (top last)
    merge_group: int = 0  # oldest slots of a full level compressed together (0: 4 * mem_slots)
    # ----- consolidation workers -----
    workers: int = 2  # worker tasks a MemoryService runs by default
    ack_wait_s: float = 30.0  # a taken job not acked within this is redelivered
    max_redeliveries: int = 5  # failed tries of a job before its seq is skipped (waits not counted)
    order_nak_delay_s: float = 0.1  # first wait of a job whose predecessor is not applied yet
    max_order_delay_s: float = 2.0  # that wait doubles per delivery up to this
    fetch_timeout_s: float = 1.0  # longest a worker's pull waits before it looks again
    max_ack_pending: int = 256  # jobs taken and not yet acked, across all workers of the consumer
    cache_sessions: int = 256  # latest memory versions a service keeps in process (LRU)
    keep_versions: int = 2  # versions of a session kept in the object store (older ones deleted)
    submit_timeout_s: float = 30.0  # longest submit_segment retries while the server is away
    # ----- bus names -----
    docs_stream: str = "DOCS"  # documents, subjects docs.ingest.>
    memory_stream: str = "MEMORY"  # consolidation jobs, subjects memory.consolidate.>
    consumer: str = "consolidate"  # durable pull consumer the workers share
    sessions_bucket: str = "sessions"  # KV: memory pointers and snapshot pointers per session
    memory_bucket: str = "memory"  # object store: memory versions, <session>/<version>-<nonce>
    snapshots_bucket: str = "snapshots"  # object store: session snapshots
    checkpoints_bucket: str = "checkpoints"  # object store: model weights
    memory_stream_max_bytes: int = 1 << 30  # bound of the job queue; a full queue refuses submits
    duplicate_window_s: float = 120.0  # Nats-Msg-Id dedup window of DOCS and MEMORY
    connect_timeout_s: float = 5.0  # first connection to the server
    request_timeout_s: float = 5.0  # one JetStream request (publish ack, KV, object chunk)
    reconnect_wait_s: float = 0.25  # pause between reconnection attempts (forever: -1 attempts)

    def __post_init__(self) -> None:
        if not self.level_capacities or min(self.level_capacities) < 1:
            raise ValueError(
                f"level_capacities {self.level_capacities}: need >= 1 level, each >= 1 slot"
            )
        if self.merge_group < 0:
            raise ValueError("merge_group must be >= 0 (0: 4 * mem_slots)")
        if self.workers < 0 or self.max_redeliveries < 1 or self.keep_versions < 1:
            raise ValueError("workers >= 0, max_redeliveries >= 1 and keep_versions >= 1")
        if self.ack_wait_s <= 0 or self.fetch_timeout_s <= 0:
            raise ValueError("ack_wait_s and fetch_timeout_s must be > 0")

    @property
    def levels(self) -> int:
        return len(self.level_capacities)

    @property
    def max_slots(self) -> int:
        """The most slots a session's memory ever holds, whatever its context length."""
        return sum(self.level_capacities)

    @classmethod
    def hierarchy(cls, levels: tuple[int, ...] = (), merge_group: int = 0) -> MemoryConfig:
        """A config with these level capacities (() keeps the default) and merge group."""
        if not levels:
            return cls(merge_group=merge_group)
        return cls(level_capacities=levels, merge_group=merge_group)

    def group_for(self, mem_slots: int) -> int:
        """merge_group for a model that makes `mem_slots` slots per compression."""
        return self.merge_group or 4 * mem_slots


def parse_levels(text: str) -> tuple[int, ...]:
    """--memory-levels ('16,16,16') -> capacities, level 1 first; '' -> () (the default).
    ValueError, naming the flag, on anything else."""
    try:
        caps = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--memory-levels {text!r}: want capacities like 16,16,16") from None
    if caps and min(caps) < 1:
        raise ValueError(f"--memory-levels {text!r}: every capacity >= 1")
    return caps


def add_hierarchy_arguments(p: argparse.ArgumentParser) -> None:
    """--memory-levels and --merge-group (`MemoryConfig.hierarchy` reads them), for the commands
    that consolidate: `bwr up`, `bwr worker`, `bwr eval`."""
    p.add_argument(
        "--memory-levels",
        default="",
        help="level capacities of the memory hierarchy, level 1 first, e.g. 16,16,16 (default"
        " 64,64,64); a checkpoint trained with `bwr train --memory-levels` is read best through"
        " the same",
    )
    p.add_argument(
        "--merge-group", type=int, default=0, help="slots a full level merges at once (0: 4m)"
    )
