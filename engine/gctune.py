"""gctune.py: the garbage collector tuned for a serving process.

A step at a thousand sessions allocates a few objects per session (feeds, emitted bytes, events),
so CPython's generation-0 collector runs several times per step, and each pass walks every young
object the live sessions hold: measured, that was 40% of the engine's host time per step at 1,024
sessions (benchmarks/host_bench.py). A server calls `tune_for_serving()` once, after loading its
model: what is alive then (modules, weights, the engine) moves to the permanent generation and is
never walked again, and generation 0 waits for more allocations before it collects. Cycles are
still collected, later: the price is memory held between collections (measured with the same
bench at 1,024 sessions: peak RSS 424 MiB against 360 with CPython's defaults, a fixed step, not
growth). `bwr up --no-gc-tuning` keeps the defaults. A library never calls this on its own: it
changes the whole process.
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 50_000  # allocations between young collections (CPython's default is 700)
OLDER_THRESHOLDS = (20, 20)  # young collections per gen-1 pass, gen-1 passes per full pass


def tune_for_serving() -> tuple[int, int, int]:
    """Freeze what is alive now and raise the collection thresholds; -> the old thresholds."""
    old = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, *OLDER_THRESHOLDS)
    return old
