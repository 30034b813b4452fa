"""The protocol module alone: every bad frame maps to one precise code, nothing else escapes."""

from __future__ import annotations

import base64
import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import SamplingParams
from gateway.protocol import (
    CLIENT_FIELDS,
    Cancel,
    DeltaFrame,
    DoneFrame,
    ErrorCode,
    Input,
    Open,
    Opened,
    ProtocolError,
    Sampling,
    UsageFrame,
    decode_client,
    decode_create,
    encode_text,
    to_params,
)
from tests.gateway.strategies import JSON_VALUES

LIMIT = 4096


def code_of(raw: str | bytes) -> ErrorCode:
    with pytest.raises(ProtocolError) as info:
        decode_client(raw, LIMIT)
    return info.value.code


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("nope", ErrorCode.BAD_JSON),
        ("{", ErrorCode.BAD_JSON),
        (b"\xff\xfe{}", ErrorCode.INVALID_UTF8),
        (b'{"type":"cancel","x":"\xc3"}', ErrorCode.INVALID_UTF8),  # invalid even where unread
        ('{"type":"input","text":"\\ud800"}', ErrorCode.INVALID_UTF8),
        ("[1, 2]", ErrorCode.INVALID_FRAME),
        ('"input"', ErrorCode.INVALID_FRAME),
        ('{"text":"hi"}', ErrorCode.INVALID_FRAME),
        ('{"type":"launch"}', ErrorCode.UNKNOWN_TYPE),
        ('{"type":7}', ErrorCode.UNKNOWN_TYPE),
        ('{"type":"input","max_bytes":"many"}', ErrorCode.INVALID_FRAME),
        ('{"type":"input","max_bytes":-1}', ErrorCode.INVALID_FRAME),
        ('{"type":"input","top_p":0}', ErrorCode.INVALID_FRAME),
        ('{"type":"input","seed":1e30}', ErrorCode.INVALID_FRAME),
        ('{"type":"input","text":"a","bytes":"YQ=="}', ErrorCode.INVALID_FRAME),
        ('{"type":"input","stop":[""]}', ErrorCode.INVALID_FRAME),
        ('{"type":"input","bytes":"***"}', ErrorCode.INVALID_BASE64),
        ('{"type":"open","namespace":"a b"}', ErrorCode.INVALID_FRAME),
        ('{"type":"auth","api_key":5}', ErrorCode.INVALID_FRAME),
        ("x" * (LIMIT + 1), ErrorCode.FRAME_TOO_LARGE),
        (b"y" * (LIMIT + 1), ErrorCode.FRAME_TOO_LARGE),
    ],
)
def test_bad_frames_get_precise_codes(raw: str | bytes, code: ErrorCode) -> None:
    assert code_of(raw) is code


def test_good_frames_decode() -> None:
    frame = decode_client(
        '{"type":"input","text":"héllo","max_bytes":3,"stop":["\\n"],"future":1}', LIMIT
    )
    assert isinstance(frame, Input) and frame.payload() == "héllo".encode() and frame.max_bytes == 3
    binary = decode_client(
        json.dumps({"type": "input", "bytes": base64.b64encode(b"\x00\xff").decode()}).encode(),
        LIMIT,
    )
    assert isinstance(binary, Input) and binary.payload() == b"\x00\xff"
    assert isinstance(decode_client(b'{"type":"cancel"}', LIMIT), Cancel)
    opened = decode_client(
        '{"type":"open","session":"abc","token":"t","sampling":{"temperature":0}}', LIMIT
    )
    assert isinstance(opened, Open) and opened.sampling == Sampling(temperature=0.0)


def test_server_frames_encode() -> None:
    assert json.loads(encode_text(DeltaFrame(text="hi"))) == {"type": "delta", "text": "hi"}
    assert json.loads(encode_text(DeltaFrame(data=b"\x00"))) == {"type": "delta", "bytes": "AA=="}
    done = json.loads(encode_text(DoneFrame("length", UsageFrame(1, 2, 3))))
    assert done == {
        "type": "done",
        "reason": "length",
        "usage": {"input_bytes": 1, "output_bytes": 2, "context_bytes": 3},
    }
    assert json.loads(encode_text(Opened("s", "t")))["type"] == "opened"


def test_sampling_merges_turn_over_session_over_gateway() -> None:
    kw = dict(
        max_bytes=256,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_output=1000,
        max_stop=2,
        max_stop_bytes=4,
    )
    p = to_params(Sampling(max_bytes=5), Sampling(max_bytes=9, temperature=0.0, stop=["\n"]), **kw)  # type: ignore[arg-type]
    assert p == SamplingParams(max_bytes=5, temperature=0.0, stop=(b"\n",))
    assert to_params(Sampling(), None, **kw).max_bytes == 256  # type: ignore[arg-type]
    eos = Sampling(ignore_eos=True)
    assert to_params(Sampling(), eos, **kw).ignore_eos  # type: ignore[arg-type]
    assert not to_params(Sampling(ignore_eos=False), eos, **kw).ignore_eos  # type: ignore[arg-type]
    assert not to_params(Sampling(), None, **kw).ignore_eos  # type: ignore[arg-type]
    for bad in (
        Sampling(max_bytes=1001),
        Sampling(stop=["a", "b", "c"]),
        Sampling(stop=["toolong"]),
    ):
        with pytest.raises(ProtocolError) as info:
            to_params(bad, None, **kw)  # type: ignore[arg-type]
        assert info.value.code is ErrorCode.INVALID_FRAME


def test_create_body() -> None:
    assert decode_create(b"") == decode_create(b"  ") == decode_create(b"{}")
    assert decode_create(b'{"binary":true,"namespace":"docs"}').binary
    for body, code in (
        (b"{", ErrorCode.BAD_JSON),
        (b'{"binary":3}', ErrorCode.INVALID_FRAME),
        (b'{"namespace":"../x"}', ErrorCode.INVALID_FRAME),
    ):
        with pytest.raises(ProtocolError) as info:
            decode_create(body)
        assert info.value.code is code


frame_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["auth", "open", "input", "cancel", "close", "nope"])},
    optional={k: JSON_VALUES for k in CLIENT_FIELDS},
)


@settings(max_examples=300, deadline=None)
@given(
    raw=st.binary(max_size=200)
    | st.text(max_size=200)
    | JSON_VALUES.map(json.dumps)
    | frame_like.map(json.dumps)
)
def test_decoder_never_raises_anything_else(raw: str | bytes) -> None:
    try:
        frame = decode_client(raw, LIMIT)
    except ProtocolError as e:
        assert e.code in ErrorCode and e.message
    else:
        msgspec.json.encode(frame)  # a decoded frame is a well-formed Struct
