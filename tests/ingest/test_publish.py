"""The publisher against a real nats-server: what goes into DOCS (headers, chunks in order), and
that publishing the same documents again adds nothing, through the KV markers and, without them,
through JetStream's Nats-Msg-Id dedup."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
from pathlib import Path

import nats
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy

from memory.bus import Bus
from memory.config import MemoryConfig
from memory.ingest import (
    CHUNK_HEADER,
    CHUNKS_HEADER,
    DOC_HEADER,
    add_ingest_arguments,
    chunk_headers,
    doc_id,
    ingest_paths,
    parse_doc,
    run_ingest,
)
from tests.ingest.conftest import write_corpus
from tests.nats_server import NatsServer


async def stored(url: str, subject: str = "docs.ingest.>") -> list[tuple[dict[str, str], bytes]]:
    """Every message of DOCS on `subject`, in stream order (an ephemeral ordered read)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info("DOCS")
        n = info.state.messages
        sub = await js.pull_subscribe(
            subject, stream="DOCS", config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        )
        out: list[tuple[dict[str, str], bytes]] = []
        while len(out) < n:
            for m in await sub.fetch(min(64, n - len(out)), timeout=2):
                out.append((dict(m.headers or {}), m.data))
                await m.ack()
        await sub.unsubscribe()
        return out
    finally:
        await nc.close()


async def test_ingest_a_directory_twice_adds_nothing(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    docs = write_corpus(tmp_path / "corpus")
    first = await ingest_paths(nats_server.url, [str(tmp_path / "corpus")], "books", None)
    assert (first.documents, first.chunks, first.duplicates) == (len(docs), len(docs), 0)
    assert first.skipped == 4  # binary, hidden, empty, a JSONL line without text
    assert first.bytes == sum(map(len, docs.values()))
    msgs = await stored(nats_server.url)
    assert sorted(body for _, body in msgs) == sorted(docs.values())
    for headers, body in msgs:
        assert headers["Nats-Msg-Id"] == headers[DOC_HEADER] == doc_id("books", body)
        assert (headers[CHUNK_HEADER], headers[CHUNKS_HEADER]) == ("0", "1")
        assert headers["Bwr-Namespace"] == "books"

    again = await ingest_paths(nats_server.url, [str(tmp_path / "corpus")], "books", None)
    assert (again.documents, again.chunks, again.bytes) == (0, 0, 0)
    assert again.duplicates == len(docs)
    # without the markers, JetStream's dedup on the content hash says the same
    raw = await ingest_paths(
        nats_server.url, [str(tmp_path / "corpus")], "books", None, markers=False
    )
    assert (raw.documents, raw.duplicates) == (0, len(docs))
    assert len(await stored(nats_server.url)) == len(docs)

    # the same bytes in another namespace are another document
    other = await ingest_paths(nats_server.url, [str(tmp_path / "corpus")], "other", None)
    assert other.documents == len(docs)


async def test_large_documents_go_in_ordered_chunks(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    big = bytes(range(256)) * 40 + b"tail"  # 10,244 bytes
    (tmp_path / "big.txt").write_bytes(big)
    s = await ingest_paths(
        nats_server.url, [str(tmp_path / "big.txt")], "ns", None, chunk_bytes=3000
    )
    assert (s.documents, s.chunks, s.bytes) == (1, 4, len(big))
    msgs = await stored(nats_server.url)
    did = hashlib.sha256(b"ns\0" + big).hexdigest()
    assert [h["Nats-Msg-Id"] for h, _ in msgs] == [f"{did}.{i}" for i in range(4)]
    assert [h[CHUNK_HEADER] for h, _ in msgs] == ["0", "1", "2", "3"]
    assert all(h[CHUNKS_HEADER] == "4" and h["Bwr-Doc-Bytes"] == str(len(big)) for h, _ in msgs)
    assert b"".join(body for _, body in msgs) == big
    metas = [parse_doc(h, b) for h, b in msgs]
    assert [m.last for m in metas] == [False, False, False, True]

    # a document over the server's max_payload is cut under it by default
    nc = await nats.connect(nats_server.url)
    limit = nc.max_payload
    await nc.close()
    huge = (b"0123456789abcdef" * (limit // 8 + 1000))[: 2 * limit + 5]
    (tmp_path / "huge.txt").write_bytes(huge)
    s = await ingest_paths(nats_server.url, [str(tmp_path / "huge.txt")], "ns", None)
    assert (s.documents, s.chunks) == (1, 3)


async def test_stdin_and_an_existing_stream(tmp_path: Path, nats_server: NatsServer) -> None:
    bus = await Bus.connect(nats_server.url, MemoryConfig())  # the streams exist already
    await bus.close()
    s = await ingest_paths(
        nats_server.url, ["-"], "pipe", None, stdin=io.BytesIO(b"from standard input")
    )
    assert (s.documents, s.bytes) == (1, 19)
    ((headers, body),) = await stored(nats_server.url)
    assert body == b"from standard input" and headers[DOC_HEADER] == doc_id("pipe", body)


def test_message_format_helpers() -> None:
    h = chunk_headers("ns", "abc", 0, 1, 5)
    assert h["Nats-Msg-Id"] == "abc" and parse_doc(h, b"hello").last
    bare = parse_doc(None, b"hello")  # any client may publish a bare body
    assert (bare.doc, bare.chunk, bare.chunks) == (hashlib.sha256(b"hello").hexdigest(), 0, 1)
    assert parse_doc({"Nats-Msg-Id": "m1"}, b"x").doc == "m1"
    assert parse_doc({CHUNK_HEADER: "7", CHUNKS_HEADER: "2"}, b"x").chunks == 1  # nonsense: whole


def test_command_line(
    tmp_path: Path, nats_server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a.txt").write_text("a document")
    parser = argparse.ArgumentParser()
    add_ingest_arguments(parser)
    args = parser.parse_args(
        [str(tmp_path / "a.txt"), "--namespace", "cli", "--nats-url", nats_server.url, "--json"]
    )
    assert run_ingest(args) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["documents"] == 1
    assert "cli: 1 documents" in err
    missing = parser.parse_args([str(tmp_path / "nope"), "--nats-url", nats_server.url])
    assert run_ingest(missing) == 2
