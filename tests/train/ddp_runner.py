"""Run by test_ddp.py under `torchrun --nproc_per_node 2` (gloo, CPU): the file-based training
path with DDP, as `bwr train --text` runs it. Each rank starts from different random weights
(DDP must broadcast rank 0's), reads every world-th document, and writes what it saw, its losses
and its final weights into the directory given."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from model import ByteLM
from model.distributed import Dist, shard
from model.train import TrainConfig, file_documents, pack, train
from tests.ingest.conftest import MICRO
from tests.train.conftest import TEXT


def main(out: Path) -> None:
    dist = Dist.from_env(os.environ, "cpu")
    dist.init()
    torch.set_num_threads(1)
    torch.manual_seed(100 + dist.rank)
    model = ByteLM(MICRO)
    save_file(dict(model.state_dict()), str(out / f"init{dist.rank}.safetensors"))
    seen: list[str] = []

    def recorded(docs: Iterable[bytes]) -> Iterator[bytes]:
        for d in docs:
            seen.append(hashlib.sha256(d).hexdigest())
            yield d

    docs = recorded(shard(file_documents(TEXT, doc_bytes=300, seed=0), dist.rank, dist.world))
    cfg = TrainConfig(
        steps=6, batch_size=2, seq_len=64, segments=2, warmup=1, grad_accum=2, log_every=1
    )
    logs = train(model, pack(docs, cfg.batch_size, cfg.seq_len), cfg, dist=dist)
    save_file(dict(model.state_dict()), str(out / f"final{dist.rank}.safetensors"))
    (out / f"rank{dist.rank}.json").write_text(
        json.dumps({"seen": seen, "losses": [e.loss for e in logs], "world": dist.world})
    )
    dist.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    # Every result is written and the group left. Skip the interpreter's teardown: the gloo
    # backend's threads can abort it ("terminate called without an active exception", SIGABRT,
    # seen once in a CI run), which would fail a run whose work is all done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
