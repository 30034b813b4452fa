"""All NATS wiring of the project in one place: the connection, the JetStream streams, the
consumer, the KV bucket and object stores, and the subject and key names.

bus.py owns names and the idempotent creation of what JetStream holds. It knows nothing of
tensors or of what a message means (jobs.py and snapshots.py do); it never reads the
environment. Every name is a constant here or a field of MemoryConfig.
"""

from __future__ import annotations

import logging
import re

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, BucketNotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from memory.config import MemoryConfig

log = logging.getLogger("bwr.bus")

DOCS_PREFIX = "docs.ingest"  # docs.ingest.<namespace>: documents (DOCS stream)
CONSOLIDATE_PREFIX = "memory.consolidate"  # memory.consolidate.<session>: jobs (MEMORY stream)
UPDATED_PREFIX = "memory.updated"  # memory.updated.<session>: core notice of a new version
MODEL_UPDATED = "model.updated"  # core notice of new weights in the checkpoints store
EVENTS_PREFIX = "events"  # events.<kind>: dashboard feed
MEMORY_KEY = "mem"  # sessions KV: mem.<session> -> MemoryPointer
SNAPSHOT_KEY = "snap"  # sessions KV: snap.<session> -> SnapshotPointer

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def check_token(name: str, what: str = "session id") -> str:
    """A name used as one subject token and KV key part: letters, digits, '_' and '-'."""
    if not _TOKEN.match(name):
        raise ValueError(
            f"{what} {name!r}: use 1 to 128 of A-Z a-z 0-9 _ - (it becomes a NATS subject token)"
        )
    return name


def consolidate_subject(session: str) -> str:
    return f"{CONSOLIDATE_PREFIX}.{check_token(session)}"


def updated_subject(session: str) -> str:
    return f"{UPDATED_PREFIX}.{check_token(session)}"


def docs_subject(namespace: str) -> str:
    return f"{DOCS_PREFIX}.{check_token(namespace, 'namespace')}"


def event_subject(kind: str) -> str:
    return f"{EVENTS_PREFIX}.{check_token(kind, 'event kind')}"


def memory_key(session: str) -> str:
    return f"{MEMORY_KEY}.{check_token(session)}"


def snapshot_key(session: str) -> str:
    return f"{SNAPSHOT_KEY}.{check_token(session)}"


def session_of(subject: str) -> str:
    """memory.consolidate.<session> (or memory.updated.<session>) -> <session>."""
    return subject.rsplit(".", 1)[-1]


class Bus:
    """A connection and the JetStream handles the memory system uses. Build with `connect`."""

    def __init__(self, nc: NATS, config: MemoryConfig) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=config.request_timeout_s)
        self.config = config
        self._sessions: KeyValue | None = None
        self._stores: dict[str, ObjectStore] = {}

    @classmethod
    async def connect(
        cls, url: str, config: MemoryConfig | None = None, *, name: str = "bwr-memory"
    ) -> Bus:
        """Connect (reconnecting forever after a loss); make sure every stream and bucket exists."""
        cfg = config or MemoryConfig()
        nc = await nats.connect(
            servers=[url],
            name=name,
            connect_timeout=max(1, round(cfg.connect_timeout_s)),
            reconnect_time_wait=cfg.reconnect_wait_s,
            max_reconnect_attempts=-1,
            error_cb=_log_error,
            disconnected_cb=_log_disconnect,
            reconnected_cb=_log_reconnect,
        )
        bus = cls(nc, cfg)
        try:
            await bus.ensure()
        except BaseException:
            await nc.close()
            raise
        return bus

    async def ensure(self) -> None:
        """Create (or leave as they are) the streams, the consumer, the KV bucket and the stores."""
        cfg = self.config
        dup = cfg.duplicate_window_s
        await self._stream(
            StreamConfig(
                name=cfg.docs_stream,
                subjects=[f"{DOCS_PREFIX}.>"],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                duplicate_window=dup,
            )
        )
        await self._stream(
            StreamConfig(
                name=cfg.memory_stream,
                subjects=[f"{CONSOLIDATE_PREFIX}.>"],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                duplicate_window=dup,
                max_bytes=cfg.memory_stream_max_bytes,
                discard=DiscardPolicy.NEW,  # full: submits fail, none dropped
            )
        )
        # create or update: a restarted service may bring a new ack_wait
        await self.js.add_consumer(
            cfg.memory_stream,
            ConsumerConfig(
                name=cfg.consumer,
                durable_name=cfg.consumer,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=cfg.ack_wait_s,
                max_deliver=-1,
                max_ack_pending=cfg.max_ack_pending,
                filter_subject=f"{CONSOLIDATE_PREFIX}.>",
            ),
        )
        try:
            self._sessions = await self.js.key_value(cfg.sessions_bucket)
        except BucketNotFoundError:
            self._sessions = await self.js.create_key_value(
                bucket=cfg.sessions_bucket, history=1, storage=StorageType.FILE
            )
        for bucket in (cfg.memory_bucket, cfg.snapshots_bucket, cfg.checkpoints_bucket):
            try:
                self._stores[bucket] = await self.js.object_store(bucket)
            except BucketNotFoundError:
                self._stores[bucket] = await self.js.create_object_store(
                    bucket, storage=StorageType.FILE
                )

    async def _stream(self, sc: StreamConfig) -> None:
        try:
            await self.js.add_stream(sc)
        except BadRequestError:  # exists with another configuration: bring it to this one
            await self.js.update_stream(sc)

    @property
    def sessions(self) -> KeyValue:
        assert self._sessions is not None, "Bus.ensure() first"
        return self._sessions

    def store(self, bucket: str) -> ObjectStore:
        try:
            return self._stores[bucket]
        except KeyError:
            raise KeyError(
                f"object store {bucket!r} not ensured; known: {sorted(self._stores)}"
            ) from None

    @property
    def memory(self) -> ObjectStore:
        return self.store(self.config.memory_bucket)

    @property
    def snapshots(self) -> ObjectStore:
        return self.store(self.config.snapshots_bucket)

    @property
    def checkpoints(self) -> ObjectStore:
        return self.store(self.config.checkpoints_bucket)

    async def docs_consumer(self, name: str, ack_wait_s: float, max_ack_pending: int) -> None:
        """Create (or update) a durable pull consumer of every document on DOCS, acked one by
        one and redelivered without limit (the ingest worker's and the trainer's)."""
        await self.js.add_consumer(
            self.config.docs_stream,
            ConsumerConfig(
                name=name,
                durable_name=name,
                deliver_policy=DeliverPolicy.ALL,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=ack_wait_s,
                max_deliver=-1,
                max_ack_pending=max_ack_pending,
                filter_subject=f"{DOCS_PREFIX}.>",
            ),
        )

    async def publish_event(self, kind: str, payload: bytes) -> None:
        await self.nc.publish(event_subject(kind), payload)

    async def close(self) -> None:
        """Close the connection (pull subscriptions are unsubscribed by their owners first; drain
        is avoided: it waits out an expired pull request)."""
        if not self.nc.is_closed:
            await self.nc.close()


async def _log_error(e: Exception) -> None:
    log.warning("nats: %s: %s", type(e).__name__, e)


async def _log_disconnect() -> None:
    log.info("nats: disconnected")


async def _log_reconnect() -> None:
    log.info("nats: reconnected")
