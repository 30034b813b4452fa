"""The WebSocket protocol against a real server: turns, streaming input, cancel, close, detach
and resume by token, takeover, binary sessions, and errors that leave the connection usable."""

from __future__ import annotations

import asyncio
import base64

import httpx
import pytest
import websockets

from tests.gateway.conftest import Client, Running

ENDED = ("length", "eos")  # a random model may sample end-of-sequence early


async def test_open_stream_done(server: Running) -> None:
    async with await Client.connect(server.ws + "/v1/stream") as c:
        opened = await c.open(sampling={"seed": 1})
        assert len(opened["session"]) >= 20 and len(opened["token"]) >= 30 and not opened["resumed"]
        await c.send({"type": "input", "text": "Hello", "max_bytes": 24})
        _, done, seen = await c.until_done()
        assert done["reason"] in ENDED
        out = done["usage"]["output_bytes"]
        assert done["usage"] == {"input_bytes": 5, "output_bytes": out, "context_bytes": 5 + out}
        assert all(f["type"] == "delta" for f in seen[:-1]) and out <= 24
        _, done2 = await c.turn("again", max_bytes=4)
        assert done2["usage"]["context_bytes"] == 5 + out + 5 + done2["usage"]["output_bytes"]


async def test_first_input_opens_implicitly(server: Running) -> None:
    async with await Client.connect(server.ws + "/v1/stream") as c:
        await c.send({"type": "input", "text": "hi", "max_bytes": 3})
        assert (await c.recv())["type"] == "opened"
        _, done, _ = await c.until_done()
        assert done["reason"] in ENDED and done["usage"]["input_bytes"] == 2


async def test_same_seed_same_bytes(server: Running) -> None:
    outs = []
    for _ in range(2):
        async with await Client.connect(server.ws + "/v1/stream") as c:
            await c.open(binary=True)
            await c.send(
                {"type": "input", "text": "seeded", "max_bytes": 32, "seed": 7, "temperature": 1.0}
            )
            _, done, seen = await c.until_done()
            outs.append(
                b"".join(base64.b64decode(f["bytes"]) for f in seen if f["type"] == "delta")
            )
            assert len(outs[-1]) == done["usage"]["output_bytes"] > 0
    assert outs[0] == outs[1]


async def test_streaming_input_interrupts_and_cancel(server: Running) -> None:
    async with await Client.connect(server.ws + "/v1/stream") as c:
        await c.open(sampling={"ignore_eos": True})  # a random model may sample EOS before cancel
        await c.send({"type": "input", "text": "long", "max_bytes": 5000})
        assert (await c.recv())["type"] == "delta"
        await c.send({"type": "input", "text": "more", "max_bytes": 5000})
        _, done, _ = await c.until_done()
        assert done["reason"] == "interrupted"
        assert (await c.recv())["type"] == "delta"  # the second turn streams
        await c.send({"type": "cancel"})
        _, done, _ = await c.until_done()
        assert done["reason"] == "cancelled"
        _, done = await c.turn("after", max_bytes=2)  # still usable
        assert done["reason"] in ENDED


async def test_close_frame_closes_session(server: Running) -> None:
    c = await Client.connect(server.ws + "/v1/stream")
    opened = await c.open()
    await c.send({"type": "input", "text": "x", "max_bytes": 5000, "ignore_eos": True})
    await c.recv()
    await c.send({"type": "close"})
    frames = []
    with pytest.raises(websockets.ConnectionClosedOK):
        while True:
            frames.append(await c.recv())
    assert frames[-1]["type"] == "done" and frames[-1]["reason"] == "closed"
    assert opened["session"] not in server.gateway.registry.entries


async def test_detach_and_resume_with_token(server: Running) -> None:
    c = await Client.connect(server.ws + "/v1/stream")
    opened = await c.open(sampling={"max_bytes": 6})
    sid, token = opened["session"], opened["token"]
    _, first = await c.turn("first")
    await c.send({"type": "input", "text": "x", "max_bytes": 60000, "ignore_eos": True})
    assert (await c.recv())["type"] == "delta"
    await c.close()  # dropped: the session detaches, its turn is cancelled
    for _ in range(200):
        entry = server.gateway.registry.entries.get(sid)
        if entry is not None and entry.state.value == "detached":
            break
        await asyncio.sleep(0.01)
    assert server.gateway.registry.entries[sid].state.value == "detached"
    async with await Client.connect(f"{server.ws}/v1/sessions/{sid}/stream?token={token}") as r:
        again = await r.open()
        assert again["resumed"] and again["session"] == sid
        assert again["context_bytes"] >= first["usage"]["context_bytes"] + 1
        _, done, _ = await r.until_done()  # the cancelled turn's done was kept for us
        assert done["reason"] == "cancelled"
        _, done = await r.turn("resumed", temperature=0)  # the session's defaults survive
        assert done["reason"] in ENDED and done["usage"]["output_bytes"] <= 6


async def test_resume_needs_the_right_token(server: Running) -> None:
    async with await Client.connect(server.ws + "/v1/stream") as owner:
        sid = (await owner.open())["session"]
        async with await Client.connect(f"{server.ws}/v1/sessions/{sid}/stream") as other:
            await other.send({"type": "input", "text": "hi"})
            assert (await other.recv())["code"] == "unauthorized"
            await other.send({"type": "open", "token": "not-the-token"})
            assert (await other.recv())["code"] == "unauthorized"
            await other.send({"type": "open", "session": "nosuchsession", "token": "x"})
            assert (await other.recv())["code"] == "invalid_frame"  # differs from the URL's
        async with await Client.connect(server.ws + "/v1/stream") as other:
            await other.send({"type": "open", "session": "nosuchsession", "token": "x"})
            assert (await other.recv())["code"] == "unknown_session"
        _, done = await owner.turn("still mine", max_bytes=2)
        assert done["reason"] in ENDED


async def test_resume_takes_over_an_attached_session(server: Running) -> None:
    a = await Client.connect(server.ws + "/v1/stream")
    opened = await a.open()
    async with await Client.connect(server.ws + "/v1/stream") as b:
        again = await b.open(session=opened["session"], token=opened["token"])
        assert again["resumed"]
        err = await a.recv()
        assert err["code"] == "superseded" and err["fatal"]
        with pytest.raises(websockets.ConnectionClosed) as info:
            await a.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 4000
        _, done = await b.turn("mine now", max_bytes=3)
        assert done["reason"] in ENDED
    await a.close()


async def test_binary_session(server: Running) -> None:
    async with await Client.connect(server.ws + "/v1/stream") as c:
        await c.open(binary=True)
        await c.send(
            {"type": "input", "bytes": base64.b64encode(b"\x00\x01\xff").decode(), "max_bytes": 8}
        )
        _, done, seen = await c.until_done()
        data = b"".join(base64.b64decode(f["bytes"]) for f in seen if f["type"] == "delta")
        assert len(data) == done["usage"]["output_bytes"] and done["usage"]["input_bytes"] == 3


async def test_errors_keep_the_connection(server: Running) -> None:
    async with await Client.connect(server.ws + "/v1/stream") as c:
        await c.send({"type": "cancel"})
        assert (await c.recv())["code"] == "wrong_state"
        for raw, code in (
            ("{", "bad_json"),
            (b"\xc3(", "invalid_utf8"),
            ('{"type":"x"}', "unknown_type"),
            ('{"type":"input","max_bytes":1e9}', "invalid_frame"),
            ("z" * (2 << 20), "frame_too_large"),
            ('{"type":"input","text":"' + "a" * 300_000 + '"}', "input_too_large"),
        ):
            await c.send(raw)
            err = await c.recv()
            assert err["type"] == "error" and err["code"] == code and not err["fatal"], err
        await c.open()
        await c.send({"type": "open"})
        assert (await c.recv())["code"] == "wrong_state"
        _, done = await c.turn("ok", max_bytes=2)
        assert done["reason"] in ENDED


async def test_delete_closes_an_attached_socket(server: Running) -> None:
    c = await Client.connect(server.ws + "/v1/stream")
    opened = await c.open()
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.delete(
            f"/v1/sessions/{opened['session']}", headers={"X-Session-Token": opened["token"]}
        )
        assert r.status_code == 200 and r.json()["closed"]
    with pytest.raises(websockets.ConnectionClosedOK):
        await c.recv()


async def test_input_without_generation(server: Running) -> None:
    async with await Client.connect(server.ws + "/v1/stream") as c:
        await c.open()
        await c.send({"type": "input", "text": "context only", "max_bytes": 0})  # no turn, no done
        _, done = await c.turn("then a turn", max_bytes=2)
        assert done["usage"]["input_bytes"] == 11
        assert done["usage"]["context_bytes"] == 12 + 11 + done["usage"]["output_bytes"]
