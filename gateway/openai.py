"""openai.py serves OpenAI-compatible `POST /v1/completions` and `POST /v1/chat/completions`,
whole responses or `stream: true` as server-sent events (`data: {...}` chunks, then
`data: [DONE]`).

Each request runs on a fresh, ephemeral engine session (counted against the session limits) that
is closed when the response ends or the client goes away; a client that disconnects cancels its
generation within a step. One token is one byte. Chat messages become a plain transcript
("User: ...\\nAssistant:") and generation stops before the next "\\nUser:".

openai.py owns these request and response shapes; it never touches a WebSocket.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
import msgspec
import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from engine import Delta, Done, EngineError, FinishReason, SamplingParams
from gateway.http import JSON, fail, fail_engine, gateway, owner, read_body
from gateway.protocol import (
    ErrorCode,
    ProtocolError,
    Sampling,
    Seed,
    Temperature,
    TopK,
    TopP,
    to_params,
)
from gateway.sessions import Entry

MaxTokens = Annotated[int, msgspec.Meta(ge=0, le=1 << 30)]
OneChoice = Annotated[int, msgspec.Meta(ge=1, le=1)]

ROLES = {
    "system": "System",
    "developer": "System",
    "user": "User",
    "assistant": "Assistant",
    "tool": "Tool",
}
CHAT_STOP = ("\nUser:", "\nSystem:")
FINISH = {FinishReason.LENGTH: "length", FinishReason.STOP: "stop", FinishReason.EOS: "stop"}


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class CompletionRequest(msgspec.Struct):
    prompt: str | list[str] = ""
    model: str | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None  # an extension (vLLM has it too)
    seed: Seed | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool | None = None  # an extension (vLLM has it too): run to max_tokens or a stop
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: OneChoice = 1
    echo: bool = False
    user: str | None = None


class ContentPart(msgspec.Struct):
    type: str = "text"
    text: str = ""


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(msgspec.Struct):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    model: str | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    seed: Seed | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool | None = None  # an extension (vLLM has it too): run to max_tokens or a stop
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: OneChoice = 1
    user: str | None = None


_completion = msgspec.json.Decoder(CompletionRequest)
_chat = msgspec.json.Decoder(ChatRequest)


def render_chat(messages: list[ChatMessage]) -> str:
    lines = []
    for m in messages:
        if isinstance(m.content, list):
            text = "".join(p.text for p in m.content if p.type == "text")
        else:
            text = m.content or ""
        lines.append(f"{ROLES.get(m.role, m.role.title()[:32])}: {text}")
    return "\n".join(lines) + "\nAssistant:"


def _stops(stop: str | list[str] | None, extra: tuple[str, ...] = ()) -> list[str]:
    given = [stop] if isinstance(stop, str) else list(stop or [])
    return given + [s for s in extra if s not in given]


async def _decode(request: Request, decoder: msgspec.json.Decoder[Any]) -> Any:
    body = await read_body(request, gateway(request).config.max_frame_bytes)
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as e:
        raise ProtocolError(ErrorCode.INVALID_FRAME, str(e)) from None
    except (msgspec.DecodeError, UnicodeError) as e:
        raise ProtocolError(ErrorCode.BAD_JSON, f"not JSON: {e}") from None


def _params(request: Request, sampling: Sampling) -> SamplingParams:
    c = gateway(request).config
    return to_params(
        sampling,
        None,
        max_bytes=c.default_completion_tokens,
        temperature=c.default_temperature,
        top_k=c.default_top_k,
        top_p=c.default_top_p,
        max_output=c.max_output_bytes,
        max_stop=c.max_stop,
        max_stop_bytes=c.max_stop_bytes,
    )


def _prompt(request: Request, text: str) -> bytes:
    try:
        data = text.encode()
    except UnicodeEncodeError:
        raise ProtocolError(
            ErrorCode.INVALID_UTF8, "the prompt holds an unpaired surrogate (not UTF-8)"
        ) from None
    limit = gateway(request).config.max_input_bytes
    if len(data) > limit:
        raise ProtocolError(
            ErrorCode.INPUT_TOO_LARGE, f"prompt of {len(data)} bytes; the limit is {limit}"
        )
    return data


async def completions(request: Request) -> Response:
    try:
        req: CompletionRequest = await _decode(request, _completion)
        if isinstance(req.prompt, list):
            if len(req.prompt) != 1:
                raise ProtocolError(
                    ErrorCode.INVALID_FRAME,
                    "prompt: give one string (batches of prompts are not served)",
                )
            req.prompt = req.prompt[0]
        prompt = _prompt(request, req.prompt)
        params = _params(
            request,
            Sampling(
                req.max_tokens,
                req.temperature,
                req.top_k,
                req.top_p,
                req.seed,
                _stops(req.stop),
                req.ignore_eos,
            ),
        )
    except ProtocolError as e:
        return fail(request, e.code.value, e.message)
    except ClientDisconnect:
        return Response(status_code=400)
    return await _serve(
        request,
        prompt,
        params,
        chat=False,
        stream=req.stream,
        usage=bool(req.stream_options and req.stream_options.include_usage),
        echo=req.prompt if req.echo else "",
        model=req.model,
    )


async def chat_completions(request: Request) -> Response:
    try:
        req: ChatRequest = await _decode(request, _chat)
        prompt = _prompt(request, render_chat(req.messages))
        limit = (
            req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        )
        params = _params(
            request,
            Sampling(
                limit,
                req.temperature,
                req.top_k,
                req.top_p,
                req.seed,
                _stops(req.stop, CHAT_STOP),
                req.ignore_eos,
            ),
        )
    except ProtocolError as e:
        return fail(request, e.code.value, e.message)
    except ClientDisconnect:
        return Response(status_code=400)
    return await _serve(
        request,
        prompt,
        params,
        chat=True,
        stream=req.stream,
        usage=bool(req.stream_options and req.stream_options.include_usage),
        echo="",
        model=req.model,
    )


async def _serve(
    request: Request,
    prompt: bytes,
    params: SamplingParams,
    *,
    chat: bool,
    stream: bool,
    usage: bool,
    echo: str,
    model: str | None,
) -> Response:
    gw = gateway(request)
    try:
        entry, _ = gw.registry.create(owner(request), ephemeral=True)
    except EngineError as e:
        return fail_engine(request, e)
    try:
        entry.session.submit(prompt, params)
    except EngineError as e:
        await gw.registry.close(entry)
        return fail_engine(request, e)
    gw.stats.completions += 1
    meta = {
        "id": ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12),
        "created": int(time.time()),
        "model": model or gw.config.model_name,
    }
    if stream:
        return StreamingResponse(
            _sse(gw.registry, entry, meta, chat=chat, usage=usage, echo=echo),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await _whole(request, entry, meta, chat=chat, echo=echo)


def _usage(done: Done | None) -> dict[str, int]:
    i = done.usage.input_bytes if done else 0
    o = done.usage.output_bytes if done else 0
    return {"prompt_tokens": i, "completion_tokens": o, "total_tokens": i + o}


def _finish(done: Done | None) -> str:
    return FINISH.get(done.reason, "abort") if done else "abort"


async def _whole(
    request: Request, entry: Entry, meta: dict[str, Any], *, chat: bool, echo: str
) -> Response:
    """Collect the turn; a client that disconnects meanwhile cancels it (its session closes)."""
    gw = gateway(request)
    parts: list[str] = [echo] if echo else []
    done: Done | None = None
    try:
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            async for ev in entry.session.events():
                if isinstance(ev, Delta):
                    parts.append(ev.text)
                elif isinstance(ev, Done):
                    done = ev
                    break
            tg.cancel_scope.cancel()
    finally:
        await gw.registry.close(entry)
    text = "".join(parts)
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": _finish(done),
        }
        return JSON(
            {**meta, "object": "chat.completion", "choices": [choice], "usage": _usage(done)}
        )
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": _finish(done)}
    return JSON({**meta, "object": "text_completion", "choices": [choice], "usage": _usage(done)})


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


async def _sse(
    registry: Any, entry: Entry, meta: dict[str, Any], *, chat: bool, usage: bool, echo: str
) -> AsyncIterator[bytes]:
    """Chunks as OpenAI sends them. Starlette cancels this generator when the client leaves;
    the finally block then closes the session (which frees its slot within a step)."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, first: bool = False) -> bytes:
        if chat:
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if first:
                delta["role"] = "assistant"
            c: dict[str, Any] = {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": finish,
            }
        else:
            c = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return _event({**meta, "object": obj, "choices": [c]})

    try:
        if chat:
            yield chunk("", None, first=True)
        if echo:
            yield chunk(echo, None)
        done: Done | None = None
        async for ev in entry.session.events():
            if isinstance(ev, Delta) and ev.text:
                yield chunk(ev.text, None)
            elif isinstance(ev, Done):
                done = ev
                break
        yield chunk(None, _finish(done))
        if usage:
            yield _event({**meta, "object": obj, "choices": [], "usage": _usage(done)})
        yield b"data: [DONE]\n\n"
    finally:
        await registry.close(entry)
