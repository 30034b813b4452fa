"""Locust users for `bwr up`: WebSocket sessions, OpenAI SSE completions, NATS ingestion.

Run it through loadtest/run.py (which starts the server and collects the reports), or by hand:

    BWR_NATS_URL=nats://127.0.0.1:4222 BWR_NATS_WEIGHT=1 \
        locust -f loadtest/locustfile.py --headless -u 50 -r 10 -t 60s --host http://127.0.0.1:8000

Request events (request_type / name):
    WS    open           handshake to `opened`
    WS    ttft           input sent -> first delta (ms)
    WS    inter-token    (last delta - first delta) / (bytes after the first delta), one per turn
    WS    turn           input sent -> done; response_length = bytes generated
    WS    bytes/s        bytes generated / turn time, as the "response time" column (a rate)
    SSE   ttft, completion   the same for POST /v1/completions stream=true
    NATS  publish        publish -> JetStream ack; response_length = document bytes

Every error frame, timeout, closed socket, non-200 or missing [DONE] is a failure. The locust
process is gevent-patched: the WebSocket client is websockets' synchronous one (greenlet-safe),
the NATS client runs on an asyncio loop in a real thread (bus_thread.py).
"""

from __future__ import annotations

import collections
import itertools
import json
import time
from typing import Any

import gevent
import requests
from locust import User, events, task
from websockets.sync.client import connect

from loadtest.bus_thread import Published, shared
from loadtest.options import LoadConfig, turn_text

CFG = LoadConfig.from_env()
_salts = itertools.count()


class TurnFailed(Exception):
    pass


def _fire(kind: str, name: str, ms: float, length: int = 0, exc: Exception | None = None) -> None:
    events.request.fire(
        request_type=kind,
        name=name,
        response_time=ms,
        response_length=length,
        exception=exc,
        context={},
    )


class SessionUser(User):
    """One WebSocket session per user: open, then turns until the test ends."""

    weight = CFG.ws_weight

    def on_start(self) -> None:
        self.ws: Any = None
        self.salt = next(_salts)
        self.turns = 0

    def on_stop(self) -> None:
        self._close()

    def _close(self) -> None:
        if self.ws is not None:
            try:
                self.ws.send(json.dumps({"type": "close"}))
                self.ws.close()
            except Exception:
                pass
            self.ws = None

    def _open(self) -> None:
        base = str(self.host).replace("http://", "ws://").replace("https://", "wss://")
        url = base + "/v1/stream"
        t0 = time.perf_counter()
        try:
            self.ws = connect(
                url,
                additional_headers=CFG.headers,
                max_size=None,
                open_timeout=CFG.timeout_s,
                compression=None,
            ).__enter__()  # entered: websockets 17.1 warns about a bare connect()
            sampling = {"max_bytes": CFG.max_bytes, "ignore_eos": CFG.ignore_eos}
            self.ws.send(json.dumps({"type": "open", "sampling": sampling}))
            frame = json.loads(self.ws.recv(timeout=CFG.timeout_s))
            if frame.get("type") != "opened":
                raise TurnFailed(f"open answered {frame}")
        except Exception as e:
            _fire("WS", "open", (time.perf_counter() - t0) * 1000, 0, e)
            self._close()
            raise
        _fire("WS", "open", (time.perf_counter() - t0) * 1000)
        self.turns = 0

    @task
    def turn(self) -> None:
        if self.ws is None:
            try:
                self._open()
            except Exception:
                gevent.sleep(1.0)  # back off: the failure is recorded
                return
        text = turn_text(CFG.turn_bytes, self.salt * 7 + self.turns)
        t0 = time.perf_counter()
        first = last = 0.0
        first_bytes = out_bytes = 0
        try:
            self.ws.send(json.dumps({"type": "input", "text": text, "max_bytes": CFG.max_bytes}))
            while True:
                frame = json.loads(self.ws.recv(timeout=CFG.timeout_s))
                kind = frame.get("type")
                if kind == "delta":
                    now = time.perf_counter()
                    n = len(frame.get("text", "").encode())
                    if not first:
                        first, first_bytes = now, n
                    last = now
                    out_bytes += n
                elif kind == "done":
                    break
                elif kind == "error":
                    raise TurnFailed(f"error frame {frame.get('code')}: {frame.get('message')}")
        except Exception as e:
            _fire("WS", "turn", (time.perf_counter() - t0) * 1000, out_bytes, e)
            self._close()
            return
        end = time.perf_counter()
        if first:
            _fire("WS", "ttft", (first - t0) * 1000)
            if out_bytes > first_bytes:
                _fire("WS", "inter-token", (last - first) * 1000 / (out_bytes - first_bytes))
        _fire("WS", "turn", (end - t0) * 1000, out_bytes)
        _fire("WS", "bytes/s", out_bytes / max(end - t0, 1e-9))
        self.turns += 1
        if CFG.turns and self.turns >= CFG.turns:
            self._close()
        if CFG.think_s:
            gevent.sleep(CFG.think_s)


class CompletionUser(User):
    """POST /v1/completions with stream=true, read to [DONE]."""

    weight = CFG.sse_weight

    def on_start(self) -> None:
        self.http = requests.Session()
        self.salt = next(_salts)
        self.n = 0

    @task
    def completion(self) -> None:
        self.n += 1
        body: dict[str, Any] = {
            "prompt": turn_text(CFG.turn_bytes, self.salt * 11 + self.n),
            "max_tokens": CFG.max_bytes,
            "ignore_eos": CFG.ignore_eos,
            "stream": True,
        }
        t0 = time.perf_counter()
        first = 0.0
        got = 0
        try:
            with self.http.post(
                f"{self.host}/v1/completions",
                json=body,
                headers=CFG.headers,
                stream=True,
                timeout=CFG.timeout_s,
            ) as r:
                if r.status_code != 200:
                    raise TurnFailed(f"HTTP {r.status_code}: {r.text[:200]}")
                done = False
                for line in r.iter_lines():
                    if not line.startswith(b"data: "):
                        continue
                    data = line[6:]
                    if data == b"[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise TurnFailed(f"error chunk {chunk['error']}")
                    for c in chunk.get("choices", []):
                        text = c.get("text") or ""
                        if text and not first:
                            first = time.perf_counter()
                        got += len(text.encode())
                if not done:
                    raise TurnFailed("stream ended without [DONE]")
        except Exception as e:
            _fire("SSE", "completion", (time.perf_counter() - t0) * 1000, got, e)
            return
        if first:
            _fire("SSE", "ttft", (first - t0) * 1000)
        _fire("SSE", "completion", (time.perf_counter() - t0) * 1000, got)


class IngestUser(User):
    """Publishes fresh documents to docs.ingest.<namespace>, `nats_inflight` at a time."""

    weight = CFG.nats_weight

    def on_start(self) -> None:
        if not CFG.nats_url:
            raise RuntimeError("BWR_NATS_URL is not set")
        self.bus = shared(CFG.nats_url)
        self.bus.wait_ready(gevent.sleep)
        self.out: collections.deque[Published] = collections.deque()
        self.inflight = 0

    @task
    def publish(self) -> None:
        burst = 1 if CFG.doc_rate else CFG.nats_inflight
        while self.inflight < CFG.nats_inflight and burst:
            self.bus.submit(CFG.namespace, CFG.doc_bytes, self.out)
            self.inflight += 1
            burst -= 1
        gevent.sleep(1 / CFG.doc_rate if CFG.doc_rate else 0.005)  # acks come through the deque
        while self.out:
            p = self.out.popleft()
            self.inflight -= 1
            exc = None if p.ok else TurnFailed(p.error)
            _fire("NATS", "publish", p.seconds * 1000, p.size, exc)

    def on_stop(self) -> None:  # wait for the acks still in flight so the counts add up
        deadline = time.monotonic() + 15
        while self.inflight and time.monotonic() < deadline:
            gevent.sleep(0.01)
            while self.out:
                p = self.out.popleft()
                self.inflight -= 1
                exc = None if p.ok else TurnFailed(p.error)
                _fire("NATS", "publish", p.seconds * 1000, p.size, exc)


@events.quitting.add_listener
def _report_acked(environment: Any, **_: Any) -> None:
    """Leave the acked counts where run.py finds them (BWR_ACKED_FILE)."""
    import os

    path = os.environ.get("BWR_ACKED_FILE")
    if not path:
        return
    from loadtest import bus_thread

    b = bus_thread._shared
    with open(path, "w") as f:
        json.dump({"acked": b.acked if b else 0, "acked_bytes": b.acked_bytes if b else 0}, f)
