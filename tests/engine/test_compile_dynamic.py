"""EngineConfig(compile_dynamic=True): the decode step compiles once for every batch size (not
once per bucket) and gives the eager step's bytes and logits. On the CPU (no graphs), tiny."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from engine import EngineConfig
from engine.runner import Runner
from engine.scheduler import Feed, StepPlan
from tests.engine.reference import make_model


@pytest.mark.slow
# inductor's own imports and tracing warn (torch.jit deprecations, tensor inspection)
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_one_compile_serves_every_batch_size() -> None:
    model = make_model(0)
    torch._dynamo.reset()
    counters.clear()
    runs = []
    graphs = []
    for compile in (False, True):
        runner = Runner(model, EngineConfig(max_slots=8, compile=compile, compile_dynamic=True))
        ids = []
        for step, n in enumerate((2, 5, 3, 7)):
            feeds = tuple(Feed(f"s{i}", i, bytes([65 + i]), step, True) for i in range(n))
            ids.append(runner.execute(StepPlan((), feeds, (), (), (), step))[0])
            graphs.append(counters["stats"]["unique_graphs"])
        runs.append((ids, runner.logits.clone()))
    assert runs[0][0] == runs[1][0]
    assert torch.allclose(runs[0][1], runs[1][1], atol=1e-5)
    # compiled: once the first two batch sizes ran, new sizes compile nothing more
    assert graphs[4] > 0 and graphs[5] == graphs[6] == graphs[7]
