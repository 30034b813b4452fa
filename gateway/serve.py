"""serve.py is `bwr up`: it resolves the model, starts an embedded nats-server (unless a NATS URL
is given), runs the gateway app (which owns the engine) under uvicorn on uvloop, prints the URLs,
and on SIGTERM or Ctrl-C drains (no new sessions or turns, running turns finish up to drain_s),
stops the server and the engine, then the nats-server it started. A second signal forces exit.

serve.py never parses argv (cli.py does) and never serves a route (app.py does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Generator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

import uvicorn

from gateway.config import GatewayConfig
from gateway.natsd import NatsServer, NatsServerError

log = logging.getLogger("bwr.up")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = Path("checkpoints") / "default"


def default_checkpoint() -> Path | None:
    for root in (Path.cwd(), REPO):
        if (root / DEFAULT_CHECKPOINT / "config.json").is_file():
            return root / DEFAULT_CHECKPOINT
    return None


def resolve_model(spec: str | None, device: str) -> tuple[Any, dict[str, Any], str | None]:
    """-> (model on device, info for /v1/info, a warning for people or None)."""
    import torch

    from model import ByteLM, ModelConfig
    from model.config import PRESETS

    warning = None
    if spec is None:
        found = default_checkpoint()
        if found is None:
            spec = "tiny"
            warning = (
                f"no trained checkpoint at {DEFAULT_CHECKPOINT}/: serving the `tiny` config"
                " with RANDOM weights (its output is noise)."
                " Train one with `bwr train` or pass --model PATH."
            )
        else:
            spec = str(found)
    if spec in PRESETS:
        if warning is None:
            warning = (
                f"--model {spec}: a named config gets RANDOM weights (its output is noise);"
                " pass a checkpoint directory for a trained model"
            )
        torch.manual_seed(0)
        model = ByteLM(ModelConfig.named(spec)).to(device).eval()
        name, checkpoint = spec, None
    elif Path(spec).is_dir():
        model = ByteLM.load(spec, device).eval()
        name, checkpoint = Path(spec).name, str(Path(spec).resolve())
    else:
        raise SystemExit(
            f"bwr up: --model {spec!r} is neither a named config"
            f" ({', '.join(sorted(PRESETS))}) nor a checkpoint directory"
        )
    info = {
        "model": name,
        "checkpoint": checkpoint,
        "random_weights": checkpoint is None,
        "device": device,
        "params": model.num_parameters(),
        "config": model.config.to_dict(),
    }
    return model, info, warning


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class Server(uvicorn.Server):
    """uvicorn's server with the gateway's signal handling: first signal drains, second forces."""

    def __init__(self, config: uvicorn.Config, drain: Any, drain_s: float) -> None:
        super().__init__(config)
        self._drain = drain
        self._drain_s = drain_s
        self._draining = False
        self._drain_task: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        if self._draining:
            print("bwr up: second signal, stopping now", file=sys.stderr, flush=True)
            self.should_exit = self.force_exit = True
            return
        self._draining = True
        print(
            f"bwr up: {signal.Signals(sig).name}: draining"
            f" (up to {self._drain_s:.0f} s; again to force)",
            file=sys.stderr,
            flush=True,
        )
        self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self._drain(self._drain_s)
        finally:
            self.should_exit = True


def banner(
    cfg: GatewayConfig, port: int, nats: NatsServer | None, workers: Sequence[int] = ()
) -> str:
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    base = f"http://{host}:{port}"
    lines = [
        f"bwr up: gateway listening on {base}",
        f"  dashboard   {base}/",
        f"  websocket   ws://{host}:{port}/v1/stream",
        f"  openai      {base}/v1/chat/completions",
        f"  metrics     {base}/metrics",
    ]
    if nats is not None:
        lines.append(
            f"  nats        {cfg.nats_url} (embedded, pid {nats.pid}, data {nats.data_dir})"
        )
    else:
        lines.append(f"  nats        {cfg.nats_url or 'off'}")
    if cfg.nats_url is not None and cfg.memory:
        where = f"{cfg.memory_workers} in this process"
        if workers:
            where += f", {len(workers)} processes (pids {', '.join(map(str, workers))})"
        lines.append(f"  memory      consolidation workers: {where}")
    lines.append(f"  auth        {'API key required' if cfg.auth else 'off (loopback only)'}")
    return "\n".join(lines)


def read_banner(stream: IO[str], timeout_s: float) -> list[str]:
    """What `banner` printed, read from a `bwr up` child's stdout up to its last line (`auth`);
    fewer lines when the process ends or timeout_s passes first. For the tools and tests that
    start `bwr up` and need its URLs."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        lines.append(line.rstrip())
        if line.strip().startswith("auth"):
            break
    return lines


async def _serve(
    app: Any,
    cfg: GatewayConfig,
    sock: socket.socket,
    nats: NatsServer | None,
    workers: Sequence[int] = (),
) -> bool:
    config = uvicorn.Config(
        app,
        lifespan="on",
        ws="websockets-sansio",
        http="httptools",
        ws_max_size=cfg.ws_max_size,
        ws_per_message_deflate=False,  # frames are small: compressing them costs more than it saves
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    gw = app.state.gateway
    server = Server(config, gw.drain, cfg.drain_s)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if server.started:
        print(banner(cfg, sock.getsockname()[1], nats, workers), flush=True)
    await task
    return server.started


def start_trainer(cfg: GatewayConfig, model: str, device: str) -> subprocess.Popen[bytes]:
    """`bwr up --train`: the DOCS training consumer as a child process beside the engine. It
    starts from the served model (a checkpoint directory or a named config), checkpoints to the
    bus every cfg.train_every steps, and the engine reloads each checkpoint between steps."""
    start = ["--resume", model, "--config", model] if Path(model).is_dir() else ["--config", model]
    cmd = [
        sys.executable,
        "-m",
        "gateway.cli",
        "train",
        "--nats-url",
        str(cfg.nats_url),
        *start,
        "--device",
        device,
        "--checkpoint-every",
        str(cfg.train_every),
        "--threads",
        "1",
        *cfg.train_args,
    ]
    log = open(Path(cfg.data_dir) / "trainer.log", "ab")  # noqa: SIM115 - the child owns it
    print(
        f"bwr up: trainer pid starting, log {Path(cfg.data_dir) / 'trainer.log'}", file=sys.stderr
    )
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def start_workers(cfg: GatewayConfig, model: str, device: str) -> list[subprocess.Popen[bytes]]:
    """`bwr up --worker-processes N`: consolidation workers in processes of their own (the same
    model: a checkpoint directory, or a named config with the same seeded weights), each with
    its own data directory and log; they follow model.updated as the engine does."""
    procs = []
    for i in range(cfg.worker_processes):
        data = Path(cfg.data_dir) / f"worker-{i}"
        data.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "gateway.cli",
            "worker",
            "--nats-url",
            str(cfg.nats_url),
            "--model",
            model,
            "--device",
            device,
            "--data-dir",
            str(data),
            "--memory-levels",
            ",".join(map(str, cfg.memory_levels)),
            "--merge-group",
            str(cfg.merge_group),
        ]
        log = open(data / "worker.log", "ab")  # noqa: SIM115 - the child owns it
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
    return procs


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _terminate(sig: int, frame: object) -> None:
    raise KeyboardInterrupt


def up(cfg: GatewayConfig, model_spec: str | None, device: str, *, use_uvloop: bool = True) -> int:
    problem = cfg.bind_problem()
    if problem is not None:
        print(f"bwr up: {problem}", file=sys.stderr)
        return 2
    try:
        sock = bind_socket(cfg.host, cfg.port)
    except OSError as e:
        print(f"bwr up: cannot bind {cfg.host}:{cfg.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    # Until the server's own handlers are in place, SIGTERM unwinds like Ctrl-C so the finally
    # below still stops the nats-server this process started.
    signal.signal(signal.SIGTERM, _terminate)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("nats", "bwr.events"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    nats: NatsServer | None = None
    trainer: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = []
    try:
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        model, info, warning = resolve_model(model_spec, device)
        if warning:
            print(f"bwr up: WARNING: {warning}", file=sys.stderr, flush=True)
        if cfg.memory:
            from memory.store import SessionMemory

            try:  # the hierarchy must fit the model before anything starts
                SessionMemory.for_model(model.config, cfg.memory_config)
            except ValueError as e:
                print(f"bwr up: --memory-levels/--merge-group: {e}", file=sys.stderr, flush=True)
                return 2
        if cfg.nats_url is None:
            nats = NatsServer(Path(cfg.data_dir) / "nats")
            try:
                cfg = replace(cfg, nats_url=nats.start())
            except NatsServerError as e:
                print(f"bwr up: {e}; serving without NATS", file=sys.stderr, flush=True)
                nats = None
        served = model_spec or str(info.get("checkpoint") or "tiny")
        if cfg.train and cfg.nats_url is not None:
            trainer = start_trainer(cfg, served, device)
        if cfg.worker_processes and cfg.nats_url is not None and cfg.memory:
            workers = start_workers(cfg, str(info.get("checkpoint") or served), device)
        from engine import EngineConfig
        from gateway.app import create_app, package_version

        info.update(version=package_version(), nats_embedded=nats is not None)
        cfg = replace(cfg, model_name=str(info["model"]))
        hooks = None
        engine_config = EngineConfig(
            max_slots=cfg.max_sessions,
            device=device,
            stream_interval=cfg.stream_interval,
            compile=cfg.compile,
            compile_dynamic=cfg.compile_dynamic,
            decode_dtype=cfg.decode_dtype,
        )
        if cfg.nats_url is not None and cfg.memory:
            # Memory consolidation, snapshots and resume live on the bus: on with NATS.
            from gateway.app import Hooks
            from gateway.persistence import MemoryPlugin

            plugin = MemoryPlugin(
                cfg.nats_url,
                model,
                cfg.memory_config,
                workers=cfg.memory_workers,
                data_dir=cfg.data_dir,
            )
            hooks = Hooks(persistence=plugin)
            engine_config = replace(engine_config, memory_capacity=plugin.capacity)
        app = create_app(cfg, model, engine_config, hooks=hooks, info=info)
        if cfg.gc_tuning:  # the model and modules are loaded: freeze them, collect young less
            from engine.gctune import tune_for_serving

            tune_for_serving()
        if use_uvloop:
            import uvloop

            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                started = runner.run(_serve(app, cfg, sock, nats, [w.pid for w in workers]))
        else:
            started = asyncio.run(_serve(app, cfg, sock, nats, [w.pid for w in workers]))
    except KeyboardInterrupt:
        started = False
    finally:
        sock.close()
        if trainer is not None:
            stop_process(trainer)
        for w in workers:
            stop_process(w)
        if nats is not None:
            nats.stop()
    print("bwr up: stopped", file=sys.stderr, flush=True)
    return 0 if started else 1
