"""Data-parallel training under torchrun: the process group, the DDP wrapper, and sharding.

distributed.py owns what several training processes must agree on: who they are (rank, world,
local rank, from the variables torchrun sets, handed in by the entry point), the device each one
uses, wrapping the training objective in DistributedDataParallel, and the few collectives the
loops need (sums of flags and losses, a barrier). It never decides what data a rank reads (the
callers shard documents: `shard` for a file, a shared durable consumer for NATS) and never
reads the environment itself.

A single process is the world of one: `Dist.single()` runs every collective as the identity, so
the loops have one code path.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int = 0  # this process among all of them
    world: int = 1  # processes training together
    local_rank: int = 0  # this process among those of its host (its GPU index)
    backend: str = ""  # "nccl" on GPUs, "gloo" on CPUs; "" for a single process

    @classmethod
    def single(cls) -> Dist:
        return cls()

    @classmethod
    def from_env(cls, env: Mapping[str, str], device: str = "auto") -> Dist:
        """The world torchrun describes in `env` (RANK, WORLD_SIZE, LOCAL_RANK); a single process
        when WORLD_SIZE is absent or 1. The backend follows the device: nccl on CUDA, else gloo."""
        world = int(env.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls.single()
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        return cls(
            rank=int(env["RANK"]),
            world=world,
            local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
            backend="nccl" if cuda else "gloo",
        )

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints and logs."""
        return self.rank == 0

    def init(self, timeout_s: float = 1800.0) -> None:
        """Join the process group (rendezvous from MASTER_ADDR/MASTER_PORT, set by torchrun)."""
        if not self.active or tdist.is_initialized():
            return
        if self.backend == "nccl":
            torch.cuda.set_device(self.local_rank)
        tdist.init_process_group(
            self.backend,
            init_method="env://",
            rank=self.rank,
            world_size=self.world,
            timeout=timedelta(seconds=timeout_s),
        )

    def close(self) -> None:
        """Leave the process group. A barrier first: no rank tears down its gloo threads while
        another still has a collective in flight with it (a rare SIGABRT at exit without it)."""
        if self.active and tdist.is_initialized():
            tdist.barrier()
            tdist.destroy_process_group()

    def device(self, name: str = "auto") -> torch.device:
        """This rank's device: its own GPU under nccl, else `name` (auto: cuda if any, else cpu)."""
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(name)

    def wrap(self, module: nn.Module) -> nn.Module:
        """DDP around `module` (its parameters broadcast from rank 0 now); itself when single.
        Unused parameters are expected: the compressor idles in one-segment steps and parts of
        the memory read idle when no slots are written yet."""
        if not self.active:
            return module
        ids = [self.local_rank] if self.backend == "nccl" else None
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the ranks (the identity for one process)."""
        if not self.active:
            return list(values)
        dev = torch.device("cuda", self.local_rank) if self.backend == "nccl" else None
        t = torch.tensor(values, dtype=torch.float64, device=dev)
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return [float(v) for v in t.tolist()]  # sync: a handful of numbers, once per decision

    def barrier(self) -> None:
        if self.active:
            self.sum([0.0])  # a barrier that works on every backend and device


def shard(items: Iterable[T], rank: int, world: int) -> Iterator[T]:
    """Every world-th item starting at rank: disjoint across ranks, together all of them."""
    if world <= 1:
        return iter(items)
    return itertools.islice(items, rank, None, world)
