"""The engine tests' model: a small CPU config with every block kind (see reference.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from model import ByteLM
from tests.engine import reference
from tests.engine.reference import make_model


@pytest.fixture
def model() -> ByteLM:
    return make_model(0)


@pytest.fixture(params=[False, True], ids=["serial", "pipelined"])
def pipelined(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Run a test's engines both ways: collecting each step before planning the next, and
    planning step k+1 (speculative feeds included) before collecting step k, as on a GPU."""
    reference.PIPELINE[0] = request.param
    yield request.param
    reference.PIPELINE[0] = None
