"""The `bwr` command line: the one entry point that reads argv and the environment.

Subcommands: model info, train, bench, up, chat, ingest, worker, eval (those whose package has
not landed yet say so and exit non-zero).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]


def _model_info(args: argparse.Namespace) -> int:
    from model import ByteLM, ModelConfig
    from model.checkpoint import read_config

    names = args.names or ["tiny", "small", "base"]
    print(f"{'model':<10} {'params':>12} {'width':>6} {'layout':<16} {'state/session':>14}")
    for name in names:
        cfg = read_config(name)[0] if "/" in name else ModelConfig.named(name)
        import torch

        with torch.device("meta"):
            m = ByteLM(cfg)
        print(f"{name:<10} {m.num_parameters():>12,} {cfg.d_model:>6} {cfg.layout:<16} {m.state_bytes_per_row():>12,} B")
    return 0


def _train(args: argparse.Namespace) -> int:
    import torch

    from model import ByteLM, ModelConfig
    from model.train import TrainConfig, file_documents, pack, train

    if args.text is None:
        print("bwr train: --text FILE is required (the NATS consumer comes with --nats-url)", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    device = _pick_device(args.device)
    if args.resume:
        model = ByteLM.load(args.resume, device)
    else:
        model = ByteLM(ModelConfig.named(args.config)).to(device)
    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
        segments=args.segments, seed=args.seed, grad_accum=args.grad_accum,
        time_budget_s=60 * args.minutes,
    )
    docs = file_documents(args.text, doc_bytes=max(args.seq_len * 4, 1024), seed=args.seed)

    def log(e: object) -> None:
        print(f"step {e.step:>6}  loss {e.loss:.4f}  lr {e.lr:.2e}  {e.bytes_per_s:,.0f} B/s", flush=True)  # type: ignore[attr-defined]

    train(model, pack(docs, cfg.batch_size, cfg.seq_len), cfg, on_log=log)
    model.save(args.out, dtype=torch.bfloat16 if args.save_dtype == "bfloat16" else torch.float32)
    print(f"saved {args.out}")
    return 0


def _pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bwr", description="BWR-DNC streaming inference engine")
    sub = p.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="inspect model configs")
    msub = model.add_subparsers(dest="model_command", required=True)
    info = msub.add_parser("info", help="parameter counts of named configs or checkpoints")
    info.add_argument("names", nargs="*", help="tiny, small, base, or a checkpoint directory")
    info.set_defaults(func=_model_info)

    tr = sub.add_parser("train", help="train from a local text file")
    tr.add_argument("--text", help="UTF-8 (or any) text file to learn from")
    tr.add_argument("--config", default="tiny", help="named config to start from")
    tr.add_argument("--resume", help="checkpoint directory to continue from")
    tr.add_argument("--steps", type=int, default=300)
    tr.add_argument("--batch-size", type=int, default=16)
    tr.add_argument("--seq-len", type=int, default=256)
    tr.add_argument("--segments", type=int, default=1, help="train through memory over this many segments")
    tr.add_argument("--grad-accum", type=int, default=1)
    tr.add_argument("--lr", type=float, default=3e-3)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default="auto")
    tr.add_argument("--minutes", type=float, default=0.0, help="time budget (0: run all steps)")
    tr.add_argument("--save-dtype", choices=["float32", "bfloat16"], default="float32")
    tr.add_argument("--out", required=True, help="checkpoint directory to write")
    tr.set_defaults(func=_train)

    bench = sub.add_parser("bench", help="benchmarks (print a table, write JSON)")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    be = bsub.add_parser("engine", help="engine throughput and latency")
    from benchmarks.engine_bench import add_arguments

    add_arguments(be)
    be.set_defaults(func=_bench_engine)
    return p


def _bench_engine(args: argparse.Namespace) -> int:
    from benchmarks.engine_bench import run

    return run(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Handler = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
