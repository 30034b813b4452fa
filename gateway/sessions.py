"""sessions.py: the gateway's table of live sessions and each one's lifecycle.

A session is an engine session plus what the gateway keeps about it: the hash of its resume
token, its owner (an API key or a client address, for the per-key limit), its sampling defaults,
the frames taken from the engine but not yet written to a socket, and its state:

    ATTACHED  --socket drops-->  DETACHED  --resume with token-->  ATTACHED
    ATTACHED/DETACHED  --close frame, DELETE, idle timeout, engine shutdown-->  CLOSED

A dropped connection detaches (the turn in progress is cancelled; the session stays resumable
for `detach_timeout_s`); a `close` frame or DELETE closes. A session made over HTTP waits
`unattached_timeout_s` for its first connection. Completion requests hold ephemeral sessions:
counted against the limits, never listed, never resumable.

The registry enforces the session limits and publishes lifecycle events; it never touches a
socket (ws.py does) and never parses frames (protocol.py does).
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import hmac
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine import Busy, Engine, EngineError, Session, ShuttingDown, UnknownSession
from gateway.config import GatewayConfig
from gateway.protocol import Sampling

log = logging.getLogger("bwr.gateway")


class SessionState(enum.Enum):
    ATTACHED = "attached"  # a connection streams it
    DETACHED = "detached"  # no connection; resumable with its token until the timeout
    CLOSED = "closed"  # gone from the engine


class IllegalTransition(RuntimeError):
    pass


class Unauthorized(EngineError):
    code = "unauthorized"


class Attachment(Protocol):
    """What the registry needs from a connection streaming a session."""

    def supersede(self) -> None:
        """Another connection resumed the session: stop streaming it."""

    async def stopped(self) -> None:
        """Return once the connection no longer touches the session."""


@dataclass
class Entry:
    session: Session
    token_hash: bytes
    owner: str
    binary: bool = False
    namespace: str | None = None
    defaults: Sampling | None = None
    ephemeral: bool = False  # a completion request's session
    state: SessionState = SessionState.DETACHED
    created: float = field(default_factory=time.time)  # wall clock, for people
    touched: float = field(default_factory=time.monotonic)  # last attach or detach
    outbox: deque[str] = field(
        default_factory=deque
    )  # frames taken from the engine, not yet written
    conn: Attachment | None = None
    attached_once: bool = False  # a connection has streamed it (else it waits for its first)

    @property
    def id(self) -> str:
        return self.session.id

    def to(self, new: SessionState, *expected: SessionState) -> None:
        if self.state not in expected:
            names = ", ".join(s.value for s in expected)
            raise IllegalTransition(
                f"session {self.id}: {self.state.value} -> {new.value}; expected {names}"
            )
        self.state = new
        self.touched = time.monotonic()

    def describe(self) -> dict[str, Any]:
        return {
            "session": self.id,
            "state": self.state.value,
            "context_bytes": self.session.context_bytes,
            "generating": self.session.generating,
            "binary": self.binary,
            "namespace": self.namespace,
            "created": self.created,
            "idle_s": round(time.monotonic() - self.touched, 3)
            if self.state is SessionState.DETACHED
            else 0.0,
        }


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


EventSink = Callable[[str, dict[str, Any]], None]


class SessionRegistry:
    def __init__(
        self,
        engine: Engine,
        config: GatewayConfig,
        events: EventSink | None = None,
        restorer: Callable[[str, str], Awaitable[None]] | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.restorer = restorer  # brings an unknown session back from its snapshot (by token)
        self.entries: dict[str, Entry] = {}
        self._events = events or (lambda kind, payload: None)
        self.closing = False

    # ----- limits -----

    def count(self, owner: str | None = None) -> int:
        return sum(1 for e in self.entries.values() if owner is None or e.owner == owner)

    def _admit(self, owner: str) -> None:
        if self.closing:
            raise ShuttingDown("the gateway is shutting down")
        self._sweep()
        if len(self.entries) >= self.config.max_sessions:
            raise Busy(f"all {self.config.max_sessions} sessions are in use; try again later")
        if self.count(owner) >= self.config.max_sessions_per_key:
            raise Busy(
                f"this key holds {self.config.max_sessions_per_key} sessions, its limit;"
                " close one first"
            )

    # ----- transitions -----

    def create(
        self,
        owner: str,
        *,
        binary: bool = False,
        namespace: str | None = None,
        defaults: Sampling | None = None,
        ephemeral: bool = False,
    ) -> tuple[Entry, str]:
        """Open an engine session (DETACHED until a connection attaches) -> (entry, token)."""
        self._admit(owner)
        session = self.engine.open(binary=binary)  # raises Busy when the engine has no slot
        token = secrets.token_urlsafe(24)
        entry = Entry(session, _hash(token), owner, binary, namespace, defaults, ephemeral)
        self.entries[session.id] = entry
        if not ephemeral:
            self._events(
                "session",
                {
                    "event": "opened",
                    "session": session.id,
                    "binary": binary,
                    "namespace": namespace,
                },
            )
        return entry, token

    def adopt(
        self,
        session: Session,
        token_hash: bytes,
        owner: str,
        *,
        binary: bool = False,
        namespace: str | None = None,
    ) -> Entry:
        """A session restored from a snapshot: DETACHED, resumable with its old token."""
        entry = Entry(session, token_hash, owner, binary, namespace)
        entry.attached_once = True
        self.entries[session.id] = entry
        self._events("session", {"event": "restored", "session": session.id})
        return entry

    def lookup(self, sid: str, token: str | None = None, owner: str | None = None) -> Entry:
        """A live, non-ephemeral session. With a token it must match; without one the caller must
        be its owner (HTTP inspection by the key that created it)."""
        entry = self.entries.get(sid)
        if entry is not None and entry.session.closed:
            self._forget(entry)
            entry = None
        if entry is None or entry.ephemeral:
            raise UnknownSession(
                f"no live session {sid[:40]!r} (closed, expired, or never created)"
            )
        if token is not None:
            if not hmac.compare_digest(entry.token_hash, _hash(token)):
                raise Unauthorized(f"wrong token for session {sid}")
        elif owner is None or owner != entry.owner:
            raise Unauthorized(f"session {sid} needs its token (X-Session-Token header or ?token=)")
        return entry

    async def attach(self, sid: str, token: str, conn: Attachment) -> Entry:
        """Resume: DETACHED -> ATTACHED; an ATTACHED session is taken over from its connection."""
        if self.closing:
            raise ShuttingDown("the gateway is shutting down")
        if self.restorer is not None and sid not in self.entries:
            await self.restorer(sid, token)  # after a restart: from the session's snapshot
        entry = self.lookup(sid, token)
        old = entry.conn
        if entry.state is SessionState.ATTACHED and old is not None and old is not conn:
            old.supersede()
            await old.stopped()
            if self.entries.get(sid) is not entry:
                raise UnknownSession(f"session {sid} closed while being resumed")
        if entry.state is SessionState.ATTACHED:
            entry.to(SessionState.DETACHED, SessionState.ATTACHED)
        entry.to(SessionState.ATTACHED, SessionState.DETACHED)
        entry.conn = conn
        entry.attached_once = True
        self._events("session", {"event": "attached", "session": sid})
        return entry

    def bind(self, entry: Entry, conn: Attachment) -> None:
        """A freshly created session's first connection."""
        entry.to(SessionState.ATTACHED, SessionState.DETACHED)
        entry.conn = conn
        entry.attached_once = True

    async def detach(self, entry: Entry, conn: Attachment) -> None:
        """The connection dropped: cancel the turn in progress and keep the session resumable."""
        if entry.conn is not conn or entry.state is not SessionState.ATTACHED:
            return  # superseded or closed meanwhile
        entry.conn = None
        if not entry.session.closed:
            with contextlib.suppress(EngineError):
                entry.session.cancel()
        if self.config.detach_timeout_s <= 0 or self.closing:
            await self.close(entry, "disconnected")
            return
        entry.to(SessionState.DETACHED, SessionState.ATTACHED)
        self._events("session", {"event": "detached", "session": entry.id})

    async def close(self, entry: Entry, why: str = "closed") -> None:
        """Close the engine session. Never suspends, so it completes inside a cancelled scope."""
        if entry.state is SessionState.CLOSED:
            return
        entry.to(SessionState.CLOSED, SessionState.ATTACHED, SessionState.DETACHED)
        await entry.session.close()
        self._forget(entry)
        if not entry.ephemeral:
            self._events("session", {"event": "closed", "session": entry.id, "why": why})

    def _forget(self, entry: Entry) -> None:
        if self.entries.get(entry.id) is entry:
            del self.entries[entry.id]
        if entry.state is not SessionState.CLOSED:
            entry.state = SessionState.CLOSED

    # ----- housekeeping -----

    def _sweep(self) -> None:
        """Forget sessions the engine closed by itself (a failed step, shutdown)."""
        for entry in [e for e in self.entries.values() if e.session.closed]:
            self._forget(entry)
            if not entry.ephemeral:
                self._events("session", {"event": "closed", "session": entry.id, "why": "engine"})

    async def reap(self) -> int:
        """Close detached sessions idle past their timeout -> how many."""
        self._sweep()
        now, n, c = time.monotonic(), 0, self.config
        for entry in list(self.entries.values()):
            if entry.state is not SessionState.DETACHED or entry.ephemeral:
                continue
            timeout = c.detach_timeout_s if entry.attached_once else c.unattached_timeout_s
            if now - entry.touched >= timeout:
                await self.close(entry, "expired")
                n += 1
        return n

    async def close_all(self, why: str) -> None:
        for entry in list(self.entries.values()):
            await self.close(entry, why)

    def listing(self, owner: str) -> list[dict[str, Any]]:
        self._sweep()
        return [e.describe() for e in self.entries.values() if e.owner == owner and not e.ephemeral]
