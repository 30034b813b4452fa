"""Publishing documents to the DOCS stream (`bwr ingest PATH... [--namespace NS]`), and the
document message format every consumer of DOCS reads (docs/INGEST.md).

A document goes to `docs.ingest.<namespace>` as one message, or as ordered chunks when it is
larger than the server's max_payload allows, each with these headers:

    Nats-Msg-Id   <doc id> for a single chunk, <doc id>.<index> for chunks (JetStream dedup)
    Bwr-Doc       <doc id>: sha256 hex of the namespace (UTF-8), one NUL byte, the whole body
    Bwr-Chunk     index of this chunk, from 0
    Bwr-Chunks    number of chunks of the document
    Bwr-Namespace the namespace
    Bwr-Doc-Bytes bytes of the whole document

and the raw bytes as the body. A message without the Bwr headers is a whole document. The same
document published again is a no-op: within the stream's duplicate window JetStream drops it
(the ack says `duplicate`); past it, a marker the publisher leaves in the `sessions` KV
(`doc.<namespace>.<doc id>`) says it was published already.

ingest.py owns that format and the publisher. It never runs the model (memory/namespaces.py, the
ingest worker, does) and holds at most `concurrency` documents' chunks in memory: files are read
chunk by chunk, twice (hash, then publish); stdin is spooled to a temporary file.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import anyio
import nats
from anyio.streams.memory import MemoryObjectReceiveStream
from nats.js.api import PubAck
from nats.js.errors import KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from memory.bus import Bus, check_token, docs_subject
from memory.config import MemoryConfig
from memory.worker import TRANSIENT

DOC_HEADER = "Bwr-Doc"
CHUNK_HEADER = "Bwr-Chunk"
CHUNKS_HEADER = "Bwr-Chunks"
NAMESPACE_HEADER = "Bwr-Namespace"
BYTES_HEADER = "Bwr-Doc-Bytes"
MARKER_PREFIX = "doc"  # sessions KV: doc.<namespace>.<doc id> -> {"chunks", "bytes"}
HEADER_ROOM = 4096  # bytes of max_payload left for headers
READ_BLOCK = 1 << 20


def doc_id(namespace: str, body: bytes) -> str:
    """The content hash that names a document: sha256(namespace, NUL, body), hex."""
    return hashlib.sha256(namespace.encode() + b"\0" + body).hexdigest()


def chunk_msg_id(did: str, index: int, chunks: int) -> str:
    return did if chunks == 1 else f"{did}.{index}"


def marker_key(namespace: str, did: str) -> str:
    return f"{MARKER_PREFIX}.{check_token(namespace, 'namespace')}.{did}"


def chunk_headers(namespace: str, did: str, index: int, chunks: int, size: int) -> dict[str, str]:
    return {
        "Nats-Msg-Id": chunk_msg_id(did, index, chunks),
        DOC_HEADER: did,
        CHUNK_HEADER: str(index),
        CHUNKS_HEADER: str(chunks),
        NAMESPACE_HEADER: namespace,
        BYTES_HEADER: str(size),
    }


@dataclass(frozen=True)
class DocMeta:
    """What a consumer reads from a document message's headers."""

    doc: str  # document id
    chunk: int  # this chunk's index
    chunks: int  # chunks of the document

    @property
    def last(self) -> bool:
        return self.chunk >= self.chunks - 1


def parse_doc(headers: dict[str, str] | None, body: bytes) -> DocMeta:
    """The headers above -> DocMeta; without them, a whole document named by its Nats-Msg-Id
    (or, lacking that too, the hash of its body)."""
    h = headers or {}
    did = h.get(DOC_HEADER) or h.get("Nats-Msg-Id") or hashlib.sha256(body).hexdigest()
    try:
        chunk, chunks = int(h.get(CHUNK_HEADER, "0")), int(h.get(CHUNKS_HEADER, "1"))
    except ValueError:
        chunk, chunks = 0, 1
    if not 0 <= chunk < chunks:
        chunk, chunks = 0, 1
    return DocMeta(did, chunk, chunks)


# ----- documents to publish -----


@dataclass(frozen=True)
class Document:
    name: str  # where it came from (a path, path:line, or "-")
    path: Path | None  # read from this file ...
    data: bytes | None  # ... or these bytes

    def size(self) -> int:
        return len(self.data) if self.data is not None else os.path.getsize(self.path or "")

    def read(self, offset: int, n: int) -> bytes:
        if self.data is not None:
            return self.data[offset : offset + n]
        assert self.path is not None
        with self.path.open("rb") as f:
            f.seek(offset)
            return f.read(n)

    def content_id(self, namespace: str) -> str:
        if self.data is not None:
            return doc_id(namespace, self.data)
        assert self.path is not None
        h = hashlib.sha256(namespace.encode() + b"\0")
        with self.path.open("rb") as f:
            while block := f.read(READ_BLOCK):
                h.update(block)
        return h.hexdigest()


def _looks_binary(path: Path) -> bool:
    with path.open("rb") as f:
        return b"\0" in f.read(8192)


def documents(
    paths: Sequence[str],
    on_skip: Callable[[str], None],
    stdin: IO[bytes] | None = None,
    spools: list[str] | None = None,
) -> Iterator[Document]:
    """Documents of the given paths, in order: a file is one document, a .jsonl file one per
    line with a string `text`, a directory its files recursively (sorted; hidden entries and
    files that look binary left out), "-" standard input as one document (spooled to a
    temporary file whose name goes into `spools`: the caller deletes it when done)."""
    for p in paths:
        if p == "-":
            yield from _stdin(stdin or sys.stdin.buffer, spools if spools is not None else [])
            continue
        path = Path(p)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for f in sorted(files):
                    fp = Path(root) / f
                    if f.startswith(".") or not fp.is_file() or _looks_binary(fp):
                        on_skip(str(fp))
                        continue
                    yield from _file(fp, on_skip)
        elif path.is_file():
            yield from _file(path, on_skip)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")


def _file(path: Path, on_skip: Callable[[str], None]) -> Iterator[Document]:
    if path.suffix.lower() == ".jsonl":
        with path.open("rb") as f:
            for n, line in enumerate(f, start=1):
                try:
                    text = json.loads(line).get("text") if line.strip() else None
                except (json.JSONDecodeError, AttributeError):
                    text = None
                if isinstance(text, str) and text:
                    yield Document(f"{path}:{n}", None, text.encode())
                elif line.strip():
                    on_skip(f"{path}:{n}")
        return
    if path.stat().st_size == 0:
        on_skip(str(path))
        return
    yield Document(str(path), path, None)


def _stdin(stream: IO[bytes], spools: list[str]) -> Iterator[Document]:
    with tempfile.NamedTemporaryFile(prefix="bwr-ingest-", delete=False) as spool:
        spools.append(spool.name)
        while block := stream.read(READ_BLOCK):
            spool.write(block)
    if os.path.getsize(spool.name):
        yield Document("-", Path(spool.name), None)


# ----- publishing -----


@dataclass
class IngestSummary:
    namespace: str
    documents: int = 0  # documents newly published
    chunks: int = 0  # messages newly stored
    bytes: int = 0  # body bytes newly stored
    duplicates: int = 0  # documents published before (a no-op this time)
    skipped: int = 0  # files and lines left out (binary, empty, JSONL lines without text)
    seconds: float = 0.0

    def line(self) -> str:
        return (
            f"{self.namespace}: {self.documents:,} documents ({self.chunks:,} chunks,"
            f" {self.bytes:,} bytes), {self.duplicates:,} duplicates, {self.skipped:,} skipped,"
            f" {self.seconds:.1f} s"
        )


async def ingest_paths(
    url: str,
    paths: Sequence[str],
    namespace: str = "default",
    progress: IO[str] | None = sys.stderr,
    *,
    chunk_bytes: int = 0,
    concurrency: int = 16,
    markers: bool = True,
    memory_config: MemoryConfig | None = None,
    stdin: IO[bytes] | None = None,
) -> IngestSummary:
    """Publish the documents of `paths` into `namespace`. chunk_bytes: most body bytes per
    message (0: the server's max_payload less room for headers). markers: consult and leave the
    KV markers that make re-publishing a no-op past the stream's duplicate window."""
    check_token(namespace, "namespace")
    for p in paths:
        if p != "-" and not Path(p).exists():
            raise FileNotFoundError(f"{p}: no such file or directory")
    cfg = memory_config or MemoryConfig()
    t0 = time.perf_counter()
    summary = IngestSummary(namespace)
    nc = await nats.connect(url, name="bwr-ingest", connect_timeout=round(cfg.connect_timeout_s))
    try:
        bus = Bus(nc, cfg)
        try:
            await bus.js.stream_info(cfg.docs_stream)
        except NotFoundError:  # a fresh server: make the streams and buckets
            await bus.ensure()
        kv = await bus.js.key_value(cfg.sessions_bucket) if markers else None
        spools: list[str] = []
        limit = chunk_bytes or max(1024, nc.max_payload - HEADER_ROOM)
        if limit + HEADER_ROOM > nc.max_payload and chunk_bytes:
            raise ValueError(
                f"chunk_bytes {chunk_bytes}: the server's max_payload is {nc.max_payload}"
            )
        send, receive = anyio.create_memory_object_stream[Document](max(1, concurrency))

        def skip(_: str) -> None:
            summary.skipped += 1

        def produce() -> None:  # in a thread: walking, reading and parsing block
            with send:
                for doc in documents(paths, skip, stdin, spools):
                    anyio.from_thread.run(send.send, doc)

        last_report = 0.0

        async def publisher(docs: MemoryObjectReceiveStream[Document]) -> None:
            nonlocal last_report
            async with docs:
                async for doc in docs:
                    await _publish(bus, kv, namespace, doc, limit, summary)
                    now = time.perf_counter()
                    if progress is not None and now - last_report > 0.2:
                        last_report = now
                        summary.seconds = now - t0
                        _show(progress, summary, final=False)

        async with anyio.create_task_group() as tg:
            for _ in range(max(1, concurrency)):
                tg.start_soon(publisher, receive.clone())
            receive.close()
            await anyio.to_thread.run_sync(produce)
    finally:
        await nc.close()
        for name in spools:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
    summary.seconds = time.perf_counter() - t0
    if progress is not None:
        _show(progress, summary, final=True)
    return summary


async def _publish(
    bus: Bus,
    kv: KeyValue | None,
    namespace: str,
    doc: Document,
    limit: int,
    summary: IngestSummary,
) -> None:
    """One document: its chunks in order (each retried while the server is away; the msg id
    makes a retry harmless), then its marker."""
    did = await anyio.to_thread.run_sync(doc.content_id, namespace)
    marker = marker_key(namespace, did)
    if kv is not None:
        with contextlib.suppress(KeyNotFoundError):
            await kv.get(marker)
            summary.duplicates += 1
            return
    size = await anyio.to_thread.run_sync(doc.size)
    chunks = max(1, -(-size // limit))
    fresh = stored = 0
    for i in range(chunks):
        body = await anyio.to_thread.run_sync(doc.read, i * limit, limit)
        headers = chunk_headers(namespace, did, i, chunks, size)
        ack = await _retry(bus, docs_subject(namespace), body, headers)
        if not ack.duplicate:
            fresh += 1
            stored += len(body)
    summary.chunks += fresh
    summary.bytes += stored
    if fresh:
        summary.documents += 1
    else:
        summary.duplicates += 1
    if kv is not None:
        await kv.put(marker, json.dumps({"chunks": chunks, "bytes": size}).encode())


async def _retry(bus: Bus, subject: str, body: bytes, headers: dict[str, str]) -> PubAck:
    cfg = bus.config
    with anyio.fail_after(cfg.submit_timeout_s):
        while True:
            try:
                return await bus.js.publish(subject, body, headers=headers, stream=cfg.docs_stream)
            except TRANSIENT:
                await anyio.sleep(cfg.reconnect_wait_s)


def _show(out: IO[str], s: IngestSummary, *, final: bool) -> None:
    tty = out.isatty()
    if not final and not tty:
        return
    text = f"ingest {s.line()}"
    out.write(("\r" + text + "\033[K" if tty else text) + ("\n" if final else ""))
    out.flush()


# ----- the command line (wired into `bwr ingest` by the CLI) -----


def add_ingest_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", help="files, directories, .jsonl files, or - (stdin)")
    parser.add_argument("--namespace", default="default", help="namespace to ingest into")
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    parser.add_argument("--chunk-bytes", type=int, default=0, help="0: the server's limit")
    parser.add_argument("--concurrency", type=int, default=16, help="documents in flight")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run_ingest(args: argparse.Namespace) -> int:
    try:
        summary = anyio.run(
            lambda: ingest_paths(
                args.nats_url,
                args.paths,
                args.namespace,
                sys.stderr,
                chunk_bytes=args.chunk_bytes,
                concurrency=args.concurrency,
            )
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"bwr ingest: {e}", file=sys.stderr)
        return 2
    except (OSError, *TRANSIENT) as e:
        print(f"bwr ingest: cannot publish to {args.nats_url}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(asdict(summary)))
    return 0
