"""The memory system: per-session hierarchies of compressed slots (store), their consolidation by
background workers over NATS JetStream (jobs, worker, service), snapshots, and the bus wiring.

Imports flow gateway -> memory -> model; memory imports nothing from engine/ or gateway/.
"""

from memory.bus import Bus
from memory.config import MemoryConfig
from memory.jobs import ConsolidateJob, MemoryPointer, MemoryUpdated
from memory.service import JobTooLarge, MemoryService, model_compressor, run_worker_process
from memory.snapshots import (
    IncompatibleSnapshot,
    Snapshot,
    SnapshotError,
    load_snapshot,
    save_snapshot,
)
from memory.store import CompressFn, MemoryFormatError, SequenceError, SessionMemory

__all__ = [
    "Bus",
    "CompressFn",
    "ConsolidateJob",
    "IncompatibleSnapshot",
    "JobTooLarge",
    "MemoryConfig",
    "MemoryFormatError",
    "MemoryPointer",
    "MemoryService",
    "MemoryUpdated",
    "SequenceError",
    "SessionMemory",
    "Snapshot",
    "SnapshotError",
    "load_snapshot",
    "model_compressor",
    "run_worker_process",
    "save_snapshot",
]
