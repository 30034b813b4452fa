"""chat.py is `bwr chat`: a terminal client for people who live in a shell. It opens a session
over the WebSocket protocol, sends each line of stdin as an input frame, prints deltas as they
arrive, cancels the current turn on Ctrl-C (a second Ctrl-C while idle quits), and closes the
session at end of input.

chat.py speaks only the public protocol (JSON frames); it imports nothing from the server side.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

import websockets


def stream_url(url: str) -> str:
    """ws://host:port (or http://...) -> the /v1/stream URL; a full stream URL is kept."""
    if url.startswith("http://"):
        url = "ws://" + url[len("http://") :]
    elif url.startswith("https://"):
        url = "wss://" + url[len("https://") :]
    elif "://" not in url:
        url = "ws://" + url
    return url if "/stream" in url else url.rstrip("/") + "/v1/stream"


class Chat:
    def __init__(
        self,
        url: str,
        api_key: str | None,
        *,
        max_bytes: int,
        temperature: float,
        raw: bool,
        out: TextIO = sys.stdout,
        err: TextIO = sys.stderr,
    ) -> None:
        self.url = stream_url(url)
        self.api_key = api_key
        self.max_bytes = max_bytes
        self.temperature = temperature
        self.raw = raw
        self.out, self.err = out, err
        self.turns = 0
        self.generating = False
        self.idle = asyncio.Event()
        self.idle.set()
        self._pending: asyncio.Future[None] | None = None  # a cancel frame being sent

    def _say(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    def _prompt_text(self, line: str) -> str:
        if self.raw:
            return line + "\n"
        return ("" if self.turns == 0 else "\n") + f"User: {line}\nAssistant:"

    async def run(self) -> int:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        try:
            ws = await websockets.connect(self.url, additional_headers=headers, max_size=None)
        except (OSError, websockets.InvalidHandshake) as e:
            self._say(f"bwr chat: cannot connect to {self.url}: {e}")
            return 1
        async with ws:
            sampling: dict[str, Any] = {
                "max_bytes": self.max_bytes,
                "temperature": self.temperature,
            }
            if not self.raw:
                sampling["stop"] = ["\nUser:"]
            await ws.send(json.dumps({"type": "open", "sampling": sampling}))
            first = json.loads(await ws.recv())
            if first.get("type") != "opened":
                self._say(f"bwr chat: {first.get('code')}: {first.get('message')}")
                return 1
            self._say(
                f"session {first['session']} (resume token {first['token']});"
                " Ctrl-C cancels a turn, Ctrl-D quits"
            )
            reader = asyncio.create_task(self._read(ws))
            loop = asyncio.get_running_loop()
            quit_now = asyncio.Event()
            loop.add_signal_handler(signal.SIGINT, self._interrupt, ws, quit_now)
            try:
                await self._send_lines(ws, quit_now)
                await ws.send(json.dumps({"type": "close"}))
                await asyncio.wait_for(reader, 10)
            except (websockets.ConnectionClosed, TimeoutError):
                pass
            finally:
                loop.remove_signal_handler(signal.SIGINT)
                reader.cancel()
        return 0

    def _interrupt(self, ws: Any, quit_now: asyncio.Event) -> None:
        if self.generating:
            self._pending = asyncio.ensure_future(ws.send(json.dumps({"type": "cancel"})))
        else:
            quit_now.set()

    async def _send_lines(self, ws: Any, quit_now: asyncio.Event) -> None:
        readline = await _line_reader()
        while not quit_now.is_set():
            await self.idle.wait()
            self.err.write("> ")
            self.err.flush()
            line_task = asyncio.ensure_future(readline())
            quit_task = asyncio.ensure_future(quit_now.wait())
            done, _ = await asyncio.wait(
                {line_task, quit_task}, return_when=asyncio.FIRST_COMPLETED
            )
            if quit_task not in done:
                quit_task.cancel()
            if line_task not in done:
                line_task.cancel()
                return
            raw = line_task.result()
            if not raw:  # end of input: let the last turn finish, then close
                self.err.write("\n")
                await self.idle.wait()
                return
            line = raw.decode(errors="replace").rstrip("\n")
            if not line.strip():
                continue
            self.idle.clear()
            self.generating = True
            await ws.send(json.dumps({"type": "input", "text": self._prompt_text(line)}))
            self.turns += 1

    async def _read(self, ws: Any) -> None:
        async for message in ws:
            frame = json.loads(message)
            kind = frame.get("type")
            if kind == "delta":
                text = frame.get("text")
                if text is None:
                    text = base64.b64decode(frame.get("bytes", "")).decode(errors="replace")
                self.out.write(text)
                self.out.flush()
            elif kind == "done":
                u = frame.get("usage", {})
                self.out.write("\n")
                self.out.flush()
                out, ctx = u.get("output_bytes", 0), u.get("context_bytes", 0)
                self._say(f"[{frame.get('reason')}: {out} bytes out, context {ctx} bytes]")
                self.generating = False
                self.idle.set()
            elif kind == "error":
                self._say(f"[error {frame.get('code')}: {frame.get('message')}]")
                if self.generating and frame.get("code") in (
                    "busy",
                    "invalid_frame",
                    "input_too_large",
                    "shutting_down",
                ):
                    self.generating = False
                    self.idle.set()
            elif kind == "memory":
                self._say(f"[memory version {frame.get('version')}]")


async def _line_reader() -> Callable[[], Awaitable[bytes]]:
    """stdin lines without blocking the loop: a pipe or terminal is read by the loop, a regular
    file by a thread."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    except ValueError:
        return lambda: loop.run_in_executor(None, sys.stdin.buffer.readline)
    return reader.readline


def chat(
    url: str,
    api_key: str | None,
    *,
    max_bytes: int = 256,
    temperature: float = 0.8,
    raw: bool = False,
) -> int:
    try:
        return asyncio.run(
            Chat(url, api_key, max_bytes=max_bytes, temperature=temperature, raw=raw).run()
        )
    except KeyboardInterrupt:
        return 130
