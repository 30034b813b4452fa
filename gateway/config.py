"""GatewayConfig: the gateway's knobs (binding, auth, limits, sampling defaults, the bus).

config.py owns numbers and names only; it never reads the environment or the command line (the
`bwr` entry point does) and never touches the engine.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from memory.config import MemoryConfig

LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost; False for anything else (0.0.0.0 included)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class GatewayConfig:
    # ----- binding and identity -----
    host: str = "127.0.0.1"  # address to bind; a non-loopback one needs api_keys
    port: int = 8000  # TCP port (0: any free port, printed at start)
    api_keys: tuple[str, ...] = ()  # bearer keys accepted (empty: no auth, loopback only)
    model_name: str = "tiny"  # what /v1/info and the OpenAI responses call the model
    # ----- limits -----
    max_frame_bytes: int = 1 << 20  # largest WebSocket frame or HTTP body the gateway reads
    max_input_bytes: int = 256 << 10  # input bytes in one turn (an input frame, a prompt)
    max_output_bytes: int = 1 << 16  # the most bytes one turn may ask to generate
    max_sessions: int = 64  # live sessions at once (attached, detached, completions)
    max_sessions_per_key: int = 64  # live sessions one API key (or one client address) holds
    max_stop: int = 8  # stop sequences per turn
    max_stop_bytes: int = 64  # bytes of one stop sequence
    # ----- sampling defaults (a session's `open` frame and each input may override) -----
    default_max_bytes: int = 256  # bytes generated per turn when the input does not say
    default_temperature: float = 1.0  # 0 is greedy
    default_top_k: int = 0  # 0 keeps every byte
    default_top_p: float = 1.0  # 1.0 keeps all the mass
    default_completion_tokens: int = 16  # OpenAI max_tokens default (one token is one byte)
    # ----- session lifecycle -----
    detach_timeout_s: float = 300.0  # a disconnected session stays resumable this long (0: closes)
    unattached_timeout_s: float = (
        300.0  # a session made by POST /v1/sessions awaits its first socket
    )
    auth_timeout_s: float = 10.0  # a WebSocket must authenticate within this
    drain_s: float = 10.0  # on SIGTERM, running turns get this long to finish
    reap_interval_s: float = 1.0  # how often detached sessions past their timeout are closed
    # ----- the bus and state -----
    nats_url: str | None = None  # NATS server for events (None: no bus)
    nats_required: bool = False  # /readyz fails while NATS is unreachable
    memory: bool = True  # with NATS: consolidate session memories, snapshot sessions, resume them
    memory_workers: int = 2  # consolidation workers in this process
    worker_processes: int = 0  # `bwr worker` processes `bwr up` starts (compression off the GIL)
    memory_levels: tuple[int, ...] = ()  # level capacities of the hierarchy (): MemoryConfig's
    merge_group: int = 0  # slots a full level merges at once (0: 4 * mem_slots)
    train: bool = False  # run the DOCS training consumer beside the engine (needs NATS)
    train_every: int = 50  # trainer steps between checkpoints (each one hot-reloaded)
    train_args: tuple[str, ...] = ()  # more `bwr train` flags for that trainer
    events_interval_s: float = 1.0  # period of the `events.engine` throughput summary
    events_queue: int = 1024  # events waiting to be published (more are dropped and counted)
    data_dir: str = ".data"  # local state: the embedded nats-server's store lives in data_dir/nats
    # ----- the engine -----
    stream_interval: int = 1  # output bytes a session's consumer waits for (EngineConfig's)
    compile: bool = False  # torch.compile the decode step (on a GPU, before graph capture)
    compile_dynamic: bool = False  # one compile for every batch bucket (EngineConfig's)
    decode_dtype: str = "float32"  # GPU decode weights: float32 or bfloat16
    gc_tuning: bool = True  # engine.gctune.tune_for_serving() once the model is loaded

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} outside 0..65535")
        if self.max_frame_bytes < 1024:
            raise ValueError("max_frame_bytes must be >= 1024")
        if self.max_input_bytes < 1 or self.max_output_bytes < 1:
            raise ValueError("max_input_bytes and max_output_bytes must be >= 1")
        if self.max_sessions < 1 or self.max_sessions_per_key < 1:
            raise ValueError("max_sessions and max_sessions_per_key must be >= 1")
        if any(not k for k in self.api_keys):
            raise ValueError("an API key must not be empty")
        if not 0 < self.default_top_p <= 1 or self.default_temperature < 0:
            raise ValueError("default_top_p must be in (0, 1] and default_temperature >= 0")
        if self.detach_timeout_s < 0:
            raise ValueError("detach_timeout_s must be >= 0")
        if self.stream_interval < 1:
            raise ValueError("stream_interval must be >= 1")
        if self.decode_dtype not in ("float32", "bfloat16"):
            raise ValueError("decode_dtype must be float32 or bfloat16")
        self.memory_config  # noqa: B018 - raises on a malformed hierarchy

    @property
    def memory_config(self) -> MemoryConfig:
        """The hierarchy the consolidation workers (in process and `bwr worker`) keep."""
        return MemoryConfig.hierarchy(self.memory_levels, self.merge_group)

    @property
    def auth(self) -> bool:
        return bool(self.api_keys)

    @property
    def ws_max_size(self) -> int:
        """The server's hard frame limit: above it the socket closes (1009). Frames between
        max_frame_bytes and this get a `frame_too_large` error and the socket stays open."""
        return 4 * self.max_frame_bytes + 4096

    def bind_problem(self) -> str | None:
        """Why this config must not start (a non-loopback bind without a key), or None."""
        if not self.auth and not is_loopback(self.host):
            return (
                f"refusing to bind {self.host} without an API key: anyone who can reach it could "
                "use the engine. Give --api-key (or BWR_API_KEY), or bind 127.0.0.1."
            )
        return None
