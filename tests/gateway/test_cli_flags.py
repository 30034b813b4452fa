"""`bwr up`'s engine flags reach the gateway's config (and from there the EngineConfig that
gateway/serve.py builds), without starting a server."""

from __future__ import annotations

from typing import Any

import pytest

import gateway.serve
from gateway.cli import build_parser
from gateway.config import GatewayConfig


def test_up_passes_the_compile_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_up(cfg: GatewayConfig, model: str | None, device: str, **kw: Any) -> int:
        seen.update(cfg=cfg, device=device)
        return 0

    monkeypatch.setattr(gateway.serve, "up", fake_up)
    args = build_parser().parse_args(
        ["up", "--compile", "--compile-dynamic", "--decode-dtype", "bfloat16", "--no-memory"]
    )
    assert args.func(args) == 0
    cfg = seen["cfg"]
    assert cfg.compile and cfg.compile_dynamic and cfg.decode_dtype == "bfloat16"
    args = build_parser().parse_args(["up", "--no-memory"])
    assert args.func(args) == 0
    assert not seen["cfg"].compile_dynamic


def test_the_memory_hierarchy_reaches_the_workers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(gateway.serve, "up", lambda cfg, *a, **kw: seen.update(cfg=cfg) or 0)
    args = build_parser().parse_args(["up", "--memory-levels", "16,16,16", "--merge-group", "8"])
    assert args.func(args) == 0
    cfg = seen["cfg"]
    assert cfg.memory_config.level_capacities == (16, 16, 16) and cfg.memory_config.merge_group == 8
    assert GatewayConfig().memory_config.level_capacities == (64, 64, 64)  # the default

    cmds: list[list[str]] = []

    class Popen:
        def __init__(self, cmd: list[str], **kw: Any) -> None:
            cmds.append(cmd)
            kw["stdout"].close()  # the child would own its log

    monkeypatch.setattr(gateway.serve.subprocess, "Popen", Popen)
    spawn = GatewayConfig(
        nats_url="nats://x", worker_processes=2, data_dir=str(tmp_path), **_hier(cfg)
    )
    gateway.serve.start_workers(spawn, "tiny", "cpu")
    assert len(cmds) == 2
    for cmd in cmds:  # `bwr worker` parses what `bwr up` passes it
        wk = build_parser().parse_args(cmd[cmd.index("worker") :])
        assert (wk.memory_levels, wk.merge_group) == ("16,16,16", 8)


def _hier(cfg: GatewayConfig) -> dict[str, Any]:
    return {"memory_levels": cfg.memory_levels, "merge_group": cfg.merge_group}


def test_a_hierarchy_the_model_cannot_take_stops_up_before_it_serves(
    capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    bad = GatewayConfig(port=0, data_dir=str(tmp_path), memory_levels=(8, 8, 8, 8, 8))
    assert gateway.serve.up(bad, "tiny", "cpu") == 2
    assert "--memory-levels" in capsys.readouterr().err
    for argv in (
        ["up", "--memory-levels", "8,x"],
        ["worker", "--nats-url", "n", "--memory-levels", "0"],
    ):
        args = build_parser().parse_args(argv)
        assert args.func(args) == 2
    assert "--memory-levels" in capsys.readouterr().err
