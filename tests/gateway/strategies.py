"""Hypothesis strategies shared by the protocol and fuzz tests."""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy


def _nested(inner: SearchStrategy[object]) -> SearchStrategy[object]:
    # a named function, not a lambda: hypothesis checks by reading its source that it recurses
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)


# Any JSON value: scalars, and lists and objects of them a few levels deep.
JSON_VALUES: SearchStrategy[object] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=24),
    _nested,
    max_leaves=16,
)
