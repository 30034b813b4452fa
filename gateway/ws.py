"""ws.py serves the WebSocket protocol: `/v1/stream` (a new session) and
`/v1/sessions/{id}/stream` (open or resume an existing one with its token).

One `Connection` per socket, a small state machine:

    AUTH --auth frame--> READY --open (or a first input)--> OPEN --close, session ends--> CLOSED

and two tasks in one anyio task group: the reader decodes frames and applies them (answering a
bad frame with an `error` frame and reading on), the writer moves the session's events from the
engine to the socket. Error frames and deltas share one send lock. A dropped socket detaches the
session (the turn in progress is cancelled; the session stays resumable with its token for
`detach_timeout_s`); a `close` frame closes it.

ws.py never decodes JSON itself (protocol.py does) and never decides session limits or tokens
(sessions.py does).
"""

from __future__ import annotations

import asyncio
import base64
import enum
import logging
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskGroup
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from engine import Delta, Done, EngineError, MemoryNotice, SamplingParams, ShuttingDown
from engine.types import Event
from gateway.protocol import (
    Auth,
    Cancel,
    ClientFrame,
    Close,
    DeltaFrame,
    DoneFrame,
    ErrorCode,
    Input,
    MemoryFrame,
    Open,
    Opened,
    ProtocolError,
    Sampling,
    UsageFrame,
    decode_client,
    encode_text,
    error_text,
    to_params,
)
from gateway.sessions import Entry, IllegalTransition

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("bwr.gateway")

CLOSE_NORMAL, CLOSE_POLICY, CLOSE_RESTART, CLOSE_SUPERSEDED = 1000, 1008, 1012, 4000


class ConnState(enum.Enum):
    AUTH = "auth"  # a key is required and the handshake carried none: waiting for an auth frame
    READY = "ready"  # authorized, no session yet
    OPEN = "open"  # streaming a session
    CLOSED = "closed"  # the session closed; the socket closes once the writer has drained it


def engine_code(e: EngineError) -> ErrorCode:
    try:
        return ErrorCode(e.code)
    except ValueError:
        return ErrorCode.INTERNAL


class Connection:
    def __init__(self, gw: Gateway, ws: WebSocket, path_sid: str | None) -> None:
        self.gw = gw
        self.ws = ws
        self.path_sid = path_sid
        self.owner: str = ws.scope.get("bwr.owner", "anonymous")
        authorized = bool(ws.scope.get("bwr.authorized", not gw.config.auth))
        self.state = ConnState.READY if authorized else ConnState.AUTH
        self.token = ws.query_params.get("token") or ws.headers.get("x-session-token")
        self.entry: Entry | None = None
        self._tg: TaskGroup | None = None
        self._lock = asyncio.Lock()  # no forced yield when free (anyio's Lock always yields)
        self._stopped = anyio.Event()
        self._disconnected = False
        self._superseded = False
        self._ended = False  # the writer saw the session end
        self._close_code = CLOSE_NORMAL

    def to(self, new: ConnState, *expected: ConnState) -> None:
        if self.state not in expected:
            names = ", ".join(s.value for s in expected)
            raise IllegalTransition(
                f"connection: {self.state.value} -> {new.value}; expected {names}"
            )
        self.state = new

    # ----- the registry's Attachment protocol -----

    def supersede(self) -> None:
        self._superseded = True
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    async def stopped(self) -> None:
        with anyio.move_on_after(5.0):
            await self._stopped.wait()

    # ----- the connection -----

    async def run(self) -> None:
        stats = self.gw.stats
        await self.ws.accept()
        stats.connections += 1
        try:
            if self.gw.closing:
                await self._error(
                    ErrorCode.SHUTTING_DOWN, "the gateway is shutting down", fatal=True
                )
                self._close_code = CLOSE_RESTART
                return
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._read_loop)
                if self.state is ConnState.AUTH:
                    tg.start_soon(self._auth_deadline)
        finally:
            stats.connections -= 1
            with anyio.CancelScope(shield=True):
                await self._finish()

    async def _finish(self) -> None:
        entry = self.entry
        if entry is not None and not self._superseded:
            await self.gw.registry.detach(entry, self)  # no-op when closed meanwhile
        self._stopped.set()
        if self._disconnected:
            return
        try:
            if self._superseded:
                await self._error(
                    ErrorCode.SUPERSEDED, "another connection resumed this session", fatal=True
                )
                self._close_code = CLOSE_SUPERSEDED
            with anyio.move_on_after(2.0):
                await self.ws.close(self._close_code)
        except (WebSocketDisconnect, WebSocketDisconnected, OSError):
            pass

    async def _auth_deadline(self) -> None:
        await anyio.sleep(self.gw.config.auth_timeout_s)
        if self.state is ConnState.AUTH:
            await self._error(ErrorCode.UNAUTHORIZED, "no auth frame in time", fatal=True)
            self._end(CLOSE_POLICY)

    def _end(self, code: int) -> None:
        self._close_code = code
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    async def _read_loop(self) -> None:
        limit = self.gw.config.max_frame_bytes
        while True:
            try:
                msg = await self.ws.receive()
            except (WebSocketDisconnect, WebSocketDisconnected, OSError):
                msg = {"type": "websocket.disconnect"}
            if msg["type"] == "websocket.disconnect":
                self._disconnected = True
                self._end(CLOSE_NORMAL)
                return
            self.gw.stats.frames_in += 1
            raw = msg.get("text")
            if raw is None:
                raw = msg.get("bytes") or b""
            try:
                await self._handle(decode_client(raw, limit))
            except ProtocolError as e:
                await self._error(e.code, e.message)
            except EngineError as e:
                await self._error(engine_code(e), str(e))
            except (WebSocketDisconnect, WebSocketDisconnected):
                self._disconnected = True
                self._end(CLOSE_NORMAL)
                return
            except Exception:
                log.exception("frame handling failed")
                await self._error(
                    ErrorCode.INTERNAL,
                    "the frame could not be applied (a server bug; it is logged)",
                )

    async def _handle(self, frame: ClientFrame) -> None:
        if isinstance(frame, Auth):
            await self._auth(frame)
        elif self.state is ConnState.AUTH:
            raise ProtocolError(
                ErrorCode.UNAUTHORIZED,
                'send {"type":"auth","api_key":KEY} first (or an Authorization: Bearer header)',
            )
        elif self.state is ConnState.CLOSED:
            raise ProtocolError(
                ErrorCode.WRONG_STATE, "the session is closed; this connection is closing"
            )
        elif isinstance(frame, Open):
            if self.state is ConnState.OPEN:
                raise ProtocolError(
                    ErrorCode.WRONG_STATE, "a session is already open on this connection"
                )
            await self._open(frame)
        elif isinstance(frame, Input):
            data = self._payload(
                frame
            )  # checked before an implicit open: a bad input opens nothing
            if self.state is ConnState.READY:
                self._params(frame.sampling(), None)
                await self._open(None)
            assert self.entry is not None
            params = self._params(frame.sampling(), self.entry.defaults)
            if self.gw.closing:
                raise ShuttingDown("the gateway is shutting down: no new turns")
            self.entry.session.submit(data, params)
        elif isinstance(frame, Cancel):
            if self.entry is None:
                raise ProtocolError(ErrorCode.WRONG_STATE, "no session is open: nothing to cancel")
            self.entry.session.cancel()
        elif isinstance(frame, Close):
            if self.entry is None:
                self._end(CLOSE_NORMAL)
                return
            self.to(ConnState.CLOSED, ConnState.OPEN)
            await self.gw.registry.close(self.entry, "client")  # the writer drains, then ends

    async def _auth(self, frame: Auth) -> None:
        if self.state is not ConnState.AUTH:
            raise ProtocolError(ErrorCode.WRONG_STATE, "already authorized")
        owner = self.gw.key_owner(frame.api_key)
        if owner is None:
            await self._error(ErrorCode.UNAUTHORIZED, "wrong API key", fatal=True)
            self._end(CLOSE_POLICY)
            return
        self.owner = owner
        self.to(ConnState.READY, ConnState.AUTH)

    async def _open(self, frame: Open | None) -> None:
        gw, cfg = self.gw, self.gw.config
        if gw.closing:
            raise ShuttingDown("the gateway is shutting down")
        req = frame or Open()
        if self.path_sid is not None and req.session is not None and req.session != self.path_sid:
            raise ProtocolError(
                ErrorCode.INVALID_FRAME, "open.session differs from the session in the URL"
            )
        sid = req.session or self.path_sid
        token = req.token or self.token
        if req.sampling is not None:
            self._params(
                Sampling(), req.sampling
            )  # reject bad defaults now, not at the first input
        if sid is not None:
            if token is None:
                raise ProtocolError(
                    ErrorCode.UNAUTHORIZED,
                    f"resuming session {sid} needs its token (open.token or ?token=)",
                )
            entry = await gw.registry.attach(sid, token, self)
            if req.sampling is not None:
                entry.defaults = req.sampling
            resumed = True
        else:
            entry, token = gw.registry.create(
                self.owner, binary=req.binary, namespace=req.namespace, defaults=req.sampling
            )
            gw.registry.bind(entry, self)
            gw.session_opened(entry)
            resumed = False
        self.entry = entry
        self.to(ConnState.OPEN, ConnState.READY)
        s = entry.session
        await self._send(
            encode_text(
                Opened(
                    session=s.id,
                    token=token,
                    resumed=resumed,
                    binary=entry.binary,
                    namespace=entry.namespace,
                    context_bytes=s.context_bytes,
                    generating=s.generating,
                    detach_timeout_s=cfg.detach_timeout_s,
                    max_input_bytes=cfg.max_input_bytes,
                    max_output_bytes=cfg.max_output_bytes,
                )
            )
        )
        assert self._tg is not None
        self._tg.start_soon(self._write_loop, entry)

    def _params(self, turn: Sampling, defaults: Sampling | None) -> SamplingParams:
        c = self.gw.config
        return to_params(
            turn,
            defaults,
            max_bytes=c.default_max_bytes,
            temperature=c.default_temperature,
            top_k=c.default_top_k,
            top_p=c.default_top_p,
            max_output=c.max_output_bytes,
            max_stop=c.max_stop,
            max_stop_bytes=c.max_stop_bytes,
        )

    def _payload(self, frame: Input) -> bytes:
        data = frame.payload()
        limit = self.gw.config.max_input_bytes
        if len(data) > limit:
            raise ProtocolError(
                ErrorCode.INPUT_TOO_LARGE,
                f"{len(data)} input bytes in one frame; the limit is {limit}",
            )
        return data

    # ----- output -----

    async def _write_loop(self, entry: Entry) -> None:
        session = entry.session
        try:
            while True:
                while entry.outbox:  # frames an earlier connection took but did not write
                    await self._send(entry.outbox[0])
                    entry.outbox.popleft()
                events = await session.next_batch()
                if not events:
                    if session.collector.closed:
                        break
                    continue
                for ev in events:
                    text = self._frame(ev, entry.binary)
                    if text is not None:
                        entry.outbox.append(text)
                    if isinstance(ev, Done):
                        self.gw.turn_done(entry)  # a turn boundary: snapshot the session
        except (WebSocketDisconnect, WebSocketDisconnected, OSError):
            self._disconnected = True
        self._ended = True
        self._end(CLOSE_NORMAL)

    @staticmethod
    def _frame(ev: Event, binary: bool) -> str | None:
        if isinstance(ev, Delta):
            if binary:
                if not ev.data:
                    return None
                return '{"type":"delta","bytes":"' + base64.b64encode(ev.data).decode() + '"}'
            return encode_text(DeltaFrame(text=ev.text)) if ev.text else None
        if isinstance(ev, Done):
            u = ev.usage
            return encode_text(
                DoneFrame(
                    ev.reason.label, UsageFrame(u.input_bytes, u.output_bytes, u.context_bytes)
                )
            )
        if isinstance(ev, MemoryNotice):
            return encode_text(MemoryFrame(ev.version, ev.levels))
        return None  # pragma: no cover - Event is closed

    async def _send(self, text: str) -> None:
        async with self._lock:
            await self.ws.send({"type": "websocket.send", "text": text})
        self.gw.stats.frames_out += 1

    async def _error(self, code: ErrorCode, message: str, fatal: bool = False) -> None:
        self.gw.stats.error(code.value)
        try:
            await self._send(error_text(code, message, fatal))
        except (WebSocketDisconnect, WebSocketDisconnected, OSError):
            self._disconnected = True
            self._end(CLOSE_NORMAL)


async def stream_new(ws: WebSocket) -> None:
    """WebSocket /v1/stream: a new session (or resume one named in the open frame)."""
    await Connection(ws.app.state.gateway, ws, None).run()


async def stream_session(ws: WebSocket) -> None:
    """WebSocket /v1/sessions/{id}/stream: open or resume that session (needs its token)."""
    await Connection(ws.app.state.gateway, ws, ws.path_params["sid"]).run()
