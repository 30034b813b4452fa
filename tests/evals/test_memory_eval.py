"""The eval runner with the memory system on (a real nats-server, consolidation workers, versions
installed in the engine) and off (the ablation: no hooks, no memory pool, no NATS)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import gateway.evals
from engine import Engine
from gateway.cli import main
from gateway.evals import evaluate
from model import ByteLM
from tests.nats_server import NatsServer

LENGTH = 640  # five segments of the tiny config (128 bytes each)


async def test_memory_on_consolidates_before_the_question(
    nats_server: NatsServer, tiny_model: ByteLM
) -> None:
    report = await evaluate(
        tiny_model, "passkey", [LENGTH], [0.5], 2, nats_url=nats_server.url, settle_s=30.0
    )
    (cell,) = report.cells
    assert report.memory and report.to_json()["memory"] is True
    assert report.memory_capacity > 0
    assert cell.turns == 2
    # the context (LENGTH minus the question) closes four segments per case
    assert cell.segments == 2 * ((LENGTH - 39) // 128)
    assert cell.settle_timeouts == 0
    assert cell.memory_version_max >= 4  # one version per applied segment, installed
    assert cell.memory_slots_max > 0
    assert cell.memory_bytes_max > 0
    assert cell.total_bytes_max == report.state_bytes_per_session + cell.memory_bytes_max
    done = report.consolidation
    assert done["segments_published"] >= cell.segments
    assert done["versions_applied"] >= cell.segments
    assert done["versions_installed"] >= cell.segments
    assert done["jobs_failed"] == 0


def test_no_memory_reads_no_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    engines: list[Engine] = []

    class Recording(Engine):
        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            engines.append(self)

    monkeypatch.setattr(gateway.evals, "Engine", Recording)
    out = tmp_path / "off.json"
    args = ["eval", "passkey", "--model", "tiny", "--lengths", str(LENGTH), "--depths", "0.5"]
    assert main([*args, "--n", "1", "--no-memory", "--json", str(out)]) == 0
    assert "memory: off" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["memory"] is False and data["memory_capacity"] == 0
    assert data["cells"][0]["turns"] == 1 and data["cells"][0]["memory_bytes_max"] == 0
    (engine,) = engines
    assert engine.hooks is None and engine.runner.memory is None
    assert engine.config.memory_capacity == 0
    assert engine.metrics.memory_installs == 0


def test_mqar_pairs_and_queries_reach_the_generator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "mqar.json"
    args = ["eval", "mqar", "--model", "tiny", "--lengths", "128", "--depths", "0.5", "--n", "2"]
    assert main([*args, "--pairs", "3", "--queries", "2", "--no-memory", "--json", str(out)]) == 0
    assert "task mqar  pairs 3  queries 2" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["task_args"] == {"pairs": 3, "queries": 2}
    assert data["cells"][0]["turns"] == 4  # two cases, two queries each
    args[5] = "512"  # room for the default 16 pairs
    assert main([*args, "--no-memory", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["task_args"] == {} and data["cells"][0]["turns"] == 8  # 4 queries a case
    assert main(["eval", "passkey", "--pairs", "2", "--no-memory"]) == 2
    assert main([*args, "--pairs", "0", "--no-memory"]) == 2


async def test_a_given_hierarchy_bounds_the_memory_read(
    nats_server: NatsServer, tiny_model: ByteLM
) -> None:
    """--memory-levels: the workers consolidate through these capacities (a checkpoint trained
    through them is read the same way), and the JSON says which."""
    from memory.config import MemoryConfig

    small = MemoryConfig(level_capacities=(8, 8, 8), merge_group=8)
    report = await evaluate(
        tiny_model, "passkey", [1280], [0.5], 1, nats_url=nats_server.url, memory_config=small
    )
    (cell,) = report.cells
    assert cell.segments == (1280 - 39) // 128 and cell.settle_timeouts == 0
    assert 0 < cell.memory_slots_max <= 24 < 4 * cell.segments  # merged, not one slot group each
    data = report.to_json()
    assert data["memory_levels"] == [8, 8, 8] and data["merge_group"] == 8


def test_bad_hierarchies_are_refused_before_anything_runs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["eval", "passkey", "--model", "tiny", "--lengths", "256", "--n", "1"]
    assert main([*args, "--memory-levels", "8,8,x"]) == 2
    assert main([*args, "--memory-levels", "8,8,6", "--merge-group", "8"]) == 2
    assert main([*args, "--memory-levels", "8,8,8,8,8"]) == 2  # tiny embeds four levels
    assert "--memory-levels" in capsys.readouterr().err


async def test_cases_run_at_once_score_as_one_at_a_time(
    nats_server: NatsServer, tiny_model: ByteLM
) -> None:
    """--concurrency: the cases share the engine's steps and the bus, and every case consolidates
    as it does alone (each session's segments counted as its own); with memory off each answers
    byte for byte as alone. (With memory on, the question's last byte closes a segment at these
    lengths, and whether the answer's later bytes read its version depends on when consolidation
    finishes, alone or not: those bytes are not compared.)"""
    runs = {}
    for k in (1, 3):
        for url in (None, nats_server.url):
            runs[k, url] = await evaluate(
                tiny_model, "passkey", [LENGTH, 384], [0.3, 0.7], 2, nats_url=url,
                settle_s=30.0, concurrency=k,
            )  # fmt: skip
    for url in (None, nats_server.url):
        one, many = runs[1, url].cells, runs[3, url].cells
        assert [(c.length, c.depth) for c in many] == [(c.length, c.depth) for c in one]
        for a, b in zip(one, many, strict=True):
            assert (b.turns, b.bytes_in) == (a.turns, a.bytes_in)
            if url is None:
                assert (b.correct, b.samples) == (a.correct, a.samples)
            segments = 2 * ((b.length - 39) // 128) if url else 0
            assert b.segments == a.segments == segments and b.settle_timeouts == 0


def test_concurrency_below_one_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["eval", "passkey", "--model", "tiny", "--lengths", "256", "--n", "1"]
    assert main([*args, "--concurrency", "0", "--no-memory"]) == 2
    assert "--concurrency 0" in capsys.readouterr().err


async def test_a_context_longer_to_read_than_the_settle_bound_still_settles(
    nats_server: NatsServer, tiny_model: ByteLM
) -> None:
    """--settle bounds the wait for consolidation, not the reading of the context: a context that
    takes the engine longer than that to read is read whole, every segment of it closed, before
    the wait for consolidation starts."""
    length = 24 << 10
    report = await evaluate(
        tiny_model, "passkey", [length], [0.5], 1, nats_url=nats_server.url, settle_s=1.0
    )
    (cell,) = report.cells
    assert cell.seconds > 1.0, "the context took longer to read than the settle bound"
    assert cell.segments == (length - 39) // 128
