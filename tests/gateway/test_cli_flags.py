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
