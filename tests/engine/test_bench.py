"""`bwr bench engine` on the CPU at toy sizes: the JSON the issue asks for is written, and the
pipelined runs produce the same number of bytes as the serial ones (the figures themselves live
in docs/BENCHMARKS.md, never in tests)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.engine_bench import add_arguments, run


def bench(tmp_path: Path, *argv: str) -> dict:
    p = argparse.ArgumentParser()
    add_arguments(p)
    out = tmp_path / "out.json"
    assert run(p.parse_args([*argv, "--json", str(out)])) == 0
    return json.loads(out.read_text())


def test_serve_writes_batched_baseline_and_both_pipelining_modes(tmp_path: Path) -> None:
    r = bench(tmp_path, "--model", "tiny", "--sessions", "3", "--bytes", "6", "--pipeline", "both")
    for run_name in ("batched-serial", "batched-pipelined", "baseline"):
        # every session generates its bytes (or ends early on EOS, never more)
        assert 0 < r[run_name]["tokens"] <= 3 * 6
        assert r[run_name]["tokens_per_s"] > 0
    assert r["batched-pipelined"]["pipelined"] and not r["batched-serial"]["pipelined"]
    assert r["batched"] == r["batched-pipelined"]
    assert r["speedup"] > 0 and r["pipelined_speedup"]["batched"] > 0
    assert set(r["ttft_ms"]) == set(r["itl_ms"]) == {"p50", "p99"}


def test_serve_runs_each_stream_interval(tmp_path: Path) -> None:
    r = bench(
        tmp_path,
        "--model",
        "tiny",
        "--sessions",
        "2",
        "--bytes",
        "5",
        "--stream-interval",
        "1,3",
        "--no-baseline",
    )
    assert [r[f"batched-interval{k}"]["stream_interval"] for k in (1, 3)] == [1, 3]
    assert "baseline" not in r


def test_decode_grid_times_the_runner_and_the_scheduler_loop(tmp_path: Path) -> None:
    r = bench(tmp_path, "--model", "tiny", "--batches", "2", "--modes", "eager", "--steps", "3")
    (row,) = r["rows"]
    assert row["batch"] == 2 and row["tokens_per_s"] > 0
    assert row["loop_tokens_per_s"] > 0 and row["pipelined_tokens_per_s"] > 0
    assert set(row["pipelined_host_ms"]) == {"plan", "launch", "wait", "complete"}


def test_memory_bench_alternates_off_and_on_and_consolidates(tmp_path: Path) -> None:
    """tiny's segment is 128 bytes; 2 sessions staggered by 64 over 140 steps close segments."""
    r = bench(
        tmp_path, "--model", "tiny", "--sessions", "2", "--steps", "140", "--memory",
        "--repeats", "2",
    )  # fmt: skip
    assert [(x["memory"], x["repeat"]) for x in r["runs"]] == [
        ("off", 0), ("on", 0), ("off", 1), ("on", 1),
    ]  # fmt: skip
    for x in r["runs"]:
        assert (x["segments_applied"] > 0) == (x["memory"] == "on")
        steps = x["steps"]
        assert steps["quiet"]["steps"] + steps["event"]["steps"] == 140
    assert r["on"]["steps"]["closed"]["steps"] > 0
    p99 = r["p99_ms_median"]
    assert r["p99_ratio"] == p99["on"] / p99["off"]


def test_host_bench_times_the_engine_without_the_model() -> None:
    """The host bench stubs the runner's launch and collect: every byte comes back at once and
    the model never runs (a real step would be timed as host time)."""
    import asyncio

    from benchmarks.host_bench import _run
    from model import ByteLM, ModelConfig

    model = ByteLM(ModelConfig.named("tiny"))
    calls = []
    model.step = lambda *a, **k: calls.append(1)  # type: ignore[method-assign]
    model.prefill = lambda *a, **k: calls.append(1)  # type: ignore[method-assign]
    r = asyncio.run(_run(model, 4, 6, 1))
    assert not calls
    assert r["steps"] >= 6 and r["bytes_per_s"] > 0
