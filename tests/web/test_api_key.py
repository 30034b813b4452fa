"""The page against a gateway with an API key: it loads without the key, asks for it (and stops
asking the gateway until it has one), then sends it as the first `auth` frame and as a Bearer
header: the chat streams and the event feed draws."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from gateway.config import GatewayConfig
from tests.gateway.conftest import Running, serve
from tests.web.conftest import Console

KEY = "web-secret"


@pytest.fixture(scope="module")
def locked() -> Iterator[Running]:
    r = serve(GatewayConfig(api_keys=(KEY,), events_interval_s=0.25))
    yield r
    r.stop()


def test_page_asks_for_the_key_then_works(page: Any, locked: Running, console: Console) -> None:
    page.goto(locked.url + "/#chat")
    page.wait_for_function("window.bwr && window.bwr.state.needKey")
    assert page.text_content("#conn") == "API key needed"
    # only the refused requests themselves may be reported before the key is in
    assert all("401" in e for e in console.errors), console.errors
    console.errors.clear()

    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("window.bwr.state.wsUp")
    page.fill("#chat-input", "A key")
    page.fill("#max-bytes", "16")
    page.click("#send")
    page.wait_for_function(
        "() => [...document.querySelectorAll('.turn-out')].pop().dataset.done === '1'"
    )
    page.wait_for_function(
        "() => ['chart-throughput', 'chart-latency', 'chart-queue']"
        ".every(id => window.bwr.charts[id].plot.data[0].length >= 2)"
    )
    assert page.evaluate("localStorage.getItem('bwr.apiKey')") == KEY
    assert console.errors == []
