"""EngineConfig: the engine's knobs. Entry points fill it from flags; it never reads the
environment."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    max_slots: int = 64  # live sessions on the device at once (rows of the state pool)
    prefill_budget: int = 4096  # input bytes prefilled per step, across sessions
    prefill_chunk: int = 1024  # most bytes one session prefills in one step
    inbox_size: int = 1024  # pending commands (input, cancel, close) between steps
    max_input_bytes: int = 1 << 20  # one submit's bytes
    max_pending_bytes: int = 4 << 20  # a session's unread input bytes
    lag_limit: int = 4096  # undelivered output bytes after which a session pauses its decoding
    memory_capacity: int = 0  # memory slots a session reads (0: memory off)
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", ...
    cuda_graphs: bool = True  # capture decode per batch bucket (only on CUDA)
    compile: bool = False  # torch.compile the decode step before capture
    # torch.compile's mode: "default", or "max-autotune-no-cudagraphs" (benchmarks the matmul
    # kernels for each batch bucket: slower to start; the graphs are captured here either way)
    compile_mode: str = "default"
    # Compile the step once for every batch size (dynamic shapes; batch 1 still gets its own)
    # instead of once per bucket: a start in seconds, not minutes, at many buckets.
    compile_dynamic: bool = False
    decode_dtype: str = "float32"  # matmul weights of the fused GPU decode: float32 or bfloat16
    # Sample a decode step in one Triton kernel on a GPU (False: the torch sampler, compiled
    # with the step when `compile` is on)
    fused_sampler: bool = True
    threaded_steps: bool = True  # run each step in a worker thread so the event loop stays live
    # Launch step k+1 before collecting step k (None: on a GPU, where the host then plans while
    # the device computes; on a CPU the step computes as it launches, so it gains nothing there)
    pipeline: bool | None = None
    idle_wait_s: float = 0.05  # longest sleep of an idle loop before it looks again
    # Wake a session's consumer once this many output bytes wait (the first byte of a turn, its
    # end and any event wake it at once). 1 wakes every byte; more trades a little inter-byte
    # smoothness for far fewer wake-ups when hundreds of sessions stream (host time per step).
    stream_interval: int = 1

    def __post_init__(self) -> None:
        if self.max_slots < 1:
            raise ValueError("max_slots must be >= 1")
        if self.prefill_chunk < 1 or self.prefill_budget < 1:
            raise ValueError("prefill_chunk and prefill_budget must be >= 1")
        if not 1 <= self.stream_interval <= self.lag_limit:
            raise ValueError("stream_interval must be between 1 and lag_limit")

    @property
    def buckets(self) -> tuple[int, ...]:
        """Decode batch sizes with a captured graph: 1, 2, 4, ... up to max_slots."""
        out, b = [], 1
        while b < self.max_slots:
            out.append(b)
            b *= 2
        out.append(self.max_slots)
        return tuple(out)
