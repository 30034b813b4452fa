"""Fixtures of the training tests: a real nats-server per test, the micro model (width 32) the
ingest tests use, a corpus of small documents, and one torch thread."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from model import ByteLM
from tests.ingest.conftest import MICRO

ROOT = Path(__file__).parent.parent.parent
TEXT = ROOT / "tests" / "data" / "english.txt"
PYTHON = sys.executable


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def micro_model() -> ByteLM:
    torch.manual_seed(0)
    return ByteLM(MICRO)


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
