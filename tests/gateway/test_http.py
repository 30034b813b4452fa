"""The HTTP API against a real server: sessions, memory and namespace hooks, info, probes,
metrics (parsed by prometheus_client's parser) and the OpenAPI document."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import Hooks
from gateway.config import GatewayConfig
from tests.gateway.conftest import Client, Running, serve


class FakeMemory:
    async def inspect(self, session: str) -> dict[str, Any]:
        return {
            "session": session,
            "memory_bytes": 1000,
            "levels": [{"level": 1, "slots": 4}],
            "version": 3,
        }


class FakeNamespaces:
    async def namespace(self, name: str) -> dict[str, Any]:
        if name == "broken":
            raise RuntimeError("store unreachable")
        return {"documents": 2, "bytes": 2048}


@pytest.fixture(scope="module")
def hooked() -> Iterator[Running]:
    running = serve(GatewayConfig(), Hooks(memory=FakeMemory(), namespaces=FakeNamespaces()))
    yield running
    running.stop()


def samples(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + (
                "{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}"
                if s.labels
                else ""
            )
            out[key] = s.value
    return out


async def test_session_lifecycle(server: Running) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.post("/v1/sessions", json={"binary": False, "sampling": {"max_bytes": 4}})
        assert r.status_code == 201
        created = r.json()
        sid, token = created["session"], created["token"]
        assert created["state"] == "detached" and created["stream"] == f"/v1/sessions/{sid}/stream"
        assert sid in [s["session"] for s in (await http.get("/v1/sessions")).json()["sessions"]]
        async with await Client.connect(
            f"{server.ws}/v1/sessions/{sid}/stream", {"X-Session-Token": token}
        ) as c:
            opened = await c.open()
            assert opened["resumed"] and opened["session"] == sid
            _, done = await c.turn("abc")
            assert done["usage"]["output_bytes"] <= 4
            got = (await http.get(f"/v1/sessions/{sid}", params={"token": token})).json()
            assert (
                got["state"] == "attached"
                and got["context_bytes"] == 3 + done["usage"]["output_bytes"]
            )
        wrong = await http.get(f"/v1/sessions/{sid}", headers={"X-Session-Token": "wrong"})
        assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "forbidden"
        mem = (await http.get(f"/v1/sessions/{sid}/memory", params={"token": token})).json()
        assert (
            mem["memory"] == "off"
            and mem["levels"] == []
            and mem["total_bytes"] == mem["state_bytes"] > 0
        )
        assert (await http.delete(f"/v1/sessions/{sid}", params={"token": token})).json()["closed"]
        gone = await http.get(f"/v1/sessions/{sid}", params={"token": token})
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "unknown_session"


async def test_bad_requests_are_4xx(server: Running) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        for body, code in (
            (b"{", "bad_json"),
            (b'{"binary":"yes"}', "invalid_frame"),
            (b"x" * (2 << 20), "frame_too_large"),
        ):
            r = await http.post("/v1/sessions", content=body)
            assert 400 <= r.status_code < 500 and r.json()["error"]["code"] == code
        assert (await http.get("/v1/namespaces/a.b")).status_code == 400
        assert (await http.get("/nowhere")).json()["error"]["code"] == "not_found"
        assert (await http.put("/v1/sessions")).status_code == 405


async def test_memory_and_namespace_hooks(hooked: Running) -> None:
    async with httpx.AsyncClient(base_url=hooked.url) as http:
        created = (await http.post("/v1/sessions")).json()
        mem = (
            await http.get(
                f"/v1/sessions/{created['session']}/memory",
                headers={"X-Session-Token": created["token"]},
            )
        ).json()
        assert (
            mem["memory"] == "on"
            and mem["levels"] == [{"level": 1, "slots": 4}]
            and mem["version"] == 3
        )
        assert mem["total_bytes"] == mem["state_bytes"] + 1000
        assert (await http.get("/v1/namespaces/docs")).json() == {
            "namespace": "docs",
            "documents": 2,
            "bytes": 2048,
            "ingest": "on",
        }
        broken = (await http.get("/v1/namespaces/broken")).json()
        assert broken["documents"] == 0 and "store unreachable" in broken["ingest_error"]


async def test_info_probes_openapi(server: Running) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        info = (await http.get("/v1/info")).json()
        assert {"version", "model", "device", "nats_url", "weights_version"} <= set(info)
        assert (await http.get("/healthz")).json() == {"ok": True}
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["nats"] == "off"
        doc = (await http.get("/openapi.json")).json()
        assert doc["openapi"].startswith("3.") and "/v1/chat/completions" in doc["paths"]
        assert '<script src="/static/app.js"' in (await http.get("/")).text


async def test_metrics_move(server: Running) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        before = samples((await http.get("/metrics")).text)
        async with await Client.connect(server.ws + "/v1/stream") as c:
            await c.open()
            await c.turn("metrics", max_bytes=16, ignore_eos=True)  # EOS first would emit nothing
        after = samples((await http.get("/metrics")).text)
    for name in (
        "time_to_first_token_seconds_count",
        "request_queue_time_seconds_count",
        "engine_steps_total",
        "output_bytes_total",
    ):
        assert after["bwr:" + name] > before.get("bwr:" + name, 0), name
    assert after["bwr:inter_token_latency_seconds_count"] >= before.get(
        "bwr:inter_token_latency_seconds_count", 0
    )
    for gauge in (
        "num_requests_running",
        "num_requests_waiting",
        "weights_version",
        "nats_connected",
        "num_sessions",
    ):
        assert "bwr:" + gauge in after, gauge
    assert after["bwr:nats_connected"] == -1
