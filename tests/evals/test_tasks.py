"""The eval generators: deterministic per seed, exact lengths, items at the requested depth."""

from __future__ import annotations

import pytest

from model.evals.tasks import (
    FILLER,
    PASSKEY_QUESTION,
    associative_recall,
    facts,
    filler,
    parse_size,
    passkey,
)

LENGTHS = [1024, 4096, 65536]
DEPTHS = [0.0, 0.1, 0.5, 0.9, 1.0]


def test_parse_size() -> None:
    assert parse_size("4k") == 4096
    assert parse_size("1M") == 1 << 20
    assert parse_size("16m") == 16 << 20
    assert parse_size("512") == 512


def test_filler_exact_and_tiled() -> None:
    assert filler(0) == b""
    assert len(filler(10_000, 7)) == 10_000
    assert filler(len(FILLER)) == FILLER


@pytest.mark.parametrize("gen", [passkey, associative_recall, facts])
def test_deterministic_per_seed(gen) -> None:  # type: ignore[no-untyped-def]
    assert gen(4096, 0.5, 3) == gen(4096, 0.5, 3)
    assert gen(4096, 0.5, 3) != gen(4096, 0.5, 4)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("depth", DEPTHS)
def test_passkey_length_depth(length: int, depth: float) -> None:
    c = passkey(length, depth, seed=1)
    assert len(c.prompt) == length
    assert c.prompt.endswith(PASSKEY_QUESTION)
    assert len(c.answer) == 5 and c.answer.isdigit()
    (at,) = c.needle_at
    assert c.prompt[at:].startswith(b" The pass key is " + c.answer)
    assert c.prompt.count(c.answer) == 2  # in the needle only, never in the filler
    room = length - len(PASSKEY_QUESTION) - (c.prompt.index(b" is the pass key. ") + 18 - at)
    assert abs(at / room - depth) < 0.01


def test_passkey_digits() -> None:
    assert len(passkey(1024, 0.5, 0, digits=1).answer) == 1
    with pytest.raises(ValueError):
        passkey(64, 0.5, 0)  # too short for the needle and the question


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_associative_recall(length: int, depth: float) -> None:
    c = associative_recall(length, depth, seed=2, pairs=16, queries=4)
    assert len(c.prompt) == length
    assert len(c.turns) == 4 and len(c.needle_at) == 16
    for i, (query, want) in enumerate(c.turns):
        key = query.rsplit(b" ", 1)[-1].removesuffix(b"=")
        assert c.prompt.count(b" %s=%s " % (key, want)) == 1, (i, key)
    mid = (c.needle_at[0] + c.needle_at[-1]) / 2 / length
    assert abs(mid - depth / 2 - 0.25) < 0.02 + 16 * 12 / length  # the pairs take room too
    if length >= 65536:  # pairs further apart than a segment (512 bytes or less in the presets)
        gaps = [b - a for a, b in zip(c.needle_at, c.needle_at[1:], strict=False)]
        assert min(gaps) > 512


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_facts(length: int, depth: float) -> None:
    for seed in range(10):
        c = facts(length, depth, seed=seed)
        assert len(c.prompt) == length
        assert c.prompt.endswith(b" is in the ")
        assert c.prompt.count(b" went to the " + c.answer + b". ") >= 1
        items = c.needle_at[-1] - c.needle_at[0]  # later items sit after the earlier ones
        assert all(abs(at / length - depth) < 0.11 + items / length for at in c.needle_at)


def test_sixteen_megabytes_is_linear() -> None:
    import time

    t0 = time.perf_counter()
    c = passkey(16 << 20, 0.5, 0)
    assert len(c.prompt) == 16 << 20
    assert time.perf_counter() - t0 < 5
