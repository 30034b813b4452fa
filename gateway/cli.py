"""The `bwr` command line: the one entry point that reads argv and the environment.

Subcommands: model info, train, bench (engine, gateway), up, chat; ingest, worker and eval come
with their packages.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.train import TrainConfig

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
        params, state = m.num_parameters(), m.state_bytes_per_row()
        print(f"{name:<10} {params:>12,} {cfg.d_model:>6} {cfg.layout:<16} {state:>12,} B")
    return 0


def text_train_config(args: argparse.Namespace) -> TrainConfig:
    """`bwr train --text`'s TrainConfig: every trainer flag the DOCS consumer reads (curriculum,
    compilation, checkpointing, warmup, ...) means the same here; --minutes is the time budget.
    The curriculum's stages are fractions of --steps (a budget that ends the run sooner cuts the
    later stages short)."""
    from dataclasses import replace

    from memory.train_cli import configs

    return replace(
        configs(args)[0], time_budget_s=60 * args.minutes, answer_weight=args.answer_weight
    )


def _train(args: argparse.Namespace) -> int:
    import torch

    from model import ByteLM, ModelConfig
    from model.evals.mix import Mixer, parse_mix_spec
    from model.train import Batch, StepLog, curriculum_batches, file_documents, train

    if getattr(args, "nats_url", None):
        from memory.train_cli import run_train_nats

        return run_train_nats(args)  # the DOCS stream consumer (durable `trainer`)
    if args.text is None or args.out is None:
        print("bwr train: give --text FILE --out DIR, or --nats-url URL", file=sys.stderr)
        return 2
    try:
        mix, options = parse_mix_spec(args.mix)
    except ValueError as e:
        print(f"bwr train: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = _pick_device(args.device)
    if args.resume:
        model = ByteLM.load(args.resume, device)
    else:
        model = ByteLM(ModelConfig.named(args.config)).to(device)
    cfg = text_train_config(args)
    longest = max([cfg.seq_len] + [n for _, n, _ in cfg.curriculum])
    docs = file_documents(args.text, doc_bytes=max(longest * 4, 1024), seed=args.seed)

    def log(e: StepLog) -> None:
        print(
            f"step {e.step:>6}  loss {e.loss:.4f}  lr {e.lr:.2e}  {e.bytes_per_s:,.0f} B/s",
            flush=True,
        )

    plain = curriculum_batches(docs, cfg)
    mixer = Mixer(mix, seed=args.seed, case_len=args.case_len, options=options)
    # answer masks only where they change the loss (weight 1: the plain mean)
    batches: Iterator[Batch] = (
        mixer.batches(plain, answers=cfg.answer_weight != 1) if mix else plain
    )
    train(model, batches, cfg, on_log=log)
    if mix:
        print(f"mixed in {mixer.replaced} of {mixer.rows} rows", flush=True)
        if any(mixer.too_short.values()):
            short = {k: v for k, v in mixer.too_short.items() if v}
            print(f"left as text, too short for a case: {short} rows", flush=True)
    model.save(args.out, dtype=torch.bfloat16 if args.save_dtype == "bfloat16" else torch.float32)
    print(f"saved {args.out}")
    return 0


def _worker(args: argparse.Namespace) -> int:
    import logging

    from memory.config import MemoryConfig, parse_levels
    from memory.service import run_worker_process

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from model import ModelConfig
    from model.config import PRESETS

    try:
        config = MemoryConfig.hierarchy(parse_levels(args.memory_levels), args.merge_group)
    except ValueError as e:
        print(f"bwr worker: {e}", file=sys.stderr)
        return 2
    model = ModelConfig.named(args.model) if args.model in PRESETS else args.model
    run_worker_process(
        args.nats_url,
        model,
        config=config,
        workers=args.workers,
        device=_pick_device(args.device),
        data_dir=args.data_dir,
    )
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
    tr.add_argument(
        "--segments", type=int, default=1, help="train through memory over this many segments"
    )
    tr.add_argument("--grad-accum", type=int, default=1)
    tr.add_argument("--lr", type=float, default=3e-3)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default="auto")
    tr.add_argument("--minutes", type=float, default=0.0, help="time budget (0: run all steps)")
    tr.add_argument("--save-dtype", choices=["float32", "bfloat16"], default="float32")
    tr.add_argument("--out", default=None, help="checkpoint directory to write (with --text)")
    tr.add_argument(
        "--mix",
        default="",
        help="eval cases replacing this fraction of --text rows: passkey=0.3,mqar=0.2,facts=0.2;"
        " a task's generator options follow it, a range drawn per case: mqar=1:pairs=2-8:queries=2",
    )
    tr.add_argument(
        "--answer-weight",
        type=float,
        default=1.0,
        help="loss weight of the answer bytes of --mix cases (1: every byte alike)",
    )
    tr.add_argument(
        "--case-len",
        type=int,
        default=0,
        help="--mix rows hold as many cases of this many bytes as fit (0: one case a row)",
    )
    tr.add_argument("--nats-url", default=None, help="train from the DOCS stream instead of a file")
    from memory.train_cli import add_train_nats_arguments

    add_train_nats_arguments(tr)
    tr.set_defaults(func=_train)

    ing = sub.add_parser("ingest", help="publish documents to a namespace over NATS")
    from memory.ingest import add_ingest_arguments, run_ingest

    add_ingest_arguments(ing)
    ing.set_defaults(func=run_ingest)

    from memory.config import add_hierarchy_arguments

    wk = sub.add_parser("worker", help="memory consolidation workers (scale-out process)")
    wk.add_argument("--nats-url", required=True)
    wk.add_argument("--model", default="tiny", help="checkpoint directory, or a named config")
    wk.add_argument("--workers", type=int, default=2)
    wk.add_argument("--device", default="cpu")
    wk.add_argument(
        "--data-dir", default=".data/worker", help="where checkpoints of model.updated land"
    )
    add_hierarchy_arguments(wk)
    wk.set_defaults(func=_worker)

    bench = sub.add_parser("bench", help="benchmarks (print a table, write JSON)")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    be = bsub.add_parser("engine", help="engine throughput and latency")
    from benchmarks.engine_bench import add_arguments

    add_arguments(be)
    be.set_defaults(func=_bench_engine)
    bg = bsub.add_parser("gateway", help="bytes/s delivered to WebSocket clients vs the raw engine")
    from benchmarks.gateway_bench import add_arguments as add_gateway_arguments

    add_gateway_arguments(bg)
    bg.set_defaults(func=_bench_gateway)

    upp = sub.add_parser("up", help="start the stack: embedded NATS, the engine, the gateway")
    upp.add_argument(
        "--host", default="127.0.0.1", help="address to bind (non-loopback needs --api-key)"
    )
    upp.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    upp.add_argument(
        "--nats-url", default=None, help="use this NATS server instead of starting one"
    )
    upp.add_argument(
        "--model", default=None, help="tiny, small, base (random weights) or a checkpoint directory"
    )
    upp.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    upp.add_argument(
        "--data-dir", default=".data", help="local state (the embedded nats-server's store)"
    )
    upp.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="bearer key clients must send (repeatable; env BWR_API_KEY, comma-separated)",
    )
    upp.add_argument("--max-sessions", type=int, default=64, help="live sessions at once")
    upp.add_argument(
        "--max-sessions-per-key",
        type=int,
        default=None,
        help="live sessions per API key or client address",
    )
    upp.add_argument(
        "--detach-timeout",
        type=float,
        default=300.0,
        help="seconds a disconnected session stays resumable",
    )
    upp.add_argument(
        "--drain", type=float, default=10.0, help="seconds running turns get to finish on SIGTERM"
    )
    upp.add_argument("--no-uvloop", action="store_true", help="run on the stdlib asyncio loop")
    upp.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="output bytes per consumer wake-up (first byte and turn end at once); more eases the"
        " host at hundreds of sessions",
    )
    upp.add_argument(
        "--compile", action="store_true", help="torch.compile the decode step (GPU: then graphs)"
    )
    upp.add_argument(
        "--compile-dynamic",
        action="store_true",
        help="with --compile: one compile for every batch bucket (a start of about a minute at"
        " 1,024 slots instead of several; decode 1.3-1.4x slower at large batches)",
    )
    upp.add_argument(
        "--decode-dtype", choices=["float32", "bfloat16"], default="float32", help="GPU decode"
    )
    upp.add_argument(
        "--no-gc-tuning",
        action="store_true",
        help="keep CPython's collector defaults (less memory held, more host time per step)",
    )
    upp.add_argument(
        "--no-memory",
        action="store_true",
        help="no memory consolidation, snapshots or resume after a restart (they need NATS)",
    )
    upp.add_argument(
        "--memory-workers",
        type=int,
        default=None,
        help="consolidation workers in this process (default 2, or 0 with --worker-processes)",
    )
    add_hierarchy_arguments(upp)
    upp.add_argument(
        "--worker-processes",
        type=int,
        default=0,
        help="consolidation in N `bwr worker` processes started and stopped with the gateway:"
        " compression never shares the engine's interpreter lock",
    )
    upp.add_argument(
        "--train", action="store_true", help="train on ingested documents beside the engine"
    )
    upp.add_argument(
        "--train-every", type=int, default=50, help="trainer steps between checkpoints"
    )
    upp.add_argument(
        "--train-arg", action="append", default=[], help="extra `bwr train` flag (repeatable)"
    )
    upp.set_defaults(func=_up)

    ev = sub.add_parser("eval", help="long-context evals through the engine (table and JSON)")
    from model.evals.args import add_arguments as add_eval_arguments

    add_eval_arguments(ev)
    ev.set_defaults(func=_eval)

    ch = sub.add_parser("chat", help="stream a session in the terminal")
    ch.add_argument(
        "--url",
        default="ws://127.0.0.1:8000",
        help="gateway URL (ws://, http://, or a full stream URL)",
    )
    ch.add_argument("--api-key", default=None, help="bearer key (env BWR_API_KEY)")
    ch.add_argument("--max-bytes", type=int, default=256, help="bytes generated per turn")
    ch.add_argument("--temperature", type=float, default=0.8)
    ch.add_argument(
        "--raw", action="store_true", help="send lines as they are (no User:/Assistant: transcript)"
    )
    ch.set_defaults(func=_chat)
    return p


def _api_keys(flag: list[str] | None) -> tuple[str, ...]:
    """--api-key (repeatable) wins over BWR_API_KEY (comma-separated); empty entries dropped."""
    if flag:
        return tuple(k for k in flag if k)
    return tuple(k.strip() for k in os.environ.get("BWR_API_KEY", "").split(",") if k.strip())


def _up(args: argparse.Namespace) -> int:
    from gateway.config import GatewayConfig
    from gateway.serve import up
    from memory.config import parse_levels

    try:
        cfg = GatewayConfig(
            host=args.host,
            port=args.port,
            api_keys=_api_keys(args.api_key),
            nats_url=args.nats_url,
            data_dir=args.data_dir,
            max_sessions=args.max_sessions,
            max_sessions_per_key=args.max_sessions_per_key or args.max_sessions,
            detach_timeout_s=args.detach_timeout,
            drain_s=args.drain,
            memory=not args.no_memory,
            memory_workers=(
                args.memory_workers
                if args.memory_workers is not None
                else (0 if args.worker_processes else 2)
            ),
            worker_processes=args.worker_processes,
            memory_levels=parse_levels(args.memory_levels),
            merge_group=args.merge_group,
            train=args.train,
            train_every=args.train_every,
            train_args=tuple(args.train_arg),
            stream_interval=args.stream_interval,
            compile=args.compile,
            compile_dynamic=args.compile_dynamic,
            decode_dtype=args.decode_dtype,
            gc_tuning=not args.no_gc_tuning,
        )
    except ValueError as e:
        print(f"bwr up: {e}", file=sys.stderr)
        return 2
    return up(cfg, args.model, args.device, use_uvloop=not args.no_uvloop)


def _chat(args: argparse.Namespace) -> int:
    from gateway.chat import chat

    key = args.api_key or (_api_keys(None) or (None,))[0]
    return chat(args.url, key, max_bytes=args.max_bytes, temperature=args.temperature, raw=args.raw)


def _bench_gateway(args: argparse.Namespace) -> int:
    from benchmarks.gateway_bench import run

    return run(args)


def _eval(args: argparse.Namespace) -> int:
    from gateway.evals import run

    return run(args)


def _bench_engine(args: argparse.Namespace) -> int:
    from benchmarks.engine_bench import run

    return run(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Handler = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
