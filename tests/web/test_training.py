"""The dashboard's training loss curve in a real browser, against a real `bwr up --train`: the
trainer beside the engine learns from documents ingested over NATS, its reports (`events.train`)
reach the page through the event feed and draw the loss by step, and a page opened later draws
the same curve from the gateway's history (GET /v1/training)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway.conftest import train_flags
from tests.web.conftest import Console, Gateway, free_port, screenshot

pytestmark = pytest.mark.slow

CORPUS = Path(__file__).parents[1] / "data" / "english.txt"
TRAIN = train_flags(log_every=2, steps=40)
POINTS = "n => window.bwr.charts['chart-loss'].data[0].length >= n"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = Gateway(tmp_path_factory.mktemp("up-train"), free_port(), TRAIN)
    gw.start()
    yield gw
    gw.stop()


def ingest(gateway: Gateway, root: Path) -> None:
    assert gateway.up is not None
    docs = root / "docs"
    docs.mkdir()
    text = CORPUS.read_text()
    for i in range(4):
        (docs / f"doc{i}.txt").write_text(text[i * 2000 :] + text[: i * 2000])
    cmd = [sys.executable, "-m", "gateway.cli", "ingest", str(docs), "--namespace", "books"]
    done = subprocess.run(
        [*cmd, "--nats-url", gateway.up.nats_url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def test_the_dashboard_draws_the_training_loss(
    page: Any, gateway: Gateway, console: Console, tmp_path: Path
) -> None:
    page.goto(gateway.url + "/#dashboard")
    page.wait_for_function("window.bwr && window.bwr.state.wsUp")
    assert page.evaluate("window.bwr.charts['chart-loss'].data[0].length") == 0
    ingest(gateway, tmp_path)
    page.wait_for_function(POINTS, arg=4, timeout=150_000)  # live, from events.train
    steps, losses, card = page.evaluate(  # one read: the chart and its card move together
        "[...window.bwr.charts['chart-loss'].data,"
        " document.getElementById('m-train-step').textContent]"
    )
    assert steps == sorted(set(steps)) and all(s % 2 == 0 for s in steps), steps
    assert all(0 < v < 10 for v in losses), losses
    assert card == str(steps[-1])

    # what the gateway kept is what the page drew; a page opened now draws it at once
    history = httpx.get(gateway.url + "/v1/training", timeout=10).json()["reports"]
    by_step = {r["step"]: r["loss"] for r in history}
    assert all(abs(by_step[s] - v) < 1e-9 for s, v in zip(steps, losses, strict=True))
    screenshot(page, "training")
    later = page.context.new_page()
    later.on("console", console.on_console)
    later.on("pageerror", console.on_page_error)
    later.goto(gateway.url + "/#dashboard")
    later.wait_for_function(POINTS, arg=len(steps))
    assert later.evaluate("window.bwr.charts['chart-loss'].data[0]")[: len(steps)] == steps
    later.close()
    assert httpx.get(gateway.url + "/v1/training?since=x", timeout=10).status_code == 400
    assert console.errors == []
