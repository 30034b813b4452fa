"""The byte codec: every byte string round-trips exactly, specials carry no byte."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from model.codec import BOS, EOS, PAD, SEP, SPECIALS, decode, encode

specials = st.sampled_from(sorted(SPECIALS.values()))


@given(st.binary(max_size=512))
def test_any_bytes_round_trip(data: bytes) -> None:
    ids = encode(data)
    assert ids.dtype == torch.long and ids.shape == (len(data),)
    assert ids.tolist() == list(data)
    assert decode(ids) == data
    assert decode(ids.tolist()) == data


def test_invalid_utf8_passes_through() -> None:
    data = b"\xff\xfe caf\xc3 \xe2\x82 \x80\xc0\xaf"
    with pytest.raises(UnicodeDecodeError):
        data.decode("utf-8")
    assert decode(encode(data)) == data


@given(st.text(max_size=200))
def test_text_encodes_as_utf8(text: str) -> None:
    assert decode(encode(text)) == text.encode("utf-8")


@given(st.binary(max_size=64))
def test_bos_prefix(data: bytes) -> None:
    ids = encode(data, bos=True)
    assert ids[0].item() == BOS
    assert decode(ids) == data


@given(st.lists(st.one_of(st.integers(0, 255), specials), max_size=256))
def test_specials_dropped(ids: list[int]) -> None:
    expected = bytes(i for i in ids if i < 256)
    assert decode(ids) == expected
    assert decode(torch.tensor(ids, dtype=torch.long)) == expected


def test_specials_are_the_four_ids_above_the_bytes() -> None:
    assert sorted(SPECIALS.values()) == [BOS, EOS, PAD, SEP] == [256, 257, 258, 259]
    assert decode([BOS, EOS, PAD, SEP]) == b""


@given(
    st.lists(st.integers(0, 259), max_size=32),
    st.one_of(st.integers(max_value=-1), st.integers(min_value=260)),
    st.data(),
)
def test_out_of_range_raises(ids: list[int], bad: int, data: st.DataObject) -> None:
    at = data.draw(st.integers(0, len(ids)))
    ids = [*ids[:at], bad, *ids[at:]]
    with pytest.raises(ValueError, match=f"id {bad} outside the vocabulary"):
        decode(ids)
    if -(2**63) <= bad < 2**63:  # representable as a long tensor
        with pytest.raises(ValueError, match="outside the vocabulary"):
            decode(torch.tensor(ids, dtype=torch.long))
