"""The engine tests' model: a small CPU config with every block kind (see reference.py)."""

from __future__ import annotations

import pytest

from model import ByteLM
from tests.engine.reference import make_model


@pytest.fixture
def model() -> ByteLM:
    return make_model(0)
