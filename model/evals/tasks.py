"""tasks.py: seeded byte-level eval cases. A case is a prompt of an exact byte length with the
answers hidden at chosen depths in filler text; it is scored by exact match.

Each generator is a pure function of (length, depth, seed): the same arguments give the same
bytes. The prompt is built once from slices of one tiled filler (linear in the length, never
quadratic). It never imports torch or the engine.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

FILLER = (
    b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
PASSKEY_QUESTION = b"\nWhat is the pass key? The pass key is "
PEOPLE = ("Mary", "John", "Sandra", "Daniel", "Emma", "Oscar", "Lena", "Victor", "Nina", "Paul")
PLACES = ("kitchen", "garden", "office", "hallway", "bedroom", "bathroom", "cellar", "garage")
OBJECTS = ("apple", "football", "milk", "key", "book", "lamp")


@dataclass(frozen=True)
class Case:
    """One eval case: turns of (prompt, expected answer), read and answered in one session.
    Passkey and facts have one turn; associative recall asks one query per turn."""

    turns: tuple[tuple[bytes, bytes], ...]
    needle_at: tuple[int, ...]  # byte offsets of the hidden items in the first prompt
    question_at: int  # where the question starts in the first prompt (the context ends there)

    @property
    def prompt(self) -> bytes:
        return self.turns[0][0]

    @property
    def answer(self) -> bytes:
        return self.turns[0][1]


def parse_size(text: str) -> int:
    """'4k' -> 4096, '1m' -> 1048576, '512' -> 512 (binary units, case-insensitive)."""
    t = text.strip().lower().removesuffix("b")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(t[-1:], 1)
    return int(float(t[:-1] if mult > 1 else t) * mult)


def filler(n: int, offset: int = 0) -> bytes:
    """Exactly n bytes of the tiled filler, starting `offset` bytes into it."""
    offset %= len(FILLER)
    reps = (offset + n) // len(FILLER) + 1
    return (FILLER * reps)[offset : offset + n]


def compose(length: int, items: list[tuple[float, bytes]], tail: bytes, rng: random.Random) -> Case:
    """Filler of `length` bytes in all with each item at its depth (a fraction of the filler) and
    `tail` last. Items land in depth order and never overlap."""
    room = length - len(tail) - sum(len(b) for _, b in items)
    if room < 0:
        raise ValueError(f"length {length} is too short for the items and the question")
    body = filler(room, rng.randrange(len(FILLER)))
    pieces, at, cut = [], [], 0
    for depth, item in sorted(items, key=lambda x: x[0]):
        pos = min(room, max(cut, round(depth * room)))
        pieces.append(body[cut:pos])
        at.append(sum(len(p) for p in pieces))
        pieces.append(item)
        cut = pos
    pieces.append(body[cut:])
    pieces.append(tail)
    prompt = b"".join(pieces)
    assert len(prompt) == length
    return Case(((prompt, b""),), tuple(at), length - len(tail))


def _with_turns(case: Case, turns: list[tuple[bytes, bytes]]) -> Case:
    first = (case.prompt + turns[0][0], turns[0][1])
    return Case((first, *turns[1:]), case.needle_at, case.question_at)


def passkey(length: int, depth: float = 0.5, seed: int = 0, digits: int = 5) -> Case:
    """A `digits`-digit pass key hidden at `depth` of `length` bytes, then the question."""
    rng = random.Random(f"passkey/{length}/{depth}/{seed}/{digits}")
    key = str(rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits)).encode()
    needle = b" The pass key is " + key + b". Remember it. " + key + b" is the pass key. "
    case = compose(length, [(depth, needle)], PASSKEY_QUESTION, rng)
    return Case(((case.prompt, key),), case.needle_at, case.question_at)


def associative_recall(
    length: int, depth: float = 0.5, seed: int = 0, pairs: int = 16, queries: int = 4
) -> Case:
    """`pairs` key-value pairs ("k123=v456;") spread evenly through the filler around `depth`
    (from depth/2 to (1+depth)/2), so the gaps between them exceed a segment at long lengths;
    then `queries` turns, each "k123=" answered by "v456;"."""
    rng = random.Random(f"mqar/{length}/{depth}/{seed}/{pairs}")
    keys = rng.sample(range(1000), pairs)
    vals = [rng.randrange(1000) for _ in keys]
    lo, hi = depth / 2, (1 + depth) / 2
    items = [
        (lo + (hi - lo) * i / max(1, pairs - 1), b" k%03d=v%03d; " % (k, v))
        for i, (k, v) in enumerate(zip(keys, vals, strict=True))
    ]
    asked = rng.sample(range(pairs), min(queries, pairs))
    turns = [(b" k%03d=" % keys[i], b"v%03d;" % vals[i]) for i in asked]
    case = compose(length - len(turns[0][0]), items, b"\nQueries:", rng)
    return _with_turns(case, turns)


def facts(length: int, depth: float = 0.5, seed: int = 0, n_facts: int = 4) -> Case:
    """bAbI-style: people go to places (one fact each), one of them picks up an object; the
    facts are scattered around `depth`; the question needs one fact ("Where is Mary?") or two
    ("Where is the apple?": who holds it, and where they went)."""
    rng = random.Random(f"facts/{length}/{depth}/{seed}/{n_facts}")
    people = rng.sample(PEOPLE, n_facts)
    places = [rng.choice(PLACES) for _ in people]
    sents = [
        b" %s went to the %s. " % (p.encode(), q.encode())
        for p, q in zip(people, places, strict=True)
    ]
    holder, obj = rng.randrange(n_facts), rng.choice(OBJECTS)
    sents.append(b" %s picked up the %s. " % (people[holder].encode(), obj.encode()))
    rng.shuffle(sents)
    spread = [min(1.0, max(0.0, depth + rng.uniform(-0.1, 0.1))) for _ in sents]
    if rng.random() < 0.5:
        who = rng.randrange(n_facts)
        q = b"\nWhere is %s? %s is in the " % (people[who].encode(), people[who].encode())
        ans = places[who].encode()
    else:
        q = b"\nWhere is the %s? The %s is in the " % (obj.encode(), obj.encode())
        ans = places[holder].encode()
    case = compose(length, list(zip(spread, sents, strict=True)), q, rng)
    return Case(((case.prompt, ans),), case.needle_at, case.question_at)


TASKS: dict[str, Callable[..., Case]] = {
    "passkey": passkey,
    "mqar": associative_recall,
    "facts": facts,
}
