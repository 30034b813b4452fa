"""The page in a real browser against a real `bwr up`: the chat streams a reply across many frames
and cancel stops it, the dashboard lists the session and its charts draw points, the memory view
shows levels, and the page reconnects and resumes its session after the gateway restarts. No
console errors anywhere (while the gateway is down, only the browser's own connection-refused
reports are allowed)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.web.conftest import Console, Gateway, screenshot

pytestmark = pytest.mark.slow

LONG_INPUT = "In the beginning was the word, and the word was with the stream. " * 8  # 528 bytes


FRAMES_OR_DONE = """n => { const o = [...document.querySelectorAll('.turn-out')].pop();
    return o && (Number(o.dataset.frames) >= n || o.dataset.done === '1'); }"""
CLICK_CANCEL = """() => { const b = document.getElementById('cancel');
    if (b.disabled) return false; b.click(); return true; }"""
ENGINE_CHARTS = (  # the charts fed by the engine summary (every second)
    "['chart-throughput', 'chart-latency', 'chart-queue'].map(id => window.bwr.charts[id])"
)
LAST_DONE = "() => [...document.querySelectorAll('.turn-out')].pop().dataset.done === '1'"


def open_chat(page: Any, gateway: Gateway) -> None:
    page.goto(gateway.url + "/#chat")
    page.wait_for_function("window.bwr && window.bwr.state.wsUp")


def send(page: Any, text: str, max_bytes: int) -> None:
    page.fill("#max-bytes", str(max_bytes))
    page.fill("#chat-input", text)
    page.click("#send")


def last_reply(page: Any) -> dict[str, Any]:
    out: dict[str, Any] = page.evaluate(
        """() => { const o = [...document.querySelectorAll('.turn-out')].pop();
                   return {text: o.textContent, frames: Number(o.dataset.frames),
                           done: o.dataset.done === '1'}; }"""
    )
    return out


def test_chat_streams_cancels_and_grows_memory(
    page: Any, gateway: Gateway, console: Console
) -> None:
    open_chat(page, gateway)
    # random weights may end a turn by themselves (end of sequence) before it can be cancelled:
    # then try another turn
    for _ in range(5):
        send(page, "Once upon a time", 8000)
        page.wait_for_function(FRAMES_OR_DONE, arg=3)
        early = last_reply(page)
        page.wait_for_function(FRAMES_OR_DONE, arg=early["frames"] + 10)
        later = last_reply(page)
        if later["done"]:
            continue
        # the reply grows across frames: seen short, then seen longer, before it ends
        assert not early["done"] and len(later["text"]) > len(early["text"]) > 0
        clicked = page.evaluate(CLICK_CANCEL)  # in one go: enabled means the turn still runs
        page.wait_for_function(LAST_DONE)
        end = page.locator(".turn-end").last.text_content() or ""
        if clicked and end.startswith("cancelled"):
            break
        assert end.startswith("eos"), end  # the only other way it may have ended meanwhile
    else:
        raise AssertionError("five turns in a row ended before they could be cancelled")
    assert len(last_reply(page)["text"].encode()) < 8000

    # a few segments of input (tiny's segment is 128 bytes) give the session memory levels
    send(page, LONG_INPUT, 32)
    page.wait_for_function(LAST_DONE)
    page.wait_for_function("() => window.bwr.state.levels.some(l => l.slots > 0)", timeout=45_000)
    assert int(page.text_content("#context-bytes") or 0) >= len(LONG_INPUT)
    screenshot(page, "chat")
    assert console.errors == []


def test_dashboard_lists_the_session_and_charts_draw(
    page: Any, gateway: Gateway, console: Console
) -> None:
    page.goto(gateway.url + "/#dashboard")
    page.wait_for_function("window.bwr && window.bwr.state.wsUp")
    sid = page.evaluate("window.bwr.state.session.id")
    row = page.wait_for_selector(f"#sessions tr[data-session='{sid}']")
    page.wait_for_function(  # its memory column: the levels the chat test filled
        "sid => /slots/.test(document.querySelector(`#sessions tr[data-session='${sid}']`)"
        ".children[3].textContent)",
        arg=sid,
    )
    assert row is not None
    # consolidation done: the chat session's memory versions, counted by the engine (/metrics)
    page.wait_for_function("Number(document.getElementById('m-consolidated').textContent) >= 1")
    # the feed sends a summary every second: each uPlot instance holds several points
    page.wait_for_function(f"() => {ENGINE_CHARTS}.every(c => c.plot.data[0].length >= 3)")
    lengths = page.evaluate(f"{ENGINE_CHARTS}.map(c => c.plot.data[0].length)")
    assert len(lengths) == 3 and min(lengths) >= 3
    # no trainer on this gateway: the loss chart stays empty (test_training.py draws it)
    assert page.evaluate("window.bwr.charts['chart-loss'].plot.data[0].length") == 0
    # a turn shows up in the throughput chart without a reload
    page.evaluate("window.bwr.state.ws.send(JSON.stringify({type:'input',text:'Hi',max_bytes:64}))")
    page.wait_for_function(
        "() => window.bwr.charts['chart-throughput'].plot.data.slice(1).some("
        "col => col.some(v => v > 0))"
    )
    assert page.text_content("#m-weights") == "0"
    screenshot(page, "dashboard")
    assert console.errors == []


def test_memory_view_draws_levels(page: Any, gateway: Gateway, console: Console) -> None:
    # the session has memory levels (the chat test): a short turn now decodes while reading them
    open_chat(page, gateway)
    send(page, "And then", 16)
    page.wait_for_function(LAST_DONE)
    page.goto(gateway.url + "/#dashboard")
    page.wait_for_function("window.bwr && window.bwr.state.wsUp")
    sid = page.evaluate("window.bwr.state.session.id")
    page.click(f"#sessions tr[data-session='{sid}'] a")  # the session's link to its memory
    page.wait_for_selector("#levels .level .slot.full")
    assert page.text_content("#mem-session") == sid
    assert page.locator("#levels .level").count() >= 1
    assert int(page.text_content("#mem-context") or 0) >= len(LONG_INPUT)
    # which slots the last read picked: counted in the line above the levels and outlined,
    # unless a version installed since moved the levels (then the line says so)
    last, outlined, line = page.evaluate(
        """() => [window.bwr.state.lastRead,
                  document.querySelectorAll('#levels .slot.full.picked').length,
                  document.getElementById('mem-read').textContent]"""
    )
    assert last["at"] >= len(LONG_INPUT) and last["heads"] > 0, last
    assert sum(s["heads"] for s in last["slots"]) > 0, last  # top-k: more than the null slot
    assert f"at byte {last['at']}" in line
    if last["earlier_version"]:
        assert outlined == 0 and "previous memory version" in line
    else:
        assert outlined == len(last["slots"]) and "(outlined)" in line
    screenshot(page, "memory")
    assert console.errors == []


REFUSED = ("ERR_CONNECTION_REFUSED", "ERR_CONNECTION_RESET", "WebSocket connection to")


def test_page_survives_a_gateway_restart(page: Any, gateway: Gateway, console: Console) -> None:
    open_chat(page, gateway)
    sid = page.evaluate("window.bwr.state.session.id")
    before = console.errors[:]
    gateway.stop()
    page.wait_for_function("!window.bwr.state.wsUp")
    gateway.start()
    page.wait_for_function("window.bwr.state.wsUp", timeout=45_000)
    assert page.evaluate("window.bwr.state.session.id") == sid  # resumed, not a new session
    assert page.text_content("#conn") == "resumed"
    send(page, "After the restart", 24)
    page.wait_for_function(LAST_DONE)
    end = page.locator(".turn-end").last.text_content() or ""
    assert end.split(" ")[0] in ("length", "eos"), end
    # the event feed reconnected too: new summaries arrive
    n = page.evaluate("window.bwr.charts['chart-queue'].plot.data[0].length")
    page.wait_for_function(
        "n => window.bwr.charts['chart-queue'].plot.data[0].length > n", arg=min(n, 119)
    )
    assert before == []
    other = [e for e in console.errors if not any(r in e for r in REFUSED)]
    assert other == []
