"""app.py assembles the gateway: the `Gateway` object (config, engine, session registry, event
bus, counters, optional memory hooks), its lifespan (engine started on startup; intake stopped,
sessions closed and the engine drained on shutdown), the API-key middleware, and the Starlette
app with every route.

The routes themselves live by noun: ws.py (WebSocket protocol), http.py (sessions, memory,
namespaces, info, health, metrics), openai.py (completions). app.py never reads the environment
or argv (cli.py and serve.py do) and never builds a model (serve.py does).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Protocol

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from engine import Engine, EngineConfig, MemoryHooks
from gateway import http, openai, web, ws
from gateway.config import GatewayConfig
from gateway.events import EventBus
from gateway.metrics import GatewayStats, Sources, make_registry
from gateway.persistence import MemoryPlugin, token_hash
from gateway.sessions import Entry, SessionRegistry, SessionState
from model import ByteLM

log = logging.getLogger("bwr.gateway")

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/"})  # the page asks for the key itself
OPEN_PREFIX = "/static/"  # the page's scripts and styles: nothing in them is private


class MemoryInspector(Protocol):
    """Reads one session's memory summary (memory/'s MemoryService.inspect has this shape)."""

    async def inspect(self, session: str) -> dict[str, Any]: ...


class NamespaceProvider(Protocol):
    """Reads what a namespace holds: at least `documents` and `bytes`."""

    async def namespace(self, name: str) -> dict[str, Any]: ...


@dataclass
class Hooks:
    """Optional plug-ins, none needed to serve: memory/ provides them as it lands."""

    engine: MemoryHooks | None = None  # segments out of and memory versions into the engine
    memory: MemoryInspector | None = None  # GET /v1/sessions/{id}/memory levels
    namespaces: NamespaceProvider | None = None  # GET /v1/namespaces/{ns}
    persistence: MemoryPlugin | None = None  # consolidation, snapshots and resume over NATS


def package_version() -> str:
    try:
        return metadata.version("bwr-dnc")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class Gateway:
    def __init__(
        self,
        config: GatewayConfig,
        model: ByteLM,
        engine_config: EngineConfig | None = None,
        *,
        hooks: Hooks | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.engine_config = engine_config or EngineConfig(max_slots=config.max_sessions)
        self.hooks = hooks or Hooks()
        self.info = dict(info or {})
        self.stats = GatewayStats()
        self.closing = False
        self.started_at = time.time()
        self.events: EventBus | None = None
        self.feed = web.Feed()  # the page's event feed (GET /v1/events), with or without NATS
        self._engine: Engine | None = None
        self._running = False  # between engine start and engine shutdown
        self._registry: SessionRegistry | None = None
        self._keys = [(k.encode(), f"key{i}") for i, k in enumerate(config.api_keys)]
        self._last: tuple[float, int, int, int] = (time.monotonic(), 0, 0, 0)
        self.prometheus = make_registry(
            Sources(
                engine=lambda: self._engine.metrics if self._engine else None,
                stats=self.stats,
                sessions=self.session_counts,
                nats=self.nats_state,
                events_dropped=lambda: self.events.dropped if self.events else 0,
            )
        )

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("the gateway has not started (its lifespan owns the engine)")
        return self._engine

    @property
    def registry(self) -> SessionRegistry:
        if self._registry is None:
            raise RuntimeError("the gateway has not started")
        return self._registry

    # ----- identity -----

    def key_owner(self, key: str) -> str | None:
        """The owner name of an API key, or None when it is not one of ours."""
        given = key.encode("utf-8", "surrogatepass")
        found = None
        for k, owner in self._keys:  # compare with every key: no early exit to time
            if hmac.compare_digest(k, given):
                found = owner
        return found

    # ----- state for probes, metrics and events -----

    def session_counts(self) -> dict[str, int]:
        counts = {s.value: 0 for s in (SessionState.ATTACHED, SessionState.DETACHED)}
        counts["completion"] = 0
        if self._registry is not None:
            for e in self._registry.entries.values():
                counts["completion" if e.ephemeral else e.state.value] += 1
        return counts

    def nats_state(self) -> int:
        if self.config.nats_url is None:
            return -1
        return int(self.events is not None and self.events.connected)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        engine_ok = self._running
        nats = {-1: "off", 0: "disconnected", 1: "connected"}[self.nats_state()]
        ready = (
            engine_ok
            and not self.closing
            and (nats != "disconnected" or not self.config.nats_required)
        )
        return ready, {"ready": ready, "engine": engine_ok, "closing": self.closing, "nats": nats}

    def emit(self, kind: str, payload: dict[str, Any]) -> None:
        self.feed.publish(kind, payload)
        if self.events is not None:
            self.events.publish(kind, payload)

    def summary(self) -> dict[str, Any]:
        """Throughput since the last call, for `events.engine`."""
        m = self.engine.metrics
        now = time.monotonic()
        t, bytes_out, bytes_in, steps = self._last
        dt = max(now - t, 1e-9)
        self._last = (now, m.bytes_out, m.bytes_in, m.steps)
        return {
            "bytes_out_per_s": (m.bytes_out - bytes_out) / dt,
            "bytes_in_per_s": (m.bytes_in - bytes_in) / dt,
            "steps_per_s": (m.steps - steps) / dt,
            "sessions": m.sessions,
            "running": m.running,
            "waiting": m.waiting,
            "ttft_p50_s": m.ttft.quantile(0.5),
            "itl_p50_s": m.itl.quantile(0.5),
            "weights_version": m.weights_version,
            "connections": self.stats.connections,
        }

    def engine_event(self) -> dict[str, Any]:
        """The periodic summary, handed to the page's feed too (one caller: summary() resets)."""
        out = self.summary()
        self.feed.publish("engine", out)
        return out

    # ----- lifecycle -----

    async def drain(self, timeout: float) -> None:
        """Stop intake (new sessions and turns get `shutting_down`) and let running turns finish."""
        self.closing = True
        if self._registry is not None:
            self._registry.closing = True
        if self._engine is None:
            return
        with anyio.move_on_after(timeout):
            while self._engine.scheduler.running:
                await anyio.sleep(0.02)

    # ----- persistence -----

    def session_opened(self, entry: Entry) -> None:
        """A session was created or restored: with a namespace, it reads that namespace's memory."""
        plugin = self.hooks.persistence
        if plugin is not None and entry.namespace:
            plugin.open_namespace(entry.id, entry.namespace, entry.session.context_bytes)

    def turn_done(self, entry: Entry) -> None:
        """A turn ended on a session: snapshot it in the background (when persistence is on)."""
        plugin = self.hooks.persistence
        if plugin is not None and not entry.ephemeral and not entry.session.closed:
            plugin.turn_done(entry.id, self._snapshot_meta(entry))

    @staticmethod
    def _snapshot_meta(entry: Entry) -> dict[str, Any]:
        return {
            "token_hash": entry.token_hash.hex(),
            "owner": entry.owner,
            "binary": entry.binary,
            "namespace": entry.namespace,
        }

    async def _restore(self, sid: str, token: str) -> None:
        """Bring a session back from its snapshot (after a restart) into the registry, detached."""
        plugin = self.hooks.persistence
        if plugin is None:
            return
        found = await plugin.restore(sid, token)
        if found is None or sid in self.registry.entries:
            return
        snap, meta = found
        session = self.engine.open(sid, binary=bool(meta.get("binary")), restore=snap)
        assert token_hash(token) == meta["token_hash"]
        entry = self.registry.adopt(
            session,
            bytes.fromhex(meta["token_hash"]),
            str(meta.get("owner", "")),
            binary=bool(meta.get("binary")),
            namespace=meta.get("namespace"),
        )
        self.session_opened(entry)

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        app.state.gateway = self
        plugin = self.hooks.persistence
        if plugin is not None:
            self.hooks.engine = await plugin.connect()
            self.hooks.memory = self.hooks.memory or plugin
            self.hooks.namespaces = self.hooks.namespaces or plugin
        engine = Engine(self.model, self.engine_config, hooks=self.hooks.engine)
        await engine.start()
        self._engine = engine
        self._running = True
        self._registry = SessionRegistry(
            engine, self.config, self.emit, restorer=self._restore if plugin else None
        )
        if self.config.nats_url:
            self.events = EventBus(
                self.config.nats_url,
                queue_size=self.config.events_queue,
                interval_s=self.config.events_interval_s,
            )
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._reaper)
                if self.events is not None:
                    tg.start_soon(self.events.run, self.engine_event)
                else:
                    tg.start_soon(self.feed.tick, self.engine_event, self.config.events_interval_s)
                if plugin is not None:
                    await tg.start(plugin.run, engine)
                yield
                await self.drain(min(self.config.drain_s, 2.0))
                if plugin is not None:  # snapshot live sessions: they resume after a restart
                    live = {
                        e.id: self._snapshot_meta(e)
                        for e in self._registry.entries.values()
                        if not e.ephemeral and not e.session.closed
                    }
                    with anyio.move_on_after(self.config.drain_s):
                        await plugin.save_all(live)
                await self._registry.close_all("shutdown")
                self._running = False
                await engine.shutdown(drain_s=0.0)
                tg.cancel_scope.cancel()
        finally:
            if self._running:  # startup or serving failed: still stop the engine's loop
                self._running = False
                with anyio.CancelScope(shield=True):
                    await engine.shutdown(drain_s=0.0)
            if self.events is not None:
                await self.events.close()
            if plugin is not None:
                await plugin.close()

    async def _reaper(self) -> None:
        while True:
            await anyio.sleep(self.config.reap_interval_s)
            await self.registry.reap()


class AuthMiddleware:
    """Bearer keys for every HTTP route but the health probes; WebSockets may authenticate with
    the header or a first `auth` frame (ws.py reads scope["bwr.authorized"]). Also names the
    caller (scope["bwr.owner"]): its key, or its address when the gateway has no keys."""

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gw = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if not self.gw.config.auth:
            client = scope.get("client")
            scope["bwr.owner"] = f"addr:{client[0] if client else 'local'}"
            scope["bwr.authorized"] = True
            await self.app(scope, receive, send)
            return
        owner = None
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, key = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    owner = self.gw.key_owner(key.strip())
        scope["bwr.owner"] = owner or "anonymous"
        scope["bwr.authorized"] = owner is not None
        path = scope["path"]
        public = path in OPEN_PATHS or path.startswith(OPEN_PREFIX)
        if owner is None and scope["type"] == "http" and not public:
            self.gw.stats.error("unauthorized")
            response = http.error_response(
                401, "unauthorized", "this route needs Authorization: Bearer <API key>"
            )
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return http.error_response(exc.status_code, code, str(exc.detail))


def routes() -> list[BaseRoute]:
    return [
        Route("/healthz", http.healthz),
        Route("/readyz", http.readyz),
        Route("/metrics", http.metrics),
        Route("/openapi.json", http.openapi),
        Route("/v1/info", http.info),
        Route("/v1/training", http.training, methods=["GET"]),
        Route("/v1/sessions", http.create_session, methods=["POST"]),
        Route("/v1/sessions", http.list_sessions, methods=["GET"]),
        Route("/v1/sessions/{sid}", http.get_session, methods=["GET"]),
        Route("/v1/sessions/{sid}", http.delete_session, methods=["DELETE"]),
        Route("/v1/sessions/{sid}/memory", http.session_memory, methods=["GET"]),
        Route("/v1/namespaces/{ns}", http.namespace, methods=["GET"]),
        Route("/v1/completions", openai.completions, methods=["POST"]),
        Route("/v1/chat/completions", openai.chat_completions, methods=["POST"]),
        WebSocketRoute("/v1/stream", ws.stream_new),
        WebSocketRoute("/v1/sessions/{sid}/stream", ws.stream_session),
        *web.routes(),
    ]


def create_app(
    config: GatewayConfig,
    model: ByteLM,
    engine_config: EngineConfig | None = None,
    *,
    hooks: Hooks | None = None,
    info: dict[str, Any] | None = None,
) -> Starlette:
    gw = Gateway(config, model, engine_config, hooks=hooks, info=info)
    app = Starlette(
        routes=routes(),
        lifespan=gw.lifespan,
        middleware=[Middleware(AuthMiddleware, gateway=gw)],
        exception_handlers={HTTPException: _http_error},
    )
    app.state.gateway = gw
    return app
