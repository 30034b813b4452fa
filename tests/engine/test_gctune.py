"""tune_for_serving freezes what is alive and raises the thresholds; cycles are still collected."""

from __future__ import annotations

import subprocess
import sys


def test_tune_for_serving_in_a_fresh_process() -> None:
    code = """
import gc
from engine.gctune import GEN0_THRESHOLD, OLDER_THRESHOLDS, tune_for_serving
before = gc.get_threshold()
assert tune_for_serving() == before
assert gc.get_threshold() == (GEN0_THRESHOLD, *OLDER_THRESHOLDS)
assert gc.get_freeze_count() > 0
class Node:
    pass
a, b = Node(), Node()
a.other, b.other = b, a  # a cycle: still collected
import weakref
ref = weakref.ref(a)
del a, b
gc.collect()
assert ref() is None
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
