"""`make loadtest`: start `bwr up`, run locust headless against it, write reports, stop both.

    python -m loadtest.run --users 50 --spawn-rate 25 --duration 60 --out out/loadtest
    USERS=200 DURATION=30 make loadtest

Writes to --out: locust's report.html and stats CSVs (report_stats.csv, ...), up.log,
locust.log, and summary.json: per request name its count, failures, p50/p99 (ms) and rate; the
server's peak RSS (VmHWM of the `bwr up` process, plus VmRSS sampled every second); and, with
NATS users, documents acked, the DOCS stream's message count, and whether they match. `bwr up`
runs the ingest worker: after locust stops, run.py waits (while it makes progress) until the
namespace's document count reaches the acked count; the check is acked == stream == ingested.

run.py owns the processes it starts (the server, its embedded nats-server, locust) and stops
them all; it never imports gevent (locust runs as a subprocess).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from gateway.serve import read_banner

ROOT = Path(__file__).resolve().parent.parent
STALL_S = 20.0  # seconds without ingest progress before run.py stops waiting for the count


class Up:
    """A `bwr up --model tiny --device cpu` on a free port, URLs parsed from its banner."""

    def __init__(self, data: Path, log: Path, args: list[str]) -> None:
        cmd = [sys.executable, "-m", "gateway.cli", "up", "--port", "0", "--model", "tiny",
               "--device", "cpu", "--data-dir", str(data), *args]  # fmt: skip
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=ROOT
        )
        assert self.proc.stdout is not None
        banner = read_banner(self.proc.stdout, 90)
        text = "\n".join(banner)
        if "listening on" not in text:
            self.stop()
            raise RuntimeError(f"bwr up did not start:\n{text}\n{log.read_text()}")
        self.banner = banner
        self.url = banner[0].rsplit(" ", 1)[-1]
        nats = next((x for x in banner if x.strip().startswith("nats")), "")
        self.nats_url = nats.split()[1] if nats and "nats://" in nats else ""
        self.samples: list[tuple[float, int]] = []  # (seconds since start, VmRSS bytes)
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def status(self, field: str) -> int:
        """A kB field of /proc/<pid>/status, in bytes (0 once the process is gone)."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        except (FileNotFoundError, ProcessLookupError):
            pass
        return 0

    def _sample(self) -> None:
        t0 = time.monotonic()
        while not self._stop.wait(1.0):
            self.samples.append((round(time.monotonic() - t0, 1), self.status("VmRSS")))

    def stop(self) -> int:
        if hasattr(self, "_stop"):
            self._stop.set()
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            code = self.proc.wait(40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self.log.close()
        return code


def read_stats(path: Path) -> dict[str, dict[str, Any]]:
    """locust's <prefix>_stats.csv -> {"TYPE name": {...}} (the Aggregated row included)."""
    out: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return out
    with path.open() as f:
        for row in csv.DictReader(f):
            key = f"{row['Type']} {row['Name']}".strip()
            out[key] = {
                "requests": int(row["Request Count"]),
                "failures": int(row["Failure Count"]),
                "p50_ms": _num(row.get("50%")),
                "p99_ms": _num(row.get("99%")),
                "mean_ms": _num(row.get("Average Response Time")),
                "per_s": _num(row.get("Requests/s")),
                "avg_bytes": _num(row.get("Average Content Size")),
            }
    return out


def _num(x: str | None) -> float | None:
    try:
        return round(float(x), 3) if x not in (None, "", "N/A") else None
    except ValueError:
        return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    up_args = ["--max-sessions", str(args.max_sessions), "--max-sessions-per-key",
               str(args.max_sessions), *args.up_args]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bwr-loadtest-") as tmp:
        started = time.time()
        up = Up(Path(tmp) / "data", out / "up.log", up_args)
        try:
            env = {
                **os.environ,
                "BWR_NATS_URL": os.environ.get("BWR_NATS_URL") or up.nats_url,
                "BWR_ACKED_FILE": str(out / "acked.json"),
                "PYTHONPATH": str(ROOT),
            }
            weights = {
                "SessionUser": int(os.environ.get("BWR_WS_WEIGHT", "1")),
                "CompletionUser": int(os.environ.get("BWR_SSE_WEIGHT", "0")),
                "IngestUser": int(os.environ.get("BWR_NATS_WEIGHT", "0")),
            }
            classes = [name for name, w in weights.items() if w > 0]
            cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"),
                   "--headless", "-u", str(args.users), "-r", str(args.spawn_rate),
                   "-t", f"{args.duration}s", "--host", up.url, "--csv", str(out / "report"),
                   "--html", str(out / "report.html"), "--only-summary", "--stop-timeout", "20",
                   "--exit-code-on-error", "0", *classes]  # fmt: skip
            t0 = time.monotonic()
            with (out / "locust.log").open("w") as log:
                code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                      cwd=ROOT, timeout=args.duration + 120).returncode  # fmt: skip
            elapsed = time.monotonic() - t0
            acked = _acked(out)
            ingested, drain_s = _wait_ingested(up.url, acked.get("acked", 0), args.ingest_wait)
            stream = (0, 0)
            if up.nats_url:
                try:
                    stream = asyncio.run(_stream(up.nats_url))
                except Exception as e:  # no DOCS stream: nothing was published
                    print(f"loadtest: DOCS stream info: {e}", file=sys.stderr)
            peak = up.status("VmHWM")
            rss_end = up.status("VmRSS")
        finally:
            code_up = up.stop()
    stats = read_stats(out / "report_stats.csv")
    failures = sum(v["failures"] for k, v in stats.items() if k != "Aggregated")
    requests_ = sum(v["requests"] for k, v in stats.items() if k != "Aggregated")
    turns = stats.get("WS turn", {})
    docs = stats.get("NATS publish", {})
    summary: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
        "users": args.users,
        "spawn_rate": args.spawn_rate,
        "duration_s": args.duration,
        "locust_seconds": round(elapsed, 1),
        "env": {k: v for k, v in os.environ.items() if k.startswith("BWR_") and k != "BWR_API_KEY"},
        "up_args": up_args,
        "requests": requests_,
        "failures": failures,
        "turns_per_s": round(turns.get("requests", 0) / args.duration, 2),
        "stats": stats,
        "server_peak_rss_bytes": peak,
        "server_rss_end_bytes": rss_end,
        "server_rss_samples": up.samples,
        "locust_exit": code,
        "up_exit": code_up,
    }
    if docs:
        summary["ingest"] = {
            "published_acked": acked.get("acked", 0),
            "published_bytes": acked.get("acked_bytes", 0),
            "stream_messages": stream[0],
            "stream_bytes": stream[1],
            "ingested": ingested,  # documents in the namespace (GET /v1/namespaces/{ns})
            "ingest_drain_s": drain_s,  # after locust stopped, until ingested caught up
            "match": acked.get("acked", 0) == stream[0] == ingested,
            "docs_per_s": round(acked.get("acked", 0) / args.duration, 1),
            "mb_per_s": round(acked.get("acked_bytes", 0) / args.duration / 1e6, 3),
        }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _acked(out: Path) -> dict[str, int]:
    f = out / "acked.json"
    return json.loads(f.read_text()) if f.exists() else {}


def _wait_ingested(url: str, acked: int, wait_s: float) -> tuple[int | None, float]:
    """Poll the namespace until the ingest worker of `bwr up` has applied `acked` documents,
    for at most `wait_s` (or STALL_S without progress) -> (documents ingested, seconds waited)."""
    if not acked:
        return None, 0.0
    import httpx

    ns = os.environ.get("BWR_NAMESPACE", "loadtest")
    t0 = last_change = time.monotonic()
    seen = -1
    while True:
        try:
            docs = int(httpx.get(f"{url}/v1/namespaces/{ns}", timeout=10).json()["documents"])
        except (httpx.HTTPError, KeyError, ValueError):
            docs = seen
        now = time.monotonic()
        if docs != seen:
            seen, last_change = docs, now
        if seen >= acked or now - last_change > STALL_S or now - t0 > wait_s:
            return seen, round(now - t0, 1)
        time.sleep(0.5)


async def _stream(url: str) -> tuple[int, int]:
    from loadtest.bus_thread import stream_messages

    return await stream_messages(url)


def table(s: dict[str, Any]) -> str:
    lines = [f"{'name':<20} {'requests':>9} {'fail':>6} {'p50 ms':>9} {'p99 ms':>9} {'per s':>8}"]
    for name, v in s["stats"].items():
        lines.append(
            f"{name:<20} {v['requests']:>9,} {v['failures']:>6,} {v['p50_ms'] or 0:>9.1f}"
            f" {v['p99_ms'] or 0:>9.1f} {v['per_s'] or 0:>8.1f}"
        )
    lines.append(
        f"users {s['users']}, {s['duration_s']} s: {s['turns_per_s']} turns/s,"
        f" {s['failures']} failures, server peak RSS {s['server_peak_rss_bytes'] / 2**20:.0f} MiB"
    )
    if "ingest" in s:
        i = s["ingest"]
        lines.append(
            f"ingest: {i['published_acked']:,} acked, {i['stream_messages']:,} in DOCS,"
            f" {i['ingested']} ingested ({i['ingest_drain_s']} s after the run): match"
            f" {i['match']}; {i['docs_per_s']} docs/s, {i['mb_per_s']} MB/s acked"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=int(env("USERS", 50)))
    p.add_argument("--spawn-rate", type=float, default=float(env("SPAWN_RATE", 25)))
    p.add_argument("--duration", type=int, default=int(env("DURATION", 60)), help="seconds")
    p.add_argument("--max-sessions", type=int, default=int(env("MAX_SESSIONS", 0)) or None,
                   help="bwr up --max-sessions (default: users + 64)")  # fmt: skip
    p.add_argument("--out", default=env("OUT", "out/loadtest"))
    p.add_argument("--ingest-wait", type=float, default=float(env("INGEST_WAIT", 60)),
                   help="most seconds to wait after the run for the ingested count")  # fmt: skip
    p.add_argument("up_args", nargs="*", help="more flags for bwr up (after --)")
    args = p.parse_args(argv)
    args.max_sessions = args.max_sessions or args.users + 64
    s = run(args)
    print(table(s))
    print(f"reports in {args.out}: report.html, report_*.csv, summary.json")
    ok = s["requests"] > 0 and s["failures"] == 0 and s.get("ingest", {}).get("match", True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
