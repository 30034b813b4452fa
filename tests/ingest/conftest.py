"""Fixtures of the ingest tests: the micro model's config (width 32, segments of 32 bytes) so
prefill is cheap on a CPU, and small memory levels that fill after a few segments. The nats-server,
the micro model and one torch thread come from tests/conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from memory.config import MemoryConfig
from model import ModelConfig

MICRO = ModelConfig(
    d_model=32, layout="HRD", filter_order=4, filter_features=8, filter_hidden=16,
    delta_heads=2, read_heads=2, read_topk=4, segment_len=32, mem_slots=2, compress_heads=2,
    delta_chunk=16, prefill_chunk=256, name="micro",
)  # fmt: skip


@pytest.fixture
def mem_config() -> MemoryConfig:
    """Levels of 8 slots merged 4 at a time: a few dozen segments reach the top level."""
    return MemoryConfig(
        level_capacities=(8, 8, 8),
        merge_group=4,
        fetch_timeout_s=0.2,
        reconnect_wait_s=0.05,
        request_timeout_s=2.0,
    )


def write_corpus(root: Path, n: int = 12) -> dict[str, bytes]:
    """n text files (one in a subdirectory), a JSONL file with two documents and a line without
    text, and three files a directory walk leaves out (binary, hidden, empty). -> the documents'
    bodies by name."""
    text = (Path(__file__).parent.parent / "data" / "english.txt").read_bytes()
    docs: dict[str, bytes] = {}
    (root / "sub").mkdir(parents=True)
    for i in range(n):
        body = text[i * 211 : i * 211 + 150 + 37 * i]
        path = root / ("sub" if i == 0 else ".") / f"doc{i:02}.txt"
        path.write_bytes(body)
        docs[path.name] = body
    (root / "notes.jsonl").write_text(
        '{"text": "first line of notes"}\n{"title": "no text"}\n{"text": "second line"}\n'
    )
    docs["notes:1"], docs["notes:3"] = b"first line of notes", b"second line"
    (root / "image.bin").write_bytes(b"\x89PNG\0\0\0")
    (root / ".hidden.txt").write_text("hidden")
    (root / "empty.txt").write_bytes(b"")
    return docs
