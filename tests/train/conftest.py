"""Fixtures of the training tests: the micro config as a file and a corpus of small documents.
The nats-server, the micro model and one torch thread come from tests/conftest.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.ingest.conftest import MICRO

ROOT = Path(__file__).parent.parent.parent
TEXT = ROOT / "tests" / "data" / "english.txt"
PYTHON = sys.executable


@pytest.fixture
def micro_json(tmp_path: Path) -> Path:
    """The micro config as a file the trainer's --config takes."""
    path = tmp_path / "micro.json"
    path.write_text(MICRO.to_json())
    return path


def corpus(root: Path, n: int, offset: int = 0) -> dict[str, bytes]:
    """n small documents (150 to 400 bytes of English) as files -> bodies by file name."""
    text = TEXT.read_bytes()
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(offset, offset + n):
        body = text[(i * 331) % 20000 :][: 150 + (i * 53) % 250]
        (root / f"d{i:03}.txt").write_bytes(body)
        out[f"d{i:03}.txt"] = body
    return out
