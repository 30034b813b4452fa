"""Eval cases mixed into training batches: the fraction of rows, rows kept whole, answers right
after their questions, seeds apart from the eval's, and `bwr train --mix` end to end."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.cli import main
from model.codec import decode
from model.evals.mix import TRAIN_SEED, Mixer, case_row, parse_mix_spec
from model.evals.tasks import PASSKEY_QUESTION
from model.train import file_documents, pack

TEXT = Path(__file__).parents[1] / "data" / "english.txt"
SEQ = 512


def natural(batches: int, rows: int = 8) -> list[torch.Tensor]:
    it = pack(file_documents(TEXT, 2048), rows, SEQ)
    return [next(it) for _ in range(batches)]


def test_parse_mix_fractions() -> None:
    assert parse_mix_spec("passkey=0.3, mqar=0.2,facts=0.2") == (
        {"passkey": 0.3, "mqar": 0.2, "facts": 0.2},
        {},
    )
    assert parse_mix_spec("") == ({}, {})
    for bad in ("nope=0.1", "passkey", "passkey=2", "passkey=0.6,mqar=0.6"):
        with pytest.raises(ValueError):
            parse_mix_spec(bad)


def kind(row: bytes) -> str:
    if PASSKEY_QUESTION in row:
        return "passkey"
    if b"\nQueries:" in row:
        return "mqar"
    assert b"\nWhere is " in row, row[-80:]
    return "facts"


def test_mixed_rows_fraction_and_answers_after_questions() -> None:
    mix = {"passkey": 0.3, "mqar": 0.2, "facts": 0.2}
    mixer = Mixer(mix, seed=0)
    before = natural(50)
    after = [mixer(b) for b in before]
    replaced: dict[str, int] = dict.fromkeys(mix, 0)
    for b, a in zip(before, after, strict=True):
        assert a.shape == b.shape == (8, SEQ + 1)
        for old, new in zip(b, a, strict=True):
            if torch.equal(old, new):
                continue  # kept whole
            row = decode(new)
            assert len(row) == SEQ + 1
            task = kind(row)
            replaced[task] += 1
            if task == "passkey":  # the question, then the key the context hid
                key = row.rsplit(PASSKEY_QUESTION, 1)[1]
                assert re.fullmatch(rb"\d{5}", key) and b"The pass key is " + key in row
            elif task == "mqar":  # every query is followed by the value the context paired
                tail = row.split(b"\nQueries:", 1)[1]
                asked = re.findall(rb" (k\d{3})=(v\d{3});", tail)
                assert len(asked) == 4 and tail.endswith(b";")
                for k, v in asked:
                    assert b" %s=%s; " % (k, v) in row.split(b"\nQueries:", 1)[0]
            else:  # the place answering the question ends the row
                question = row.rsplit(b"\nWhere is ", 1)[1]
                assert re.fullmatch(rb"[^?]+\? .+ is in the [a-z]+", question), question
    rows = 50 * 8
    assert mixer.rows == rows and mixer.replaced == replaced
    for task, frac in mix.items():
        assert abs(replaced[task] / rows - frac) < 0.07, (task, replaced)
    assert mixer.next_seed - TRAIN_SEED == sum(replaced.values())  # seeds far above eval seeds
    again = Mixer(mix, seed=0)
    assert all(torch.equal(again(b), a) for b, a in zip(before, after, strict=True))
    assert not all(
        torch.equal(Mixer(mix, seed=1)(b), a) for b, a in zip(before, after, strict=True)
    )


def test_case_row_is_exactly_the_length_and_too_short_raises() -> None:
    assert len(case_row("mqar", 1000, 0.5, TRAIN_SEED)) == 1000
    with pytest.raises(ValueError):
        case_row("mqar", 200, 0.5, TRAIN_SEED)


def test_rows_too_short_for_a_task_stay_text() -> None:
    """At 257 bytes a pass key fits and MQAR's pairs do not: MQAR rows stay text and are counted,
    pass-key rows are mixed in, and nothing raises (a curriculum starts with such rows)."""
    batch = next(pack(file_documents(TEXT, 2048), 64, 256))
    mixer = Mixer({"passkey": 0.4, "mqar": 0.4}, seed=3)
    out = mixer(batch)
    changed = [i for i in range(64) if not torch.equal(out[i], batch[i])]
    assert mixer.too_short["mqar"] > 0 and mixer.too_short["passkey"] == 0
    assert len(changed) == mixer.replaced["passkey"] > 0 and mixer.replaced["mqar"] == 0
    assert all(PASSKEY_QUESTION in bytes(out[i].tolist()) for i in changed)
    assert mixer.rows == 64


def test_train_with_mix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ckpt"
    args = ["train", "--text", str(TEXT), "--config", "tiny", "--steps", "2", "--batch-size", "4"]
    args += ["--seq-len", "512", "--device", "cpu", "--mix", "passkey=0.5", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "mixed in {'passkey': " in printed and "of 8 rows" in printed
    assert (out / "config.json").is_file()
    assert main([*args[:-4], "--mix", "passkey=0.9,facts=0.9", "--out", str(out)]) == 2


@pytest.mark.parametrize("case_len", [0, 256, 300])
def test_answer_mask_marks_exactly_the_answers(case_len: int) -> None:
    """The mask covers each generated answer, right after its question, and nothing else; with
    case_len a mixed row holds len // case_len cases (filler leads the rest)."""
    batch = natural(4)[0]
    mixer = Mixer({"passkey": 0.5, "mqar": 0.3}, seed=2, case_len=case_len)
    out, answers = mixer.mix_batch(batch)
    assert answers.shape == out.shape and answers.dtype == torch.bool
    per_row = (SEQ + 1) // case_len if case_len else 1
    for new, old, mask in zip(out, batch, answers, strict=True):
        row = decode(new)
        if torch.equal(new, old):
            assert not mask.any()
            continue
        spans, start = [], None
        for i, m in enumerate([*mask.tolist(), False]):
            if m and start is None:
                start = i
            elif not m and start is not None:
                spans.append((start, i))
                start = None
        if PASSKEY_QUESTION in row:
            assert len(spans) == per_row == row.count(PASSKEY_QUESTION)
            for a, b in spans:
                assert row[a - len(PASSKEY_QUESTION) : a] == PASSKEY_QUESTION
                assert re.fullmatch(rb"\d{5}", row[a:b]) and b"The pass key is " + row[a:b] in row
        else:
            assert len(spans) == 4 * per_row  # four queries a case, each answered "v123;"
            for a, b in spans:
                assert re.fullmatch(rb"v\d{3};", row[a:b]) and re.fullmatch(
                    rb" k\d{3}=", row[a - 6 : a]
                )
    assert torch.equal(Mixer({"passkey": 0.5, "mqar": 0.3}, 2, case_len)(batch), out)


def test_train_with_answer_weight_and_case_len(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ckpt"
    args = ["train", "--text", str(TEXT), "--config", "tiny", "--steps", "2", "--batch-size", "4"]
    args += ["--seq-len", "512", "--device", "cpu", "--mix", "passkey=1", "--out", str(out)]
    assert main([*args, "--answer-weight", "20", "--case-len", "256"]) == 0
    assert "mixed in {'passkey': 8} of 8 rows" in capsys.readouterr().out


def test_parse_mix_spec_options() -> None:
    mix, options = parse_mix_spec("passkey=0.2:digits=3, mqar=0.8:pairs=2-8:queries=2")
    assert mix == {"passkey": 0.2, "mqar": 0.8} == parse_mix_spec("passkey=0.2,mqar=0.8:pairs=4")[0]
    assert options == {"passkey": {"digits": (3, 3)}, "mqar": {"pairs": (2, 8), "queries": (2, 2)}}
    assert parse_mix_spec("mqar=1") == ({"mqar": 1.0}, {})
    for bad in (
        "mqar=1:depth=2",  # the mixer draws depths and seeds
        "mqar=1:digits=3",  # not an MQAR keyword
        "mqar=1:pairs",
        "mqar=1:pairs=x",
        "mqar=1:pairs=0",
        "mqar=1:pairs=8-2",
        "mqar=1:pairs=2-x",
    ):
        with pytest.raises(ValueError):
            parse_mix_spec(bad)


@settings(max_examples=25, deadline=None)
@given(lo=st.integers(1, 6), extra=st.integers(0, 4), queries=st.integers(1, 4))
def test_mixer_draws_mqar_pairs_from_the_range(lo: int, extra: int, queries: int) -> None:
    """Rows of 224 bytes cannot hold MQAR at its 16 default pairs; with pairs=LO-HI they hold
    cases of LO to HI pairs, each asked min(queries, pairs) times, with their answer spans."""
    hi = lo + extra
    batch = next(pack(file_documents(TEXT, 2048), 16, 224))
    mixer = Mixer(
        {"mqar": 1.0}, seed=lo, options={"mqar": {"pairs": (lo, hi), "queries": (queries, queries)}}
    )
    out, answers = mixer.mix_batch(batch)
    assert mixer.replaced == {"mqar": 16} and mixer.too_short == {"mqar": 0}
    for row, mask in zip(out, answers, strict=True):
        context, tail = decode(row).split(b"\nQueries:", 1)
        pairs = dict(re.findall(rb" (k\d{3})=(v\d{3}); ", context))
        asked = re.findall(rb" (k\d{3})=(v\d{3});", tail)
        assert lo <= len(pairs) <= hi and len(asked) == min(queries, len(pairs))
        assert all(pairs[k] == v for k, v in asked)
        assert int(mask.sum()) == 5 * len(asked)
    assert not Mixer({"mqar": 1.0}, seed=lo).mix_batch(batch)[1].any()  # 16 pairs: too short


def test_train_with_mix_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ckpt"
    args = ["train", "--text", str(TEXT), "--config", "tiny", "--steps", "2", "--batch-size", "4"]
    args += ["--seq-len", "224", "--device", "cpu", "--out", str(out)]
    assert main([*args, "--mix", "mqar=1:pairs=2-4:queries=2"]) == 0
    printed = capsys.readouterr().out
    assert "mixed in {'mqar': 8} of 8 rows" in printed and "too short" not in printed
    assert main([*args, "--mix", "mqar=1:keys=4"]) == 2
