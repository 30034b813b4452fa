"""OpenAI-style completions against a real server: whole responses, SSE streams read by a plain
HTTP client, validation errors, and cancellation when the client goes away."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from gateway.openai import ChatMessage, render_chat
from tests.gateway.conftest import Running


async def sse(http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> list[Any]:
    events: list[Any] = []
    async with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def test_completion_whole(server: Running) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.post(
            "/v1/completions", json={"prompt": "Once", "max_tokens": 8, "seed": 1, "echo": True}
        )
        body = r.json()
        assert (
            r.status_code == 200
            and body["object"] == "text_completion"
            and body["id"].startswith("cmpl-")
        )
        choice = body["choices"][0]
        assert choice["text"].startswith("Once") and choice["finish_reason"] in ("length", "stop")
        assert body["usage"]["prompt_tokens"] == 4 and body["usage"]["completion_tokens"] <= 8
        again = (
            await http.post(
                "/v1/completions",
                json={"prompt": ["Once"], "max_tokens": 8, "seed": 1, "echo": True},
            )
        ).json()
        assert again["choices"][0]["text"] == choice["text"]  # same seed, same bytes


async def test_completion_stream(server: Running) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        events = await sse(
            http,
            "/v1/completions",
            {
                "prompt": "Hi",
                "max_tokens": 12,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
    assert events[-1] == "[DONE]"
    usage = events[-2]["usage"]
    final = events[-3]["choices"][0]
    assert final["finish_reason"] in ("length", "stop") and usage["prompt_tokens"] == 2
    text = "".join(e["choices"][0]["text"] for e in events[:-3])
    assert len(text.encode()) >= 1 or usage["completion_tokens"] == 0


async def test_chat_whole_and_stream(server: Running) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
    ]
    async with httpx.AsyncClient(base_url=server.url) as http:
        body = (
            await http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 6})
        ).json()
        assert (
            body["object"] == "chat.completion"
            and body["choices"][0]["message"]["role"] == "assistant"
        )
        assert body["usage"]["prompt_tokens"] == len(b"System: Be brief.\nUser: Hello\nAssistant:")
        events = await sse(
            http,
            "/v1/chat/completions",
            {"messages": messages, "max_completion_tokens": 6, "stream": True},
        )
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert (
        events[-2]["choices"][0]["finish_reason"] in ("length", "stop") and events[-1] == "[DONE]"
    )
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])


def test_chat_transcript() -> None:
    msgs = [ChatMessage("user", "a"), ChatMessage("assistant", "b"), ChatMessage("user", "c")]
    assert render_chat(msgs) == "User: a\nAssistant: b\nUser: c\nAssistant:"


async def test_validation_errors(server: Running) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        for path, body, code in (
            ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "invalid_frame"),
            ("/v1/completions", {"prompt": ["a", "b"]}, "invalid_frame"),
            ("/v1/completions", {"prompt": "x", "n": 2}, "invalid_frame"),
            ("/v1/completions", {"prompt": "x", "max_tokens": 10**7}, "invalid_frame"),
            ("/v1/completions", {"prompt": "x" * 300_000}, "input_too_large"),
            ("/v1/chat/completions", {"messages": []}, "invalid_frame"),
            ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, "invalid_frame"),
        ):
            r = await http.post(path, json=body)
            assert r.status_code in (400, 413) and r.json()["error"]["code"] == code, (body, r.text)
        r = await http.post("/v1/completions", content=b"{not json")
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_json"


async def test_disconnect_cancels(server: Running) -> None:
    gw = server.gateway
    async with httpx.AsyncClient(base_url=server.url) as http:
        async with http.stream(
            "POST",
            "/v1/completions",
            json={
                "prompt": "go",
                "max_tokens": 60000,
                "stream": True,
                "temperature": 0,
                "ignore_eos": True,
            },
        ) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    break
            assert gw.session_counts()["completion"] == 1
        # leaving the block closes the connection mid-stream
        for _ in range(300):
            if gw.session_counts()["completion"] == 0:
                break
            await asyncio.sleep(0.01)
        assert gw.session_counts()["completion"] == 0

        task = asyncio.create_task(
            http.post(
                "/v1/completions",
                json={"prompt": "go", "max_tokens": 60000, "temperature": 0, "ignore_eos": True},
            )
        )
        for _ in range(300):
            if gw.session_counts()["completion"] == 1:
                break
            await asyncio.sleep(0.01)
        task.cancel()  # a whole (non-streaming) request whose client leaves
        for _ in range(300):
            if gw.session_counts()["completion"] == 0:
                break
            await asyncio.sleep(0.01)
        assert gw.session_counts()["completion"] == 0
