"""graphs.py: CUDA graphs for the batched decode, the one place that captures and replays them.

One graph per batch bucket (1, 2, 4, ... max_slots). Inputs live in one static (4, max) long
buffer (tokens, slots, positions, flags); a step writes its rows into a pinned host buffer
through a NumPy view, pads the bucket with the scratch slot, copies it in and replays (two calls
into torch per step, one copy and one replay: launching is on every step's critical path). There
are two pinned buffers, used by alternate launches: with two steps in flight, the rows of the
second never overwrite those the first's copy has yet to read.

The state pool is indexed by the slot tensor inside the graph, so no state is copied in
or out. The eager function stays the reference (a test holds them equal).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class DecodeGraphs:
    def __init__(
        self,
        fn: Callable[[Tensor], Tensor],
        buckets: tuple[int, ...],
        scratch: int,
        device: torch.device,
    ) -> None:
        self.fn = fn
        self.buckets = buckets
        self.scratch = scratch
        self.device = device
        self.static_in = torch.zeros(4, buckets[-1], dtype=torch.long, device=device)
        self.host_in = [
            torch.zeros(4, buckets[-1], dtype=torch.long).pin_memory() for _ in range(2)
        ]
        self._next = 0  # the buffer the next launch reads
        self.host_rows = self.host_in[0].numpy()  # where callers write the next step's rows
        self.views: dict[int, tuple[Tensor, tuple[Tensor, ...]]] = {}  # bucket -> (device, hosts)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def _pad(self, b: int) -> None:
        self.static_in[:, :b].zero_()
        self.static_in[1, :b] = self.scratch

    def capture(self, b: int) -> None:
        """Warm up on a side stream (writes go to the scratch slot), then capture bucket b."""
        self._pad(b)
        side = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self.fn(self.static_in[:, :b])
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(self.static_in[:, :b])
        self.graphs[b] = (graph, out)
        self.views[b] = (self.static_in[:, :b], tuple(h[:, :b] for h in self.host_in))

    def capture_all(self) -> None:
        for b in reversed(self.buckets):  # largest first: smaller ones reuse its pool memory
            self.capture(b)

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def launch(self, n: int) -> Tensor:
        """Replay for the n rows written into host_rows[:, :n] -> sampled ids (bucket,) on the
        device, the first n the rows' (the rest are padding)."""
        b = self.bucket(n)
        if b not in self.graphs:
            self.capture(b)
        self.host_rows[:, n:b] = 0
        self.host_rows[1, n:b] = self.scratch
        dst, srcs = self.views[b]
        dst.copy_(srcs[self._next], non_blocking=True)
        self._next ^= 1
        self.host_rows = self.host_in[self._next].numpy()
        graph, out = self.graphs[b]
        graph.replay()
        return out
