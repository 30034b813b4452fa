"""Hypothesis throws random and malformed frames at the WebSocket (random bytes, random text and
JSON, known types with wrong fields, oversized frames, invalid UTF-8 in binary frames) and random
bodies at the HTTP routes, while a well-behaved client streams seeded turns beside them.

Must hold: no 5xx, no crash, every surely-bad frame answered by exactly one `error` frame on a
connection that stays open, and the well-behaved client's bytes equal those of the same seeded
turn run alone.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from websockets.sync.client import ClientConnection, connect

from gateway.config import GatewayConfig
from gateway.protocol import CLIENT_FIELDS, CLIENT_TYPES, ErrorCode
from tests.gateway.conftest import Running, serve
from tests.gateway.strategies import JSON_VALUES

LIMIT = 8192  # max_frame_bytes of the fuzzed gateway
KNOWN = CLIENT_TYPES
SERVER_TYPES = {"opened", "delta", "done", "memory", "error"}
CODES = {c.value for c in ErrorCode}
PROBE = json.dumps({"type": "__probe__"})
FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[Running]:
    running = serve(
        GatewayConfig(
            max_frame_bytes=LIMIT,
            max_input_bytes=2048,
            max_output_bytes=32,
            default_max_bytes=16,
            default_completion_tokens=8,
            max_sessions=24,
            max_sessions_per_key=24,
            detach_timeout_s=0,
        )
    )
    yield running
    running.stop()


# ----- the well-behaved client -----

TURN = {
    "type": "input",
    "text": "A well-behaved client streams this.",
    "max_bytes": 32,
    "seed": 11,
    "temperature": 1.0,
}


def behaved_turn(url: str) -> tuple[bytes, str]:
    """One fresh binary session, one seeded turn -> (its bytes, its finish reason)."""
    with connect(url + "/v1/stream", open_timeout=20) as ws:
        ws.send(json.dumps({"type": "open", "binary": True}))
        assert json.loads(ws.recv(timeout=20))["type"] == "opened"
        ws.send(json.dumps(TURN))
        out = b""
        while True:
            frame = json.loads(ws.recv(timeout=20))
            if frame["type"] == "delta":
                out += base64.b64decode(frame["bytes"])
            elif frame["type"] == "done":
                return out, frame["reason"]
            else:
                raise AssertionError(f"well-behaved client got {frame}")


class Behaved(threading.Thread):
    def __init__(self, url: str, expected: tuple[bytes, str]) -> None:
        super().__init__(name="well-behaved", daemon=True)
        self.url, self.expected = url, expected
        self.stop = threading.Event()
        self.rounds = 0
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                got = behaved_turn(self.url)
            except Exception as e:
                self.failures.append(f"{type(e).__name__}: {e}")
                return
            if got != self.expected:
                self.failures.append(f"round {self.rounds}: {got!r} != {self.expected!r}")
            self.rounds += 1


@pytest.fixture(scope="module")
def behaved(fuzzed: Running) -> Iterator[Behaved]:
    ws_url = fuzzed.url.replace("http://", "ws://")
    expected = behaved_turn(ws_url)  # alone, before any fuzzing
    thread = Behaved(ws_url, expected)
    thread.start()
    yield thread
    thread.stop.set()
    thread.join(30)


@pytest.fixture(scope="module")
def fuzz_socket(fuzzed: Running, behaved: Behaved) -> Iterator[ClientConnection]:
    with connect(
        fuzzed.url.replace("http://", "ws://") + "/v1/stream", open_timeout=20, max_size=None
    ) as ws:
        ws.send(json.dumps({"type": "open"}))
        assert json.loads(ws.recv(timeout=20))["type"] == "opened"
        yield ws


# ----- frames -----

known_type = st.fixed_dictionaries(
    {"type": st.sampled_from(sorted(KNOWN - {"close"}))},
    optional={k: JSON_VALUES | st.integers(-3, 40) for k in CLIENT_FIELDS},
).map(json.dumps)
invalid_utf8 = st.binary(max_size=40).map(lambda b: b + b"\xff")  # 0xff is never UTF-8
frames = st.one_of(
    st.binary(max_size=300),  # sent as binary frames
    st.text(max_size=300),
    JSON_VALUES.map(json.dumps),
    known_type,
    known_type.map(str.encode),  # valid JSON in a binary frame
    st.builds(
        lambda pre, bad: b'{"type":"input","text":"' + pre.encode() + bad + b'"}',
        st.text(max_size=10),
        invalid_utf8,
    ),
    st.builds(lambda n: '{"type":"input","text":"' + "x" * n + '"}', st.integers(LIMIT, 3 * LIMIT)),
    st.builds(lambda s: json.dumps({"type": "input", "bytes": s}), st.text(max_size=20)),
)


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def surely_bad(raw: str | bytes) -> bool:
    """An oracle independent of the gateway: frames no reading of the protocol accepts."""
    if isinstance(raw, bytes):
        if not _utf8(raw):
            return True
        raw = raw.decode()
    if len(raw.encode("utf-8", "surrogatepass")) > LIMIT:
        return True
    try:
        value = json.loads(raw)
    except ValueError:
        return True
    return not isinstance(value, dict) or value.get("type") not in KNOWN


def is_close(raw: str | bytes) -> bool:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(value, dict) and value.get("type") == "close"


def answers(ws: ClientConnection) -> list[dict[str, Any]]:
    """Every frame up to the probe's error (excluded)."""
    ws.send(PROBE)
    seen = []
    while True:
        frame = json.loads(ws.recv(timeout=20))
        assert isinstance(frame, dict) and frame.get("type") in SERVER_TYPES, frame
        if frame["type"] == "error":
            assert (
                frame["code"] in CODES and isinstance(frame["message"], str) and not frame["fatal"]
            ), frame
            if frame["code"] == "unknown_type" and "__probe__" in frame["message"]:
                return seen
        seen.append(frame)


@FUZZ
@given(raw=frames)
def test_websocket_fuzz(fuzz_socket: ClientConnection, raw: str | bytes) -> None:
    assume(not is_close(raw))
    fuzz_socket.send(raw)
    errors = [f for f in answers(fuzz_socket) if f["type"] == "error"]
    if surely_bad(raw):
        assert len(errors) == 1, (raw[:200], errors)
    else:
        assert len(errors) <= 1, (raw[:200], errors)
    fuzz_socket.send(json.dumps({"type": "cancel"}))  # end any turn a valid input started


# ----- HTTP -----

ids = st.text(min_size=1, max_size=30).map(lambda s: quote(s, safe=""))
paths = st.one_of(
    st.sampled_from(
        [
            "/",
            "/healthz",
            "/readyz",
            "/metrics",
            "/openapi.json",
            "/v1/info",
            "/v1/sessions",
            "/v1/completions",
            "/v1/chat/completions",
            "/v1/stream",
            "/nowhere",
        ]
    ),
    ids.map(lambda s: f"/v1/sessions/{s}"),
    ids.map(lambda s: f"/v1/sessions/{s}/memory"),
    ids.map(lambda s: f"/v1/namespaces/{s}"),
)
openai_like = st.fixed_dictionaries(
    {},
    optional={
        "prompt": st.text(max_size=40) | st.lists(st.text(max_size=5), max_size=3) | JSON_VALUES,
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "system", "x"]) | JSON_VALUES},
                optional={"content": st.text(max_size=20) | JSON_VALUES},
            ),
            max_size=3,
        ),
        "max_tokens": st.integers(-2, 40) | JSON_VALUES,
        "temperature": st.floats(-1, 3) | JSON_VALUES,
        "top_p": st.floats(-0.5, 1.5) | JSON_VALUES,
        "top_k": st.integers(-1, 300),
        "seed": st.integers(-5, 2**70),
        "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=10) | JSON_VALUES,
        "stream": st.booleans(),
        "n": st.integers(0, 3),
        "echo": st.booleans(),
        "binary": JSON_VALUES,
        "namespace": JSON_VALUES,
        "sampling": JSON_VALUES
        | st.fixed_dictionaries(
            {}, optional={"max_bytes": st.integers(-1, 50), "stop": JSON_VALUES}
        ),
    },
)
bodies = st.one_of(
    st.binary(max_size=200),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    openai_like.map(lambda v: json.dumps(v).encode()),
    st.just(b""),
    st.builds(lambda n: b"x" * n, st.integers(LIMIT, 2 * LIMIT)),
)


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "DELETE", "PUT"]),
    path=paths,
    body=bodies,
    token=st.none() | st.text(max_size=10).map(lambda s: quote(s, safe="")),
)
def test_http_fuzz(
    fuzzed: Running, behaved: Behaved, method: str, path: str, body: bytes, token: str | None
) -> None:
    headers = {"content-type": "application/json"} | ({"x-session-token": token} if token else {})
    with (
        httpx.Client(base_url=fuzzed.url, timeout=20) as http,
        http.stream(method, path, content=body, headers=headers) as r,
    ):
        text = r.read()
        assert r.status_code < 500, (method, path, body[:200], r.status_code, text[:300])
        if r.status_code >= 400:
            assert json.loads(text)["error"]["code"], text
        if r.status_code == 201 and path == "/v1/sessions":
            made = json.loads(text)
            assert (
                http.delete(
                    f"/v1/sessions/{made['session']}", params={"token": made["token"]}
                ).status_code
                == 200
            )


def test_well_behaved_client_was_unharmed(behaved: Behaved) -> None:
    behaved.stop.set()
    behaved.join(30)
    assert not behaved.failures, behaved.failures
    assert behaved.rounds >= 3, behaved.rounds
