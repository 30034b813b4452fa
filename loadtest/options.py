"""The load test's knobs, read once from the environment (the locustfile is an entry point).

options.py owns the names and defaults of the BWR_* variables; it never opens a connection.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


@dataclass(frozen=True)
class LoadConfig:
    ws_weight: int = 1  # BWR_WS_WEIGHT: share of WebSocket session users
    sse_weight: int = 0  # BWR_SSE_WEIGHT: share of OpenAI SSE users
    nats_weight: int = 0  # BWR_NATS_WEIGHT: share of NATS ingestion users
    turn_bytes: int = 64  # BWR_TURN_BYTES: input bytes sent per turn
    max_bytes: int = 64  # BWR_MAX_BYTES: bytes generated per turn (SSE max_tokens too)
    ignore_eos: bool = True  # BWR_IGNORE_EOS: 1 makes every turn run to max_bytes (fixed length)
    turns: int = 0  # BWR_TURNS: turns per session before it closes and reopens (0: never)
    think_s: float = 0.0  # BWR_THINK_S: pause between turns
    timeout_s: float = 60.0  # BWR_TIMEOUT_S: longest wait for any one frame or chunk
    nats_url: str = ""  # BWR_NATS_URL: the bus (the embedded server of `bwr up`)
    api_key: str = ""  # BWR_API_KEY: bearer key, if the gateway wants one
    doc_bytes: int = 4096  # BWR_DOC_BYTES: bytes per published document
    namespace: str = "loadtest"  # BWR_NAMESPACE: documents go to docs.ingest.<namespace>
    nats_inflight: int = 8  # BWR_NATS_INFLIGHT: publishes in flight per NATS user
    doc_rate: float = 0.0  # BWR_DOC_RATE: documents/s per NATS user (0: as fast as acks come)

    @classmethod
    def from_env(cls) -> LoadConfig:
        d = cls()
        return cls(
            ws_weight=_int("BWR_WS_WEIGHT", d.ws_weight),
            sse_weight=_int("BWR_SSE_WEIGHT", d.sse_weight),
            nats_weight=_int("BWR_NATS_WEIGHT", d.nats_weight),
            turn_bytes=_int("BWR_TURN_BYTES", d.turn_bytes),
            max_bytes=_int("BWR_MAX_BYTES", d.max_bytes),
            ignore_eos=bool(_int("BWR_IGNORE_EOS", int(d.ignore_eos))),
            turns=_int("BWR_TURNS", d.turns),
            think_s=_float("BWR_THINK_S", d.think_s),
            timeout_s=_float("BWR_TIMEOUT_S", d.timeout_s),
            nats_url=os.environ.get("BWR_NATS_URL", d.nats_url),
            api_key=(os.environ.get("BWR_API_KEY", "").split(",") or [""])[0].strip(),
            doc_bytes=_int("BWR_DOC_BYTES", d.doc_bytes),
            namespace=os.environ.get("BWR_NAMESPACE", d.namespace),
            nats_inflight=_int("BWR_NATS_INFLIGHT", d.nats_inflight),
            doc_rate=_float("BWR_DOC_RATE", d.doc_rate),
        )

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, "
    "and void; and darkness was upon the face of the deep. "
)


def turn_text(n: int, salt: int = 0) -> str:
    """n bytes of English-like ASCII input, rotated by salt so sessions differ."""
    start = salt % len(TEXT)
    reps = (start + n) // len(TEXT) + 1
    return (TEXT * reps)[start : start + n]
