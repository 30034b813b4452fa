"""The asyncio engine: scheduler (no torch), runner (state pool, prefill, CUDA-graph decode,
sampling on the device), collectors. It knows neither NATS nor HTTP."""

from engine.config import EngineConfig
from engine.engine import Engine, MemoryHooks, MemoryUpdate, Session, SessionSnapshot
from engine.types import (
    Busy,
    Delta,
    Done,
    EngineError,
    FinishReason,
    IncompatibleWeights,
    InputTooLarge,
    MemoryNotice,
    SamplingParams,
    SessionClosed,
    ShuttingDown,
    UnknownSession,
    Usage,
)

__all__ = [
    "Busy",
    "Delta",
    "Done",
    "Engine",
    "EngineConfig",
    "EngineError",
    "FinishReason",
    "IncompatibleWeights",
    "InputTooLarge",
    "MemoryHooks",
    "MemoryNotice",
    "MemoryUpdate",
    "SamplingParams",
    "Session",
    "SessionClosed",
    "SessionSnapshot",
    "ShuttingDown",
    "UnknownSession",
    "Usage",
]
