"""The memory protocol: job codec, pointer and notice codecs, the job lifecycle."""

from __future__ import annotations

import msgspec
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memory.jobs import (
    ConsolidateJob,
    IllegalTransition,
    JobFormatError,
    JobLifecycle,
    JobState,
    MemoryPointer,
    MemoryUpdated,
    decode_job,
    decode_pointer,
    decode_updated,
    encode_job,
    encode_json,
)


@settings(max_examples=50, deadline=None)
@given(
    session=st.from_regex(r"[A-Za-z0-9_-]{1,40}", fullmatch=True),
    seq=st.integers(0, 2**40),
    rows=st.integers(1, 64),
    dim=st.integers(1, 32),
    start=st.integers(0, 2**50),
)
def test_job_round_trip(session: str, seq: int, rows: int, dim: int, start: int) -> None:
    hidden = torch.randn(rows, dim) * 10
    job = ConsolidateJob.from_tensor(session, seq, seq + 1, (start, start + rows), hidden)
    back = decode_job(encode_job(job))
    assert back == job
    assert torch.equal(back.tensor(), hidden.half().float())  # float16 on the wire, exactly
    assert back.span == (start, start + rows)


def test_job_size_of_a_tiny_segment_fits_the_default_payload() -> None:
    job = ConsolidateJob.from_tensor("s", 0, 0, (0, 128), torch.randn(128, 96))
    assert 128 * 96 * 2 < len(encode_job(job)) < 128 * 96 * 2 + 200  # ~24 KB, far under 1 MB


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not msgpack at all",
        msgspec.msgpack.encode({"session": "s", "seq": 0}),
        encode_job(ConsolidateJob("s", 0, 0, 0, 4, 2, 2, b"\x00" * 3)),  # short hidden bytes
        encode_job(ConsolidateJob("s", 0, 0, 5, 5, 1, 1, b"\x00" * 2)),  # empty span
        encode_job(ConsolidateJob("s", 0, 0, 0, 1, 1, 1, b"\x00" * 2, v=99)),  # from the future
    ],
)
def test_bad_jobs_raise_job_format_error(data: bytes) -> None:
    with pytest.raises(JobFormatError):
        decode_job(data)


def test_hidden_must_be_two_dimensional() -> None:
    with pytest.raises(ValueError, match=r"\(S, D\)"):
        ConsolidateJob.from_tensor("s", 0, 0, (0, 4), torch.zeros(1, 4, 2))


def test_pointer_and_notice_codecs() -> None:
    ptr = MemoryPointer(3, 2, "s/3-abcd", 12, 4096, ("s/2-ef01",))
    assert decode_pointer(encode_json(ptr)) == ptr
    note = MemoryUpdated("s", 3, 2, "s/3-abcd")
    assert decode_updated(encode_json(note)) == note
    assert decode_pointer(b'{"version":1,"last_seq":0,"object":"x"}').history == ()  # old readers


def test_lifecycle_legal_paths_and_illegal_steps() -> None:
    job = ConsolidateJob("s", 4, 4, 0, 1, 1, 1, b"\x00\x00")
    life = JobLifecycle(job)
    for state in (
        JobState.APPLIED,
        JobState.TAKEN,
        JobState.APPLIED,
        JobState.COMMITTED,
        JobState.ACKED,
    ):
        life.to(state)
    with pytest.raises(IllegalTransition, match="ACKED -> TAKEN"):
        life.to(JobState.TAKEN)
    life = JobLifecycle(job)
    with pytest.raises(IllegalTransition, match=r"TAKEN -> COMMITTED; expected one of"):
        life.to(JobState.COMMITTED)
    life.to(JobState.DUPLICATE)
    life.to(JobState.ACKED)
