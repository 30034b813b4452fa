"""The memory protocol on the bus: consolidation jobs, memory pointers, update notices, and the
lifecycle of a job in a worker.

jobs.py owns message shapes and their codecs (msgspec, built once). It never touches NATS and
never runs the network; torch only converts a job's hidden states to and from bytes.
New fields are appended with defaults so older readers keep working.
"""

from __future__ import annotations

import enum

import msgspec
import numpy as np
import torch
from torch import Tensor

JOB_VERSION = 1  # bump when the meaning of a job's fields changes


class JobFormatError(ValueError):
    """Bytes that are not a consolidation job this code reads."""


class ConsolidateJob(msgspec.Struct, frozen=True):
    """A session's closed segment, to be compressed into its memory (subject
    memory.consolidate.<session>). seq is per session: 0, 1, 2, ... with no gaps."""

    session: str
    seq: int  # the job's place in the session's order
    segment: int  # the session's segment index (ages of its slots count from it)
    start: int  # first byte of the segment in the session's stream
    end: int  # one past its last byte
    rows: int  # S: hidden states (bytes of the segment)
    dim: int  # D
    hidden: bytes  # (S, D) float16, row-major
    v: int = JOB_VERSION

    @classmethod
    def from_tensor(
        cls, session: str, seq: int, segment: int, span: tuple[int, int], hidden: Tensor
    ) -> ConsolidateJob:
        """hidden (S, D) on any device, any float dtype -> a job holding it as float16."""
        if hidden.dim() != 2:
            raise ValueError(f"hidden must be (S, D), got {tuple(hidden.shape)}")
        h = hidden.detach().to("cpu", torch.float16).contiguous()  # sync: once per closed segment
        S, D = h.shape
        return cls(session, seq, segment, span[0], span[1], S, D, h.numpy().tobytes())

    def tensor(self) -> Tensor:
        """-> hidden (S, D) float32."""
        flat = np.frombuffer(self.hidden, dtype=np.float16)
        return torch.from_numpy(flat.copy()).view(self.rows, self.dim).float()

    @property
    def span(self) -> tuple[int, int]:
        return self.start, self.end


class MemoryPointer(msgspec.Struct, frozen=True):
    """KV value (sessions bucket, key mem.<session>): a session's current memory version."""

    version: int
    last_seq: int
    object: str  # object store name of the version's bytes
    slots: int = 0
    nbytes: int = 0
    history: tuple[str, ...] = ()  # older versions still kept (keep_versions - 1 of them)


class MemoryUpdated(msgspec.Struct, frozen=True):
    """Core notice on memory.updated.<session> once a version is committed."""

    session: str
    version: int
    last_seq: int
    object: str


class JobFailed(msgspec.Struct, frozen=True):
    """Event (events.memory_job_failed): a job given up after max_redeliveries; skipped."""

    session: str
    seq: int
    deliveries: int
    error: str


_job_enc = msgspec.msgpack.Encoder()
_job_dec = msgspec.msgpack.Decoder(ConsolidateJob)
_json_enc = msgspec.json.Encoder()
_pointer_dec = msgspec.json.Decoder(MemoryPointer)
_updated_dec = msgspec.json.Decoder(MemoryUpdated)


def encode_job(job: ConsolidateJob) -> bytes:
    return _job_enc.encode(job)


def decode_job(data: bytes) -> ConsolidateJob:
    try:
        job = _job_dec.decode(data)
    except msgspec.DecodeError as e:
        raise JobFormatError(f"not a consolidation job: {e}") from None
    if job.v > JOB_VERSION:
        raise JobFormatError(f"job version {job.v}, this code reads up to {JOB_VERSION}")
    if len(job.hidden) != 2 * job.rows * job.dim or job.rows < 1 or job.dim < 1:
        raise JobFormatError(
            f"job {job.session}/{job.seq}: {len(job.hidden)} hidden bytes"
            f" for shape ({job.rows}, {job.dim})"
        )
    if not 0 <= job.start < job.end or job.seq < 0:
        raise JobFormatError(f"job {job.session}/{job.seq}: bad span ({job.start}, {job.end})")
    return job


def encode_json(msg: MemoryPointer | MemoryUpdated | JobFailed) -> bytes:
    return _json_enc.encode(msg)


def decode_pointer(data: bytes) -> MemoryPointer:
    return _pointer_dec.decode(data)


def decode_updated(data: bytes) -> MemoryUpdated:
    return _updated_dec.decode(data)


class JobState(enum.IntEnum):
    """Where one delivery of a job is in a worker: TAKEN -> DUPLICATE -> ACKED (already applied),
    TAKEN -> WAITING (predecessor missing: nak'ed), TAKEN -> APPLIED -> COMMITTED -> ACKED (the
    work), APPLIED -> TAKEN (the compare-and-set lost: decide again), TAKEN -> FAILED -> ACKED
    (a fresh delivery given up after max_redeliveries: the session skips the seq)."""

    TAKEN = 0  # fetched, not decided
    DUPLICATE = 1  # its seq is already applied (a redelivery)
    WAITING = 2  # its predecessor is not applied yet: nak'ed with a delay
    APPLIED = 3  # next version computed and stored, not yet visible
    COMMITTED = 4  # KV pointer moved to the new version (compare-and-set won)
    ACKED = 5  # done
    FAILED = 6  # given up; the session skips the seq


_LEGAL: dict[JobState, frozenset[JobState]] = {
    JobState.TAKEN: frozenset(
        {JobState.DUPLICATE, JobState.WAITING, JobState.APPLIED, JobState.FAILED}
    ),
    JobState.DUPLICATE: frozenset({JobState.ACKED}),
    JobState.WAITING: frozenset(),
    JobState.APPLIED: frozenset({JobState.COMMITTED, JobState.TAKEN}),
    JobState.COMMITTED: frozenset({JobState.ACKED}),
    JobState.ACKED: frozenset(),
    JobState.FAILED: frozenset({JobState.ACKED, JobState.WAITING}),
}


class IllegalTransition(RuntimeError):
    pass


class JobLifecycle:
    """The state machine of one delivery of a job; an illegal step raises and names the states."""

    def __init__(self, job: ConsolidateJob) -> None:
        self.job = job
        self.state = JobState.TAKEN

    def to(self, new: JobState) -> None:
        if new not in _LEGAL[self.state]:
            allowed = sorted(s.name for s in _LEGAL[self.state]) or ["nothing (final)"]
            raise IllegalTransition(
                f"job {self.job.session}/{self.job.seq}: {self.state.name} -> {new.name};"
                f" expected one of {allowed}"
            )
        self.state = new
