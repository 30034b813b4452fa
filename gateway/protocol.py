"""The WebSocket protocol (and the session bodies of the HTTP API): msgspec Structs, tagged by
`type`, with their codecs built once, the error codes, and the one function that turns a raw
frame into a checked client frame or a `ProtocolError` naming exactly what is wrong.

protocol.py owns shapes and validation only: it never touches a socket, a session or the engine
(the conversion to `SamplingParams` is the one engine type it builds). New fields are appended
with defaults; unknown fields are ignored so newer clients work with older gateways.

Client frames: auth, open, input, cancel, close. Server frames: opened, delta, done, memory,
error. docs/PROTOCOL.md describes them with examples.
"""

from __future__ import annotations

import enum
import json
import re
from typing import Annotated, Any

import msgspec

from engine import SamplingParams

MAX_SEED = (1 << 63) - 1
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class ErrorCode(enum.StrEnum):
    BAD_JSON = "bad_json"  # the frame is not JSON
    INVALID_UTF8 = "invalid_utf8"  # a binary frame (or a JSON escape) is not valid UTF-8
    UNKNOWN_TYPE = "unknown_type"  # `type` names no client frame
    INVALID_FRAME = "invalid_frame"  # a known frame with a missing, mistyped or out-of-range field
    INVALID_BASE64 = "invalid_base64"  # `bytes` is not valid base64
    FRAME_TOO_LARGE = "frame_too_large"  # the frame (or HTTP body) is over max_frame_bytes
    INPUT_TOO_LARGE = "input_too_large"  # one turn's input is over max_input_bytes
    WRONG_STATE = "wrong_state"  # the frame is not allowed now (e.g. cancel before open)
    BUSY = "busy"  # a session limit or a session's inbox is full: try again later
    UNKNOWN_SESSION = "unknown_session"  # no such live session (closed, expired, never existed)
    SESSION_CLOSED = "session_closed"  # the session closed while this frame was on its way
    UNAUTHORIZED = "unauthorized"  # no or a wrong API key, or a wrong session token
    SHUTTING_DOWN = "shutting_down"  # the gateway is draining; reconnect elsewhere or later
    SUPERSEDED = "superseded"  # another connection resumed this session; this one closes
    INTERNAL = "internal"  # a bug: the frame was not applied (the connection stays open)


class ProtocolError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# ----- shared pieces -----

MaxBytes = Annotated[int, msgspec.Meta(ge=0, le=1 << 30)]
Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=100.0)]
TopK = Annotated[int, msgspec.Meta(ge=0, le=1 << 20)]
TopP = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
Seed = Annotated[int, msgspec.Meta(ge=0, le=MAX_SEED)]
Name = Annotated[str, msgspec.Meta(max_length=256)]


class Sampling(msgspec.Struct, omit_defaults=True):
    """Sampling fields; None means 'the session default, else the gateway default'."""

    max_bytes: MaxBytes | None = None  # bytes to generate this turn (0: only read the input)
    temperature: Temperature | None = None  # 0 is greedy
    top_k: TopK | None = None  # keep the k most likely bytes (0: all)
    top_p: TopP | None = None  # nucleus mass to keep
    seed: Seed | None = None  # same seed, same input, same bytes
    stop: list[str] | None = None  # stop sequences (UTF-8), not emitted
    ignore_eos: bool | None = None  # never end the turn on end-of-sequence


# ----- client frames -----


class Auth(msgspec.Struct, tag="auth", tag_field="type"):
    api_key: str = ""


class Open(msgspec.Struct, tag="open", tag_field="type"):
    session: Name | None = None  # resume this session (with its token) instead of creating one
    token: Name | None = None  # the token `opened` returned when the session was created
    namespace: Name | None = None  # shared memory namespace to read (when memory lands)
    binary: bool = False  # deltas carry base64 `bytes` instead of `text`
    sampling: Sampling | None = None  # this session's defaults for every input


class Input(msgspec.Struct, tag="input", tag_field="type"):
    text: str | None = None  # input as text (sent as UTF-8)
    data: bytes | None = msgspec.field(default=None, name="bytes")  # or as base64 bytes
    max_bytes: MaxBytes | None = None
    temperature: Temperature | None = None
    top_k: TopK | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    stop: list[str] | None = None
    ignore_eos: bool | None = None

    def payload(self) -> bytes:
        if self.data is not None:
            return self.data
        return (self.text or "").encode()  # checked for lone surrogates by decode_client

    def sampling(self) -> Sampling:
        return Sampling(
            self.max_bytes,
            self.temperature,
            self.top_k,
            self.top_p,
            self.seed,
            self.stop,
            self.ignore_eos,
        )


class Cancel(msgspec.Struct, tag="cancel", tag_field="type"):
    pass


class Close(msgspec.Struct, tag="close", tag_field="type"):
    pass


ClientFrame = Auth | Open | Input | Cancel | Close
CLIENT_TYPES = frozenset({"auth", "open", "input", "cancel", "close"})
# Every field name a client frame may carry (as sent on the wire), for validators and fuzzers.
CLIENT_FIELDS = tuple(
    sorted({f.encode_name for t in ClientFrame.__args__ for f in msgspec.structs.fields(t)})
)

# ----- server frames -----


class Opened(msgspec.Struct, tag="opened", tag_field="type"):
    session: str  # the session id (unguessable)
    token: str  # needed to resume it: /v1/sessions/{session}/stream
    resumed: bool = False  # an existing session was re-attached
    binary: bool = False
    namespace: str | None = None
    context_bytes: int = 0  # bytes the session has read so far
    generating: bool = False  # a turn is in progress
    detach_timeout_s: float = 0.0  # how long the session survives a dropped connection
    max_input_bytes: int = 0  # per input frame
    max_output_bytes: int = 0  # per turn (max_bytes)


class DeltaFrame(msgspec.Struct, tag="delta", tag_field="type", omit_defaults=True):
    text: str | None = None  # text mode: whole UTF-8 characters
    data: bytes | None = msgspec.field(default=None, name="bytes")  # binary mode: base64


class UsageFrame(msgspec.Struct):
    input_bytes: int  # bytes read this turn
    output_bytes: int  # bytes generated this turn
    context_bytes: int  # bytes the session has read in all


class DoneFrame(msgspec.Struct, tag="done", tag_field="type"):
    reason: str  # length, stop, eos, cancelled, interrupted, closed
    usage: UsageFrame


class MemoryFrame(msgspec.Struct, tag="memory", tag_field="type"):
    version: int  # the memory version the session now reads
    levels: list[dict[str, int]] = msgspec.field(default_factory=list)


class ErrorFrame(msgspec.Struct, tag="error", tag_field="type"):
    code: str  # an ErrorCode value
    message: str  # what was wrong, for a person
    fatal: bool = False  # the server closes the connection after this frame


ServerFrame = Opened | DeltaFrame | DoneFrame | MemoryFrame | ErrorFrame

# ----- HTTP session bodies -----


class CreateSession(msgspec.Struct):
    binary: bool = False
    namespace: Name | None = None
    sampling: Sampling | None = None


# ----- codecs, built once -----

_client = msgspec.json.Decoder(ClientFrame)
_any = msgspec.json.Decoder()
_create = msgspec.json.Decoder(CreateSession)
encoder = msgspec.json.Encoder()


def encode_text(frame: ServerFrame) -> str:
    """A server frame as the text of a WebSocket text frame."""
    return encoder.encode(frame).decode()


def error_text(code: ErrorCode, message: str, fatal: bool = False) -> str:
    return encode_text(ErrorFrame(code.value, message, fatal))


def decode_client(raw: str | bytes, max_frame_bytes: int) -> ClientFrame:
    """Check and decode one WebSocket frame (text or binary: both carry UTF-8 JSON)."""
    if isinstance(raw, str):
        size = len(raw) if raw.isascii() else len(raw.encode("utf-8", "surrogatepass"))
    else:
        size = len(raw)
    if size > max_frame_bytes:
        raise ProtocolError(
            ErrorCode.FRAME_TOO_LARGE, f"frame of {size} bytes; the limit is {max_frame_bytes}"
        )
    if isinstance(raw, bytes):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(
                ErrorCode.INVALID_UTF8,
                f"binary frame is not UTF-8 JSON: {e.reason} at byte {e.start}",
            ) from None
    try:
        frame: ClientFrame = _client.decode(raw)
    except msgspec.ValidationError as e:
        raise _classify(raw, str(e)) from None
    except (msgspec.DecodeError, UnicodeError) as e:
        raise _malformed(raw, str(e)) from None
    check_frame(frame)
    return frame


def decode_create(body: bytes) -> CreateSession:
    """The body of POST /v1/sessions (empty means all defaults)."""
    if not body.strip():
        return CreateSession()
    try:
        req = _create.decode(body)
    except msgspec.ValidationError as e:
        raise ProtocolError(ErrorCode.INVALID_FRAME, str(e)) from None
    except (msgspec.DecodeError, UnicodeError) as e:
        raise _malformed(body, str(e)) from None
    if req.namespace is not None:
        check_name(req.namespace, "namespace")
    if req.sampling is not None:
        check_stop(req.sampling.stop)
    return req


def _malformed(raw: str | bytes, detail: str) -> ProtocolError:
    # msgspec refuses JSON escapes of lone surrogates ("\ud800"); the stdlib accepts them, so a
    # document only the stdlib reads is valid JSON holding text that cannot be UTF-8.
    try:
        json.loads(raw)
    except (ValueError, RecursionError):
        return ProtocolError(ErrorCode.BAD_JSON, f"not JSON: {detail}")
    return ProtocolError(
        ErrorCode.INVALID_UTF8, "a string holds an unpaired surrogate escape (not UTF-8)"
    )


def _classify(raw: str | bytes, detail: str) -> ProtocolError:
    """A ValidationError from the union decoder: say whether the type or a field is wrong."""
    try:
        value: Any = _any.decode(raw)
    except (msgspec.DecodeError, UnicodeError):  # pragma: no cover - the typed decode parsed it
        return ProtocolError(ErrorCode.BAD_JSON, detail)
    if not isinstance(value, dict):
        return ProtocolError(
            ErrorCode.INVALID_FRAME,
            f"a frame is a JSON object with a `type`, got {type(value).__name__}",
        )
    kind = value.get("type")
    if kind is None:
        return ProtocolError(
            ErrorCode.INVALID_FRAME, "a frame needs a `type` (auth, open, input, cancel, close)"
        )
    if not isinstance(kind, str) or kind not in CLIENT_TYPES:
        shown = kind[:40] if isinstance(kind, str) else type(kind).__name__
        return ProtocolError(
            ErrorCode.UNKNOWN_TYPE,
            f"unknown frame type {shown!r}; known: auth, open, input, cancel, close",
        )
    if "`$.bytes`" in detail and "base64" in detail:
        return ProtocolError(ErrorCode.INVALID_BASE64, "`bytes` is not valid base64")
    return ProtocolError(ErrorCode.INVALID_FRAME, f"{kind}: {detail}")


def check_name(name: str, what: str) -> str:
    if not _NAME.match(name):
        raise ProtocolError(
            ErrorCode.INVALID_FRAME, f"{what} {name[:40]!r}: use 1 to 128 of A-Z a-z 0-9 _ -"
        )
    return name


def check_stop(stop: list[str] | None) -> None:
    if stop is None:
        return
    for s in stop:
        if not s:
            raise ProtocolError(ErrorCode.INVALID_FRAME, "stop sequences must be non-empty")
        _utf8(s, "stop")


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:
        raise ProtocolError(
            ErrorCode.INVALID_UTF8, f"{what} holds an unpaired surrogate (not UTF-8)"
        ) from None


def check_frame(frame: ClientFrame) -> None:
    """Checks a schema cannot express: one of text/bytes, names, stop sequences, UTF-8."""
    if isinstance(frame, Input):
        if frame.text is not None and frame.data is not None:
            raise ProtocolError(ErrorCode.INVALID_FRAME, "input: give `text` or `bytes`, not both")
        if frame.text is not None:
            _utf8(frame.text, "text")
        check_stop(frame.stop)
    elif isinstance(frame, Open):
        if frame.namespace is not None:
            check_name(frame.namespace, "namespace")
        if frame.session is not None:
            check_name(frame.session, "session")
        if frame.sampling is not None:
            check_stop(frame.sampling.stop)


def to_params(
    turn: Sampling,
    session: Sampling | None,
    *,
    max_bytes: int,
    temperature: float,
    top_k: int,
    top_p: float,
    max_output: int,
    max_stop: int,
    max_stop_bytes: int,
) -> SamplingParams:
    """Merge a turn's fields over the session's defaults over the gateway's -> SamplingParams."""
    s = session or Sampling()

    def pick(a: Any, b: Any, c: Any) -> Any:
        return a if a is not None else b if b is not None else c

    n = pick(turn.max_bytes, s.max_bytes, max_bytes)
    if n > max_output:
        raise ProtocolError(
            ErrorCode.INVALID_FRAME, f"max_bytes {n} is over the limit {max_output}"
        )
    stop_list: list[str] = pick(turn.stop, s.stop, [])
    stops = tuple(_utf8(x, "stop") for x in stop_list)
    if len(stops) > max_stop or any(len(x) > max_stop_bytes for x in stops):
        raise ProtocolError(
            ErrorCode.INVALID_FRAME,
            f"at most {max_stop} stop sequences of at most {max_stop_bytes} bytes",
        )
    try:
        return SamplingParams(
            max_bytes=n,
            temperature=pick(turn.temperature, s.temperature, temperature),
            top_k=pick(turn.top_k, s.top_k, top_k),
            top_p=pick(turn.top_p, s.top_p, top_p),
            seed=pick(turn.seed, s.seed, None),
            stop=stops,
            ignore_eos=pick(turn.ignore_eos, s.ignore_eos, False),
        )
    except ValueError as e:
        raise ProtocolError(ErrorCode.INVALID_FRAME, str(e)) from None
