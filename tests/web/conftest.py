"""Browser fixtures: a real `bwr up` (tiny model, CPU) on a fixed free port, and Debian's chromium
driven by Playwright. Only the system chromium is used (never a downloaded browser).

One browser context serves the whole module, so the page's localStorage (its session and token)
carries from test to test the way it does for a person who reloads the page.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.gateway.conftest import Up, start_up, stop_up

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--no-first-run",
]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
WAIT_MS = 30_000  # any single wait in the browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Gateway:
    """A `bwr up` that can be stopped and started again on the same port and data directory."""

    root: Path
    port: int
    args: tuple[str, ...] = ()  # more `bwr up` flags
    up: Up | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.up = start_up(self.root, "--port", str(self.port), *self.args)

    def stop(self) -> None:
        if self.up is not None:
            stop_up(self.up)
            self.up = None


@dataclass
class Console:
    """Console messages of type error and uncaught page errors, as the page reports them."""

    errors: list[str] = field(default_factory=list)

    def on_console(self, msg: Any) -> None:
        if msg.type == "error":
            self.errors.append(msg.text)

    def on_page_error(self, err: Any) -> None:
        self.errors.append(f"pageerror: {err}")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = Gateway(tmp_path_factory.mktemp("up"), free_port())
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def browser_context() -> Iterator[Any]:
    if not CHROMIUM.exists() or shutil.which("chromium") is None:
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (make test installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        context.set_default_timeout(WAIT_MS)
        yield context
        context.close()
        browser.close()


@pytest.fixture
def console() -> Console:
    return Console()


@pytest.fixture
def page(browser_context: Any, console: Console) -> Iterator[Any]:
    page = browser_context.new_page()
    page.on("console", console.on_console)
    page.on("pageerror", console.on_page_error)
    yield page
    page.close()


def screenshot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
